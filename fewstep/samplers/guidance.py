"""Classifier-free guidance in denoiser space (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def guided_denoiser(
    denoiser: Callable[..., torch.Tensor], scale: float, class_labels: torch.Tensor, null_label: int
) -> Callable[..., torch.Tensor]:
    """D_w = (1 + w) D(x, sigma | y) - w D(x, sigma | empty); one batched call for both.

    w = 0 is the plain conditional denoiser (and costs one conditional call only).
    """
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if scale == 0:
            return denoiser(x, sigma, class_labels=class_labels)
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels)
        cond, uncond = both.chunk(2)
        return (1 + scale) * cond - scale * uncond

    return guided
