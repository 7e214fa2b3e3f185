"""The linear interpolant of flow matching, and its conversion to EDM's sigma space.

x_t = (1 - t) x0 + t n, velocity u = n - x0. Dividing by (1 - t) gives x0 + sigma n with
sigma = t / (1 - t), so a velocity model is also a denoiser: x0_hat = x_t - t u(x_t, t).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewstep.processes import schedules


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t n, with t of shape [batch]."""
    t = t.view((-1,) + (1,) * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = n - x0."""
    return noise - x0


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma / (1 + sigma)


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    return t / (1 - t)


def logit_normal_times(
    n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)), the SD3 training distribution of times."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def denoiser_from_velocity(velocity: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Turn ``velocity(x_t, t, **cond)`` into ``denoiser(x, sigma, **cond)`` in EDM's sigma space."""
    return schedules.denoiser_from_velocity(velocity, schedules.Linear())
