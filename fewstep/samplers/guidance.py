"""Classifier-free guidance (Ho & Salimans 2022) in denoiser space, and in velocity space for Kac flows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewstep.errors import ConfigError


def guided_denoiser(
    denoiser: Callable[..., torch.Tensor], scale, class_labels: torch.Tensor, null_label: int
) -> Callable[..., torch.Tensor]:
    """D_w = (1 + w) D(x, sigma | y) - w D(x, sigma | empty); one batched call for both.

    ``scale`` w is a float or one per sample (a tensor [batch]). w = 0 is the plain conditional denoiser
    (and costs one conditional call only).
    """
    w = torch.as_tensor(scale, dtype=torch.float32)
    if (w < 0).any():
        raise ConfigError(f"guidance scale w={scale} is negative: use w >= 0 (0 is the plain conditional model)")
    unguided = not (w != 0).any()  # once, not per call: a per-sample w on a GPU would sync at every step

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if unguided:
            return denoiser(x, sigma, class_labels=class_labels)
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels)
        cond, uncond = both.chunk(2)
        scale_ = w.to(cond).view((-1,) + (1,) * (cond.ndim - 1)) if w.ndim else float(w)
        return (1 + scale_) * cond - scale_ * uncond

    return guided


# DistillKac's velocity-space guidance u_w = (1 + w) u(x, t | y) - w u(x, t | empty) is the same combination
# of a model's two outputs, with t in place of sigma.
guided_velocity = guided_denoiser
