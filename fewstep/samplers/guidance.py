"""Guidance in denoiser space: classifier-free guidance (Ho & Salimans 2022), autoguidance (Karras et al. 2024,
"Guiding a diffusion model with a bad version of itself") and guidance intervals (Kynkaanniemi et al. 2024,
"Applying guidance in a limited interval improves sample and distribution quality"); CFG also in velocity space
for Kac flows.

One convention for both guidances: D_w = (1 + w) D - w D_weak, w >= 0, w = 0 no guidance. CFG's D_weak is the
same network without the label; autoguidance's is a weaker model of the same data (the paper's w is 1 + w here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fewstep.errors import CheckpointError, ConfigError

INTERVAL_FIX = "give guidance_interval=[sigma_lo,sigma_hi] with 0 <= sigma_lo < sigma_hi (null: guidance at every sigma)"


def guidance_scale(scale) -> torch.Tensor:
    """w as a float32 tensor (a scalar, or one per sample), or a one-line ConfigError if any w is negative."""
    w = torch.as_tensor(scale, dtype=torch.float32)
    if (w < 0).any():
        raise ConfigError(f"guidance scale w={scale} is negative: use w >= 0 (0: no guidance)")
    return w


def check_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """(sigma_lo, sigma_hi) from ``guidance_interval`` (null: None, guidance everywhere), or a one-line ConfigError."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2:
        raise ConfigError(f"guidance_interval={interval} is not two noise levels: {INTERVAL_FIX}")
    try:
        lo, hi = (float(value) for value in interval)
    except (TypeError, ValueError):
        raise ConfigError(f"guidance_interval={list(interval)} holds a value that is not a number: {INTERVAL_FIX}") from None
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ConfigError(f"guidance_interval=[{lo:g}, {hi:g}]: {INTERVAL_FIX}")
    return lo, hi


def extrapolated(
    plain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pair: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scale, interval: Sequence[float] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(x, sigma) = (1 + w) D - w D_weak, where ``pair`` gives (D, D_weak) and ``plain`` D alone.

    With ``interval`` (sigma_lo, sigma_hi) guidance applies where sigma_lo < sigma <= sigma_hi (Kynkaanniemi et al.
    2024) and f = D elsewhere; a call with no sample inside costs D alone. w = 0 is ``plain`` itself.
    """
    w = guidance_scale(scale)
    bounds = check_interval(interval)
    if not (w != 0).any():  # once, not per call: a per-sample w on a GPU would sync at every step
        return plain

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        w_ = w.to(x).view(shape) if w.ndim else float(w)
        if bounds is not None:
            level = torch.as_tensor(sigma, device=x.device)
            inside = (level > bounds[0]) & (level <= bounds[1])
            if not inside.any():  # one sync per call, to save the weak model's evaluation outside the interval
                return plain(x, sigma)
            if not inside.all():
                w_ = w_ * inside.to(x.dtype).reshape(shape if inside.ndim else ())
        strong, weak = pair(x, sigma)
        return (1 + w_) * strong - w_ * weak

    return guided


def guided_denoiser(
    denoiser: Callable[..., torch.Tensor], scale, class_labels: torch.Tensor, null_label: int,
    interval: Sequence[float] | None = None,
) -> Callable[..., torch.Tensor]:
    """Classifier-free guidance: D_w = (1 + w) D(x, sigma | y) - w D(x, sigma | empty); one batched call for both.

    ``scale`` w is a float or one per sample (a tensor [batch]). w = 0 is the plain conditional denoiser
    (and costs one conditional call only). ``interval``: guidance only for sigma in (sigma_lo, sigma_hi].
    """

    def plain(x, sigma):
        return denoiser(x, sigma, class_labels=class_labels)

    def pair(x, sigma):
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
        sigmas = torch.cat([sigma, sigma]) if torch.is_tensor(sigma) and sigma.ndim else sigma
        return denoiser(torch.cat([x, x]), sigmas, class_labels=labels).chunk(2)

    return extrapolated(plain, pair, scale, interval)


def guided_by(
    denoiser: Callable[..., torch.Tensor], scale, class_labels: torch.Tensor | None = None, null_label: int | None = None,
    guide: Callable[..., torch.Tensor] | None = None, interval: Sequence[float] | None = None,
) -> Callable[..., torch.Tensor]:
    """``denoiser`` guided by what is given: autoguidance by the denoiser ``guide`` when there is one, else
    classifier-free guidance when ``class_labels`` are given, else ``denoiser`` itself."""
    if guide is not None:
        return autoguided_denoiser(denoiser, guide, scale, class_labels, interval)
    if class_labels is None:
        return denoiser
    return guided_denoiser(denoiser, scale, class_labels, null_label, interval)


def autoguided_denoiser(
    denoiser: Callable[..., torch.Tensor], guide: Callable[..., torch.Tensor], scale,
    class_labels: torch.Tensor | None = None, interval: Sequence[float] | None = None,
) -> Callable[..., torch.Tensor]:
    """Autoguidance (Karras et al. 2024): D_w = (1 + w) D(x, sigma | y) - w D_guide(x, sigma | y), both models given
    the same labels (None: unconditional); the paper's w is 1 + w. w = 0 is ``denoiser`` alone (the guide is never
    called); ``interval`` as for ``guided_denoiser``."""

    def plain(x, sigma):
        return denoiser(x, sigma, class_labels=class_labels)

    def pair(x, sigma):
        return plain(x, sigma), guide(x, sigma, class_labels=class_labels)

    return extrapolated(plain, pair, scale, interval)


def check_guide(model, guide, where: str = "the guide") -> None:
    """One line unless ``guide`` can guide ``model``: both EDM-space denoisers (what the diffusion samplers call) of
    the same data shape, class count and sigma_data."""
    for name, method in (("the model", model), (where, guide)):
        sampled = getattr(method, "sampled", None)
        if sampled != "denoiser":
            error = ConfigError if method is model else CheckpointError
            raise error(
                f"{name} is a {type(method).__name__}, sampled through its {sampled} and not an EDM-space denoiser "
                "D(x, sigma): autoguidance takes two denoisers (method=edm_teacher runs, their students, EDM or EDM2 "
                "pickles, diffusers folders)"
            )
    if getattr(model, "guided", False):  # consistency's student of a guided teacher: w is an input of its network
        raise ConfigError("this student takes its guidance scale w as an input of its network: sample it without guide=")
    if list(guide.hparams.data_shape) != list(model.hparams.data_shape):
        raise CheckpointError(
            f"{where} makes samples of shape {list(guide.hparams.data_shape)} and the model {list(model.hparams.data_shape)}: "
            "guide with a weaker model of the same data"
        )
    if guide.num_classes != model.num_classes:
        raise CheckpointError(
            f"{where} is conditioned on {guide.num_classes} classes and the model on {model.num_classes}: both take the "
            "same labels, so guide with a model of the same classes (0: unconditional)"
        )
    ours, theirs = model.hparams.get("sigma_data"), guide.hparams.get("sigma_data")
    if ours is not None and theirs is not None and float(ours) != float(theirs):
        raise CheckpointError(
            f"{where} was trained with sigma_data={theirs} and the model with sigma_data={ours}: guide with a model of the "
            "same data scale"
        )


# DistillKac's velocity-space guidance u_w = (1 + w) u(x, t | y) - w u(x, t | empty) is the same combination
# of a model's two outputs, with t in place of sigma.
guided_velocity = guided_denoiser
