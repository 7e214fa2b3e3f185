"""EDM's networks and preconditionings, state_dict-compatible with NVlabs/edm.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS 2022,
https://github.com/NVlabs/edm). This is fewstep's own implementation; what it shares with EDM's
``training/networks.py`` is the interface: class names, constructor arguments and defaults, parameter and buffer
names, and the order of floating-point operations, so that an EDM snapshot's ``state_dict`` loads with
``strict=True`` and gives EDM's D(x; sigma) in float32.

- layers: ``Linear``, ``Conv2d`` (with 2x FIR up/down-sampling), ``GroupNorm``, ``UNetBlock`` (residual block with
  optional self-attention), ``PositionalEmbedding``, ``FourierEmbedding``;
- architectures: ``SongUNet`` (DDPM++ / NCSN++, Song et al. 2021) and ``DhariwalUNet`` (ADM, Dhariwal & Nichol 2021),
  called as ``F(x, noise_labels, class_labels, augment_labels=None)``;
- preconditionings (EDM Table 1), all ``EDMPreconditioning`` (a ``fewstep.networks.preconditioning.
  PreconditionedDenoiser``, the networks that carry their own preconditioning): ``EDMPrecond``, ``VPPrecond``,
  ``VEPrecond``, ``iDDPMPrecond``, called as the denoiser ``D(x, sigma, class_labels=None)``;
- ``EDM_CLASSES`` (EDM's class name -> class, for reading EDM pickles) and ``edm_denoiser`` (the Hydra model factory).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.errors import ConfigError, one_line
from fewstep.networks.preconditioning import PreconditionedDenoiser

# ---------------------------------------------------------------------------------------------------------------
# Layers


def draw_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A tensor of ``shape`` drawn with Xavier (Glorot & Bengio 2010) or Kaiming (He et al. 2015) scaling, EDM's modes."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(list(shape)) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(list(shape))
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(list(shape)) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(list(shape))
    raise ConfigError(f"unknown init mode {mode!r}: use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal")


class Linear(nn.Module):
    """y = x W^T + b; ``init_weight``/``init_bias`` scale the initial draws (0 gives a zero-initialised layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(draw_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(draw_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


def fir_filter_2d(taps: Sequence[float]) -> torch.Tensor:
    """The separable 2-D resampling filter [1, 1, k, k] of 1-D ``taps``, normalised to sum 1."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return torch.outer(f, f)[None, None] / f.sum().square()


def upsample_2x(x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-channel 2x upsampling: transposed convolution with 4 f (gain 4 keeps the mean); f = [1,1] is nearest."""
    c = x.shape[1]
    return F.conv_transpose2d(x, f.mul(4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=padding)


def downsample_2x(x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-channel 2x downsampling: convolution with f at stride 2; f = [1,1] is 2x2 average pooling."""
    c = x.shape[1]
    return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=padding)


class Conv2d(nn.Module):
    """A k x k convolution (k = 0: none, resampling only), optionally after 2x upsampling or before 2x downsampling.

    The resampling filter is ``resample_filter`` ([1,1]: box, DDPM++/ADM; [1,3,3,1]: NCSN++, Song et al. 2021),
    kept as the buffer ``resample_filter`` when up or down. ``fused_resample`` pads once for filter and kernel
    together (EDM's fused mode, used by NCSN++'s residual encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(draw_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(draw_init([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", fir_filter_2d(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            x = upsample_2x(x, f, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = downsample_2x(x, f, padding=0)
        else:
            if self.up:
                x = upsample_2x(x, f, padding=f_pad)
            if self.down:
                x = downsample_2x(x, f, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) with min(num_groups, channels // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax over keys of q^T k / sqrt(channels) for q, k of shape [n, c, pixels]: [n, queries, keys].

    Computed in float32 (float64 for float64 inputs) and returned in q's dtype (EDM's AttentionOp; autograd and
    forward-mode differentiate through the casts, which gives the same float32 derivatives).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("ncq,nck->nqk", q.to(dtype), (k / math.sqrt(k.shape[1])).to(dtype))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block conditioned on an embedding, with optional 2x resampling and multi-head self-attention.

    The union of the DDPM++/NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021) blocks: norm0 -> SiLU ->
    conv0 (resampling) -> embedding as scale and shift (``adaptive_scale``) or as a bias -> norm1 -> SiLU -> dropout
    -> conv1, plus the skip path, times ``skip_scale``; then, when ``attention``, norm2 -> qkv -> attention -> proj
    as a second residual. ``init``/``init_zero``/``init_attn`` are keyword arguments for the layers' initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            projects = resample_proj or out_channels != in_channels
            self.skip = Conv2d(in_channels, out_channels, kernel=1 if projects else 0, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self.attend(self.norm2(h))) + h) * self.skip_scale
        return h

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels; qkv's channels are laid out as [head, channel, (q, k, v)]."""
        b, c = x.shape[:2]
        q, k, v = self.qkv(x).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
        mixed = torch.einsum("nqk,nck->ncq", attention_weights(q, k), v)
        return mixed.reshape(*x.shape)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x w_i), sin(x w_i)] with w_i = max_positions^(-i/n) (Vaswani et al. 2017; DDPM++, ADM).

    ``endpoint`` divides by n - 1 instead of n, so the lowest frequency is exactly 1 / max_positions.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        dtype = torch.promote_types(x.dtype, torch.float32)  # EDM's float32, float64 for float64 inputs
        exponents = torch.arange(half, dtype=dtype, device=x.device) / (half - (1 if self.endpoint else 0))
        angles = torch.outer(x, ((1 / self.max_positions) ** exponents).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi f x), sin(2 pi f x)], f ~ N(0, scale^2) in the buffer ``freqs`` (NCSN++;
    Tancik et al. 2020)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def second_time_mapping(map_noise: nn.Module, channels: int) -> nn.Sequential:
    """The embedding of a second scalar input (MeanFlow's t - r): ``map_noise``'s kind of embedding, then a linear
    layer initialised to zero, so that a network built with it starts as the network without it."""
    kind = PositionalEmbedding(channels, map_noise.max_positions, map_noise.endpoint) \
        if isinstance(map_noise, PositionalEmbedding) else FourierEmbedding(channels)
    return nn.Sequential(kind, Linear(channels, channels, init_weight=0))


def add_second_time(emb: torch.Tensor, mapping: nn.Module | None, second_time: torch.Tensor | None) -> torch.Tensor:
    """The noise embedding ``emb`` plus the mapped second time; one line when the network was built without it."""
    if second_time is None:
        return emb
    if mapping is None:
        raise ConfigError("this network has no second time input: build it with second_time=True (model.second_time=true)")
    return emb + mapping(torch.as_tensor(second_time, device=emb.device).to(emb.dtype).expand(emb.shape[0]))


def drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each sample's label vector with probability ``p`` while training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Architectures


def encoder_feature_modules(enc: nn.ModuleDict, dec: nn.ModuleDict) -> list[nn.Module]:
    """The last main-path module of each resolution in ``enc`` and the bottleneck ``dec['{res}x{res}_in1']``."""
    last: dict[str, nn.Module] = {}
    for name, module in enc.items():
        if "_aux_" not in name:
            last[name.split("_")[0]] = module
    bottleneck = next(module for name, module in dec.items() if name.endswith("_in1"))
    return [*last.values(), bottleneck]


class SongUNet(nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs") as EDM re-implements them.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard', resample_filter=[1,1].
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1].
    Modules live in the ModuleDicts ``enc`` and ``dec`` under EDM's names (``{res}x{res}_block{i}``, ``_down``,
    ``_up``, ``_in0``, ``_aux_*``); ``forward`` dispatches on those names. ``second_time`` (fewstep's, off by default:
    EDM's state_dict unchanged) adds the input ``forward(..., second_time=h)``, mapped into the noise embedding.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.10,
                 label_dropout: float = 0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard", resample_filter: Sequence[float] = (1, 1),
                 second_time: bool = False):
        for name, value, allowed in [("embedding_type", embedding_type, ("fourier", "positional")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))]:
            if value not in allowed:
                raise ConfigError(f"SongUNet {name}={value!r} is unknown: use one of {', '.join(allowed)}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ labels, augmentation labels) -> embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        c, c_aux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels, kernel=3, **init)
                c = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(c_aux, c_aux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(c_aux, c, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        c_aux, c, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    c_aux = c
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c, model_channels * mult, attention=res in attn_resolutions, **block)
                c = model_channels * mult
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)
            for idx in range(num_blocks + 1):
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c + skips.pop(), model_channels * mult, attention=attention, **block)
                c = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c, out_channels, kernel=3, **init_zero)
        # last, so that every other layer draws the initial weights it draws without it
        self.map_second_time = second_time_mapping(self.map_noise, noise_channels) if second_time else None

    def embed(self, noise_labels, class_labels, augment_labels, second_time=None) -> torch.Tensor:
        """The conditioning embedding of each sample: [batch, emb_channels]."""
        emb = self.map_noise(noise_labels)
        cos, sin = emb.chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # Song et al.'s order: sines first
        emb = add_second_time(emb, self.map_second_time, second_time)
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def feature_modules(self) -> list[nn.Module]:
        """The encoder's last block at each resolution, then the bottleneck (the decoder's first two blocks' output)."""
        return encoder_feature_modules(self.enc, self.dec)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, second_time: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels, second_time)

        skips, aux = [], x
        for name, module in self.enc.items():
            if name.endswith("_aux_down"):
                aux = module(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + module(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)

        out = None  # the output image, accumulated over resolutions for decoder_type='skip'
        for name, module in self.dec.items():
            if name.endswith("_aux_up"):
                out = module(out)
            elif name.endswith("_aux_norm"):
                h = module(x)
            elif name.endswith("_aux_conv"):
                h = module(F.silu(h))
                out = h if out is None else h + out
            else:
                if "_block" in name:  # decoder blocks take the matching encoder activation
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis") as EDM re-implements it.

    Attention heads have 64 channels each (a level narrower than 64 channels gets no attention). Modules live in
    ``enc``/``dec`` under EDM's names; the output is ``out_conv(silu(out_norm(x)))``. ``second_time`` as in SongUNet.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0, second_time: bool = False):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels * mult, kernel=3, **init)
                c = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c, model_channels * mult, attention=res in attn_resolutions, **block)
                c = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c + skips.pop(), model_channels * mult, attention=res in attn_resolutions, **block)
                c = model_channels * mult
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, kernel=3, **init_zero)
        # last, so that every other layer draws the initial weights it draws without it
        self.map_second_time = second_time_mapping(self.map_noise, model_channels) if second_time else None

    def embed(self, noise_labels, class_labels, augment_labels, second_time=None) -> torch.Tensor:
        """The conditioning embedding of each sample: [batch, emb_channels]."""
        emb = add_second_time(self.map_noise(noise_labels), self.map_second_time, second_time)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training))
        return F.silu(emb)

    def feature_modules(self) -> list[nn.Module]:
        """The encoder's last block at each resolution, then the bottleneck (the decoder's first two blocks' output)."""
        return encoder_feature_modules(self.enc, self.dec)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, second_time: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels, second_time)
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for name, module in self.dec.items():
            if "_block" in name:  # decoder blocks take the matching encoder activation
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


