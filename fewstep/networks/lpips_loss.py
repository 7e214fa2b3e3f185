"""LPIPS (Zhang et al. 2018) as a distillation loss, with a backbone read from a local file: nothing is downloaded.

The ``lpips`` package ships only its linear heads (``lpips/weights/v0.1/{vgg,alex}.pth``); the VGG16 / AlexNet
backbone is torchvision's ImageNet network, which it would download. Here the network is built on the meta
device (no download, no memory for torchvision's classifier layers, which LPIPS does not use), then filled:
the heads from the package, the backbone from a torchvision state_dict the user names or from the torch hub
cache, where torchvision's own download would have put it. The consistency-models paper (Song et al. 2023)
uses LPIPS with VGG on images upsampled to 224 x 224 (bilinear); so does ``LPIPSLoss`` by default.

LPIPS compares ImageNet features, as the FID Inception network does: a student trained on it can look better
by FID than it is (the iCT paper's reason for pseudo-Huber instead).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import ConfigError

NETS = ("vgg", "alex")
MIN_SIDE = {"vgg": 16, "alex": 31}  # the smallest image side each backbone's pooling takes
RANDOM = "random"  # an untrained backbone (seed 0): for tests, never a perceptual distance
OPTION = "method.lpips_backbone"  # where a user names the backbone file


def torchvision_weights(net: str):
    """torchvision's ImageNet weights of the backbone: VGG16_Weights.IMAGENET1K_V1 or AlexNet_Weights.IMAGENET1K_V1."""
    from torchvision import models

    return models.VGG16_Weights.IMAGENET1K_V1 if net == "vgg" else models.AlexNet_Weights.IMAGENET1K_V1


def hub_backbone_path(net: str) -> Path:
    """Where torchvision's download puts the backbone: <torch.hub.get_dir()>/checkpoints/<file name of the url>."""
    url = torchvision_weights(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def backbone_path(net: str, backbone: str | os.PathLike | None) -> Path:
    """The backbone file: ``backbone`` if given, else the hub cache's; one line naming where to put it if absent."""
    arch = "vgg16" if net == "vgg" else "alexnet"
    if backbone is not None:
        path = Path(backbone).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"LPIPS backbone file '{path}' ({OPTION}) not found: give a torchvision {arch} state_dict (.pth), "
                f"e.g. {torchvision_weights(net).url}"
            )
        return path
    path = hub_backbone_path(net)
    if not path.is_file():
        raise ConfigError(
            f"LPIPS needs torchvision's ImageNet {arch} weights, which fewstep does not download: put "
            f"{torchvision_weights(net).url} at {path} or set {OPTION}=PATH (a torchvision {arch} state_dict)"
        )
    return path


