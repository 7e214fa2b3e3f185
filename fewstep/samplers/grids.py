"""Noise-level grids for samplers; each ends with sigma = 0."""

from __future__ import annotations

import math

import torch


def karras_warp(u: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise level at u in [0, 1]: (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + u * (inv_rho_min - inv_rho_max)) ** rho


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022, eq. 5): n levels from sigma_max to sigma_min uniform in sigma^(1/rho), then 0."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    sigmas = karras_warp(torch.linspace(0, 1, n, dtype=torch.float64), sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_snr_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """n levels uniform in log-SNR (lambda = -ln sigma in EDM's space), then 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    sigmas[0] = sigma_max  # exactly, not exp(log(sigma_max))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform_t_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """n levels uniform in t, where EDM's schedule has sigma(t) = t, then 0."""
    sigmas = torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def nested_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras's warp at u = k/n, k = 0..n-1, then 0: the n-step grid lies inside the 2n-step one (distillation grids).

    The level u = 1 (sigma_min) is replaced by the final 0, so the last step lands on the data prediction.
    """
    sigmas = karras_warp(torch.arange(n, dtype=torch.float64) / n, sigma_min, sigma_max, rho)
    sigmas[0] = sigma_max
    return torch.cat([sigmas, sigmas.new_zeros(1)])


GRIDS = {"karras": karras_sigmas, "nested": nested_sigmas, "log_snr": log_snr_sigmas, "uniform_t": uniform_t_sigmas}