ARCHITECTURES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# ---------------------------------------------------------------------------------------------------------------
# Preconditionings (EDM Table 1)


class EDMPreconditioning(PreconditionedDenoiser):
    """D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)) around a raw network ``model``.

    Subclasses give the coefficients (EDM Table 1). ``forward(x, sigma, class_labels=None)`` returns D in float32;
    sigma is a float or a [batch] tensor; ``class_labels`` are integer labels [batch] (the index ``label_dim`` means
    "no label": the zero vector, for classifier-free guidance) or EDM's float one-hot vectors [batch, label_dim].
    ``use_fp16`` runs the network in float16, on CUDA only (as EDM).
    """

    sigma_min: float
    sigma_max: float
    # EDM's VP/VE/iDDPM preconditionings have no sigma_data; 0.5 (EDM's value for images in [-1, 1]) is what fewstep's
    # samplers and students assume of them. EDMPrecond sets its own.
    sigma_data: float = 0.5
    model_out_factor = 1  # the network's output channels per image channel (iDDPM also predicts variances)

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_kwargs: dict):
        super().__init__()
        if model_type not in ARCHITECTURES:
            raise ConfigError(f"model_type={model_type!r} is not an EDM architecture: use one of {', '.join(ARCHITECTURES)}")
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = img_resolution, img_channels, label_dim, use_fp16
        self.model = ARCHITECTURES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                               out_channels=img_channels * self.model_out_factor, label_dim=label_dim,
                                               **model_kwargs)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [batch, 1, 1, 1] in float32."""
        raise NotImplementedError

    def label_vectors(self, class_labels, device) -> torch.Tensor | None:
        """The network's label input: None (unconditional), EDM's zero vector for no labels, or [batch, label_dim]."""
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point():
            return labels.to(torch.float32).reshape(-1, self.label_dim)
        one_hot = F.one_hot(labels.reshape(-1).long(), self.label_dim + 1)  # the last column is "no label"
        return one_hot[:, : self.label_dim].to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(x.shape[0])
        sigma = sigma.reshape(-1, 1, 1, 1)
        labels = self.label_vectors(class_labels, x.device)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, : self.img_channels].to(torch.float32)

    def round_sigma(self, sigma) -> torch.Tensor:
        """The noise level the network supports nearest to ``sigma`` (continuous preconditionings: sigma itself)."""
        return torch.as_tensor(sigma)

    def feature_modules(self) -> list[nn.Module]:
        """The encoder's last block at each resolution, then the bottleneck (for discriminator heads)."""
        return self.model.feature_modules()