def check_options(net: str, resize: int | None, data_shape, prefix: str = "method.lpips_") -> None:
    """One line for LPIPS settings that cannot work, before anything is built: the network, the size, the data
    (images [channels, H, W] of 1 or 3 channels); ``prefix`` names the options as the user sets them."""
    if net not in NETS:
        raise ConfigError(f"unknown LPIPS network {prefix}net='{net}': choose one of {', '.join(NETS)}")
    if resize is not None and int(resize) < MIN_SIDE[net]:
        raise ConfigError(f"{prefix}resize={resize}: use null or a side of at least {MIN_SIDE[net]} pixels for {net}")
    shape = list(data_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ConfigError(f"LPIPS compares grayscale or RGB images, and this data has shape {shape}: use another loss")


def read_backbone(pnet: nn.Module, path: Path, net: str) -> None:
    """Load a torchvision state_dict (of the whole model or of its ``features``) into lpips's sliced backbone."""
    arch = "vgg16" if net == "vgg" else "alexnet"
    from fewstep.torch_files import check_torch_archive

    check_torch_archive(path, legacy=True)  # no zip member that declares more than the file holds
    try:
        try:  # memory-mapped: of a whole model's file only the features are read (VGG16's classifier is 490 MB)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in torch's legacy format (torchvision's own vgg16 file) cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError(f"LPIPS backbone '{path}' is not a readable torch state_dict (weights_only): {first}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"LPIPS backbone '{path}' holds a {type(state).__name__}, not a torchvision {arch} state_dict")
    mapped = {}
    for name, tensor in pnet.state_dict().items():  # slice{k}.{i}.{weight,bias} <- features.{i}.{...}
        key = name.split(".", 1)[1]
        found = state.get(f"features.{key}", state.get(key))
        if found is None:
            raise ConfigError(f"LPIPS backbone '{path}' is not a torchvision {arch} state_dict: it lacks 'features.{key}'")
        if found.shape != tensor.shape:
            raise ConfigError(
                f"LPIPS backbone '{path}' is not a torchvision {arch} state_dict: 'features.{key}' has shape "
                f"{list(found.shape)}, not {list(tensor.shape)}"
            )
        mapped[name] = found
    pnet.load_state_dict(mapped)  # copies: nothing of the file stays mapped


class LPIPSLoss(nn.Module):
    """Per-sample LPIPS distance [batch] between images in [-1, 1] of any size and 1 or 3 channels (grayscale is
    repeated to RGB); images with a side below ``resize`` are upsampled (bilinear) to ``resize`` x ``resize``
    first, as the consistency-models paper does at 224 (None: never resized). Frozen and always in eval mode.

    ``net``: vgg (the paper's) or alex. ``backbone``: a torchvision state_dict file of that network (the whole
    model's or its ``features``'); None: torchvision's file in the torch hub cache; "random": an untrained backbone
    (tests only). A method keeps it out of its state_dict and EMA (see ``frozen_lpips``).
    """

    def __init__(self, net: str = "vgg", backbone: str | os.PathLike | None = None, resize: int | None = 224):
        super().__init__()
        check_options(net, resize, (3, 1, 1), prefix="")
        path = None if backbone == RANDOM else backbone_path(net, backbone)  # fail before building anything
        import lpips

        # pnet_rand: torchvision builds the backbone without weights (no download); on the meta device it costs
        # nothing, and its unused classifier layers never take memory. pretrained=False: the heads are read below.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation of lpips's pretrained=False
            model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        model.to_empty(device="cpu")
        model.scaling_layer = lpips.ScalingLayer()  # its constants, wiped by to_empty
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        head_state = torch.load(heads, map_location="cpu", weights_only=True)
        _, unexpected = model.load_state_dict(head_state, strict=False)
        if unexpected or len(head_state) != len(model.lins):  # lin0.model.1.weight, ... (lins.* name the same ones)
            raise ConfigError(f"the lpips package's heads '{heads}' do not fit its {net} network: reinstall lpips")
        if path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for module in model.net.modules():
                    if isinstance(module, nn.Conv2d):
                        module.reset_parameters()
        else:
            read_backbone(model.net, path, net)
        self.net, self.resize = net, None if resize is None else int(resize)
        self.backbone = None if path is None else str(path)
        self.lpips = model.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: the heads' dropout stays off

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] not in (1, 3):
            raise ConfigError(f"LPIPS compares images [batch, 1 or 3, H, W] of one shape, got {list(a.shape)} and {list(b.shape)}")
        dtype = next(self.lpips.parameters()).dtype
        a, b = a.to(dtype), b.to(dtype)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        if self.resize is not None and min(a.shape[-2:]) < self.resize:
            size = (self.resize, self.resize)
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        if min(a.shape[-2:]) < MIN_SIDE[self.net]:
            raise ConfigError(
                f"LPIPS on {self.net} needs images of at least {MIN_SIDE[self.net]} pixels a side, got "
                f"{list(a.shape[-2:])}: set the resize option (method.lpips_resize)"
            )
        return self.lpips(a, b).flatten()

    def extra_repr(self) -> str:
        return f"net={self.net}, backbone={self.backbone or RANDOM}, resize={self.resize}"


def frozen_lpips(owner: nn.Module, net: str = "vgg", backbone=None, resize: int | None = 224) -> LPIPSLoss:
    """``owner``'s LPIPSLoss, built on first use, on ``owner.device``: held as a plain attribute, not a registered
    submodule, so it stays out of the owner's state_dict, checkpoints, optimiser and EMA (as a teacher does)."""
    loss = owner.__dict__.get("_lpips_loss")
    if loss is None:
        loss = LPIPSLoss(net, backbone, resize)
        object.__setattr__(owner, "_lpips_loss", loss)
    device = getattr(owner, "device", None)
    if device is not None and next(loss.parameters()).device != torch.device(device):
        loss.to(device)
    return loss


__all__ = ["LPIPSLoss", "NETS", "backbone_path", "check_options", "frozen_lpips", "hub_backbone_path"]
