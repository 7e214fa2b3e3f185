"""EDM2's magnitude-preserving networks and preconditioning, state_dict-compatible with NVlabs/edm2.

Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving the Training Dynamics of Diffusion Models"
(CVPR 2024, https://github.com/NVlabs/edm2), configuration G. This is fewstep's own implementation; what it shares
with EDM2's ``training/networks_edm2.py`` is the interface: constructor arguments and defaults, module, parameter and
buffer names, and the order of floating-point operations, so that an EDM2 snapshot's ``state_dict`` loads with
``strict=True`` and gives EDM2's D(x; sigma) in float32.

Every layer keeps the magnitude (root mean square) of its input: weights are normalised to unit norm per output
channel on the fly (``MPConv``), and in training also in place, once after each update (forced weight normalisation);
there are no biases and no normalisation layers' gains, only the learned scalars ``emb_gain`` and ``out_gain``.

- ``EDM2UNet`` (EDM2's ``UNet``), ``Block``, ``MPConv``, ``MPFourier`` and mp_silu / mp_sum / mp_cat;
- ``EDM2Precond`` (EDM2's ``Precond``): EDM's preconditioning around the UNet, with the log-variance head u(sigma)
  of the uncertainty-weighted loss, a ``PreconditionedDenoiser`` called as ``D(x, sigma, class_labels=None)``;
- ``EDM2_CLASSES`` (EDM2's class names -> classes) and ``edm2_denoiser`` (the Hydra model factory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fewstep.errors import ConfigError, one_line
from fewstep.networks.edm import downsample_2x, encoder_feature_modules, fir_filter_2d, upsample_2x
from fewstep.networks.preconditioning import PreconditionedDenoiser

# ---------------------------------------------------------------------------------------------------------------
# Magnitude-preserving operations


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(N)) over ``dim`` (default: all but the first): unit root-mean-square magnitude.

    The norm is taken in float32 whatever x's dtype; N is the number of elements each norm covers.
    """
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude for unit-variance Gaussian input (the paper's eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, divided by sqrt((1 - t)^2 + t^2) so that unit-magnitude inputs give a unit-magnitude sum
    (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` with the weights (1 - t) and t on the two parts' total contributions, the result
    of unit magnitude (eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    w_a = scale / math.sqrt(n_a) * (1 - t)
    w_b = scale / math.sqrt(n_b) * t
    return torch.cat([w_a * a, w_b * b], dim=dim)


def resample(x: torch.Tensor, resample_filter: Sequence[float], mode: str) -> torch.Tensor:
    """x as it is ('keep'), or 2x down/up-sampled per channel with the separable FIR filter ``resample_filter``."""
    if mode == "keep":
        return x
    f = fir_filter_2d(resample_filter).to(x.device, x.dtype)
    padding = (f.shape[-1] - 1) // 2
    return downsample_2x(x, f, padding) if mode == "down" else upsample_2x(x, f, padding)


class MPFourier(nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f x + phi)) with f ~ N(0, bandwidth^2), phi ~ U(0, 1) (eq. 75): unit magnitude.

    ``freqs`` = 2 pi f and ``phases`` = 2 pi phi are buffers; computed in float32, returned in x's dtype.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """A magnitude-preserving convolution (``kernel`` [k, k]) or fully connected layer (``kernel`` []), no bias (eq. 47).

    The weight of each output channel is normalised to unit magnitude and scaled by gain / sqrt(fan_in) when used.
    In training the stored weight is also normalised in place first (forced weight normalisation, eq. 66), so that its
    norm cannot grow under the optimiser's updates and the effective learning rate stays fixed. EDM2 does this at
    every training forward; here at the first training forward after the weight changed (an optimiser step, a load),
    and never inside a torch.func transform: a method that calls the network twice in one graph (a student and its
    critic, a JVP) would otherwise find a weight it saved for backward rewritten. A second normalisation of a
    normalised weight changes it by O(eps) relative, so the function computed is EDM2's to float tolerance.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.normalized_as: tuple[int, int] | None = None  # (storage, version) of the weight when last normalised

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training and self.weight_changed() and torch._C._functorch.peek_interpreter_stack() is None:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation (an in-place write, outside autograd)
            self.normalized_as = (self.weight.data_ptr(), self.weight._version)
        w = normalize(w)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def weight_changed(self) -> bool:
        """Whether the stored weight was written since its last forced normalisation (or never normalised)."""
        return self.normalized_as != (self.weight.data_ptr(), self.weight._version)


# ---------------------------------------------------------------------------------------------------------------
# Architecture


class Block(nn.Module):
    """An encoder ('enc') or decoder ('dec') block of the magnitude-preserving UNet (the paper's Fig. 21).

    Main path: optional 2x resampling; in the encoder a 1x1 ``conv_skip`` when the width changes, then pixel norm.
    Residual branch: mp_silu -> conv_res0 -> times (1 + emb_gain emb_linear(emb)) -> mp_silu -> dropout -> conv_res1;
    joined by mp_sum with weight ``res_balance`` (the decoder's ``conv_skip`` on the main path first). Optional
    multi-head self-attention with pixel-normalised q, k, v (cosine attention), joined by mp_sum with weight
    ``attn_balance``; activations clipped to +-``clip_act``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ConfigError(f"EDM2 Block flavor={flavor!r}, resample_mode={resample_mode!r}: use enc|dec and keep|up|down")
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = list(resample_filter), resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attend(x), t=self.attn_balance)
        return x if self.clip_act is None else x.clip(-self.clip_act, self.clip_act)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head cosine self-attention over pixels; qkv's channels are laid out as [head, channel, (q, k, v)]."""
        qkv = self.attn_qkv(x)
        qkv = qkv.reshape(qkv.shape[0], self.num_heads, -1, 3, qkv.shape[2] * qkv.shape[3])
        q, k, v = normalize(qkv, dim=2).unbind(3)
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        mixed = torch.einsum("nhqk,nhck->nhcq", weights, v)
        return self.attn_proj(mixed.reshape(*x.shape))


class EDM2UNet(nn.Module):
    """EDM2's UNet (configuration G, Fig. 21), called as F(x, noise_labels, class_labels).

    Widths model_channels x channel_mult per resolution; ``num_blocks`` encoder blocks per resolution (a down block
    before each but the first) and num_blocks + 1 decoder blocks (an up block before each but the lowest, where two
    blocks, the first with attention, form the bottleneck); skips joined by mp_cat with weight ``concat_balance``.
    The embedding is mp_silu(mp_sum(emb_noise(MPFourier(c_noise)), emb_label(one-hot sqrt(label_dim)), label_balance)).
    The input gets a constant channel of ones (the network's only way to an offset); the output is scaled by the
    learned ``out_gain`` (zero at initialisation, so F starts at 0). Modules live under EDM2's names in ``enc`` and
    ``dec`` (``{res}x{res}_conv``, ``_block{i}``, ``_down``, ``_up``, ``_in0``, ``_in1``).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs):
        super().__init__()
        widths = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        c = img_channels + 1  # the input and its constant channel
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(c, width, kernel=[3, 3])
                c = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(c, c, emb_channels, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(c, width, emb_channels, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)
                c = width

        self.dec = nn.ModuleDict()
        skips = [module.out_channels for module in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(c, c, emb_channels, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(c, c, emb_channels, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(c, c, emb_channels, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = Block(c + skips.pop(), width, emb_channels, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
                c = width
        self.out_conv = MPConv(c, img_channels, kernel=[3, 3])

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning embedding of each sample: [batch, emb_channels]."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def feature_modules(self) -> list[nn.Module]:
        """The encoder's last block at each resolution, then the bottleneck (the decoder's ``_in1`` block)."""
        return encoder_feature_modules(self.enc, self.dec)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if "_block" in name:  # decoder blocks take the matching encoder activation
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning


def label_vectors(class_labels, label_dim: int, device) -> torch.Tensor | None:
    """The network's label input: None (unconditional), the zero vector for no labels, or one-hot [batch, label_dim]
    from integer labels (the index ``label_dim`` means "no label") or from EDM2's float vectors."""
    if not label_dim:
        return None
    if class_labels is None:
        return torch.zeros([1, label_dim], device=device)
    labels = torch.as_tensor(class_labels, device=device)
    if labels.is_floating_point():
        return labels.to(torch.float32).reshape(-1, label_dim)
    return F.one_hot(labels.reshape(-1).long(), label_dim + 1)[:, :label_dim].to(torch.float32)


class EDM2Precond(PreconditionedDenoiser):
    """EDM2's ``Precond``: D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4) with EDM's coefficients (Karras et
    al. 2022, Table 1) around ``EDM2UNet``, and the uncertainty head u(sigma) = logvar_linear(MPFourier(c_noise)) of
    the loss weighting (EDM2, eq. 21).

    ``forward(x, sigma, class_labels=None, return_logvar=False)`` returns D in float32 (and u, [batch, 1, 1, 1]);
    sigma is a float or a [batch] tensor; ``use_fp16`` runs the UNet in float16, on CUDA only (as EDM2).
    """

    sigma_min, sigma_max = 0.0, float("inf")  # continuous in sigma, as EDMPrecond

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x: torch.Tensor, sigma, class_labels=None, force_fp32: bool = False, return_logvar: bool = False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(x.shape[0])
        sigma = sigma.reshape(-1, 1, 1, 1)
        labels = label_vectors(class_labels, self.label_dim, x.device)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32

        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar(c_noise).reshape(-1, 1, 1, 1)
        return D_x

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """u(sigma), the log-variance of the loss at noise label c_noise = ln(sigma) / 4: [batch, 1]."""
        return self.logvar_linear(self.logvar_fourier(c_noise))

    def round_sigma(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def feature_modules(self) -> list[nn.Module]:
        return self.unet.feature_modules()


# EDM2's class names (as recorded in its pickles) -> fewstep's classes.
EDM2_CLASSES: dict[str, type[nn.Module]] = {"Precond": EDM2Precond, "UNet": EDM2UNet}


def edm2_denoiser(data_shape: Sequence[int], num_classes: int = 0, model_channels: int = 192,
                  channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                  channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                  label_balance: float = 0.5, concat_balance: float = 0.5, resample_filter: Sequence[float] = (1, 1),
                  channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                  clip_act: float | None = 256, use_fp16: bool = False, sigma_data: float = 0.5,
                  logvar_channels: int = 128) -> EDM2Precond:
    """An EDM2 denoiser for images of ``data_shape`` = [C, H, H] with ``num_classes`` labels (0: unconditional).

    The other arguments are EDM2's (Precond, UNet and Block; EDM2's defaults, except ``use_fp16``, which EDM2's
    training turns on). fewstep's model configs (``model=edm2_img64_{s,m,l,xl}``) call this through Hydra.
    """
    shape = [int(s) for s in data_shape]
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(one_line(
            f"EDM2's networks take square images [C, H, H], but the data shape is {shape}: choose square image data "
            f"or a non-EDM2 model (e.g. model=unet_small)"))
    halvings = len(channel_mult) - 1
    if halvings < 0 or shape[1] % (1 << halvings):
        raise ConfigError(f"model.channel_mult={list(channel_mult)} halves the resolution {max(halvings, 0)} times, so "
                          f"it must be divisible by {1 << max(halvings, 0)}, not {shape[1]}: use fewer levels or other data")
    return EDM2Precond(img_resolution=shape[1], img_channels=shape[0], label_dim=int(num_classes), use_fp16=use_fp16,
                       sigma_data=sigma_data, logvar_channels=logvar_channels, model_channels=model_channels,
                       channel_mult=list(channel_mult), channel_mult_noise=channel_mult_noise,
                       channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=list(attn_resolutions),
                       label_balance=label_balance, concat_balance=concat_balance, resample_filter=list(resample_filter),
                       channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                       attn_balance=attn_balance, clip_act=clip_act)