class EDMPrecond(EDMPreconditioning):
    """EDM's preconditioning (Karras et al. 2022, Table 1 and Sec. 5): unit-variance input and training target.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sd^2 + sigma^2),
    c_noise = ln(sigma) / 4, with sd = sigma_data.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class VPPrecond(EDMPreconditioning):
    """Variance-preserving preconditioning (Song et al. 2021's VP SDE; EDM Table 1).

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = (M - 1) t(sigma); the network predicts the noise. sigma_min = sigma(epsilon_t), sigma_max = sigma(1).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t) -> torch.Tensor:
        """The noise level at time t in [epsilon_t, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma) -> torch.Tensor:
        """The time t at which the noise level is sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(EDMPreconditioning):
    """Variance-exploding preconditioning (Song et al. 2021's VE SDE; EDM Table 1).

    c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2); the network predicts the scaled negative noise.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(EDMPreconditioning):  # noqa: N801 (EDM's class name)
    """Improved DDPM preconditioning (Nichol & Dhariwal 2021, cosine schedule; EDM Table 1).

    The network sees only the discrete noise levels in the buffer ``u`` (u_0 > u_1 > ... > u_M = 0), built by
    EDM's recursion u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1);
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|.
    The network also predicts variances (2 x img_channels outputs); D uses the first img_channels.
    """

    model_out_factor = 2

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",  # noqa: N803
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j) -> torch.Tensor:
        """The cosine schedule's alpha_bar at discrete step j (Nichol & Dhariwal 2021, eq. 17, as EDM writes it)."""
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index: bool = False) -> torch.Tensor:
        """The nearest of the supported noise levels ``u`` to each sigma (or its index j, with ``return_index``).

        Uses torch.cdist like EDM (whose distances, computed by matrix products, can break near-ties differently
        from an exact |u - sigma|), so the chosen level is EDM's.
        """
        sigma = torch.as_tensor(sigma)
        distances = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = distances.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


