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


def uncertainty_weighted_loss(
    denoised: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """EDM2's loss with learned uncertainty u(sigma) (Karras et al. 2024, eq. 21, after Kendall et al. 2018):
    lambda(sigma) / exp(u) |D - x0|^2 + u per coordinate, summed over the coordinates and averaged over the batch
    as EDM2 normalises it (weight and logvar broadcast as [batch, 1, ...]). Minimised over u, exp(u) is the expected
    weighted error at sigma, which levels the loss's contributions across noise levels."""
    per_coordinate = (weight / logvar.exp()) * ((denoised - x0) ** 2) + logvar
    return per_coordinate.flatten(1).sum(1).mean()
