"""Gaussian noising in EDM's unscaled sigma space: x = x0 + sigma * n."""

from __future__ import annotations

import torch


def edm_training_sigmas(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), the EDM training distribution of noise levels."""
    return (p_mean + p_std * torch.randn(n, generator=generator, device=device)).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the effective target unit-variance."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