PRECONDITIONINGS: dict[str, type[EDMPreconditioning]] = {
    "EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "iDDPMPrecond": iDDPMPrecond,
}

# EDM's class names (as recorded in its pickles) -> fewstep's classes.
EDM_CLASSES: dict[str, type[nn.Module]] = {**PRECONDITIONINGS, **ARCHITECTURES}


def _plain(value):
    """OmegaConf containers (from a Hydra config) as plain lists and dicts; other values unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def edm_denoiser(data_shape: Sequence[int], num_classes: int = 0, precond: str = "EDMPrecond",
                 **init_kwargs) -> EDMPreconditioning:
    """An EDM denoiser for images of ``data_shape`` = [C, H, H] with ``num_classes`` labels (0: unconditional).

    ``precond`` names the preconditioning (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond); ``init_kwargs`` are its
    EDM constructor arguments (model_type, model_channels, ...). fewstep's model configs call this through Hydra.
    """
    if precond not in PRECONDITIONINGS:
        raise ConfigError(f"model.precond={precond!r} is not an EDM preconditioning: use one of {', '.join(PRECONDITIONINGS)}")
    shape = [int(s) for s in data_shape]
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(one_line(
            f"EDM's networks take square images [C, H, H], but the data shape is {shape}: choose square image data "
            f"or a non-EDM model (e.g. model=unet_small)"))
    kwargs = {key: _plain(value) for key, value in init_kwargs.items()}
    cls = PRECONDITIONINGS[precond]
    model_type = kwargs.get("model_type", inspect.signature(cls).parameters["model_type"].default)
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"model.model_type={model_type!r} is not an EDM architecture: use one of {', '.join(ARCHITECTURES)}")
    accepted = set(inspect.signature(cls).parameters) | set(inspect.signature(ARCHITECTURES[model_type]).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not an argument of {precond} or {model_type}: remove it from the model config")
    return cls(img_resolution=shape[1], img_channels=shape[0], label_dim=int(num_classes), **kwargs)
