"""TrigFlow (Lu & Song 2024, arXiv 2410.11081): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2],
and its exact conversions to and from EDM's sigma space.

The probability-flow ODE is dx_t/dt = sigma_d F(x_t, t). Dividing x_t by cos(t) gives x0 + sigma n with
sigma = sigma_d tan(t), so EDM's D(x, sigma) and TrigFlow's F are one model written twice:

    F(x_t, t) = (cos(t) x_t - D(x_t / cos(t), sigma_d tan(t))) / (sigma_d sin(t)),
    D(x, sigma) = cos(t) x_t - sigma_d sin(t) F(x_t, t)   at x_t = cos(t) x.

With EDM's preconditioning (c_skip = cos^2 t, c_out = sigma_d sin t, c_in x = x_t / sigma_d) the network's raw
output is -F, so a TrigFlow model can start exactly at an EDM teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _batch(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape [batch] (or a scalar) broadcast over the trailing dimensions of ``like``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * (like.ndim - 1)) if t.ndim else t


def sigma_to_t(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """t = arctan(sigma / sigma_d)."""
    return torch.atan2(torch.as_tensor(sigma), torch.full_like(torch.as_tensor(sigma), sigma_data))


def t_to_sigma(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """sigma = sigma_d tan(t)."""
    return sigma_data * torch.tan(torch.as_tensor(t))


def interpolate(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t) x0 + sin(t) z (z of standard deviation sigma_d)."""
    t = _batch(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def velocity_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The conditional velocity dx_t/dt = cos(t) z - sin(t) x0, whose mean given x_t is sigma_d F."""
    t = _batch(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


def proposal_times(
    n: int, p_mean: float, p_std: float, sigma_data: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """sCM's proposal: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d) (log-normal sigma, as EDM's)."""
    tau = p_mean + p_std * torch.randn(n, generator=generator, device=device)
    return torch.atan(tau.exp() / sigma_data)


def velocity_from_denoised(x_t: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """F = (cos(t) x_t - D) / (sigma_d sin(t))."""
    t = _batch(t, x_t)
    return (torch.cos(t) * x_t - denoised) / (sigma_data * torch.sin(t))


def denoised_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """D = cos(t) x_t - sigma_d sin(t) F: also the consistency function f(x_t, t) of a consistency model's F."""
    t = _batch(t, x_t)
    return torch.cos(t) * x_t - sigma_data * torch.sin(t) * velocity


def trigflow_velocity(denoiser: Callable[..., torch.Tensor], sigma_data: float) -> Callable[..., torch.Tensor]:
    """``denoiser(x, sigma, **cond)`` in EDM's space (any fewstep teacher, EDM pickle, diffusers folder) as
    ``F(x_t, t, **cond)`` of TrigFlow (t of shape [batch]; 0 < t < pi/2)."""

    def velocity(x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        denoised = denoiser(x_t / _batch(torch.cos(t), x_t), t_to_sigma(t, sigma_data), **cond)
        return velocity_from_denoised(x_t, denoised.to(x_t.dtype), t, sigma_data)

    return velocity


def edm_denoiser(velocity: Callable[..., torch.Tensor], sigma_data: float) -> Callable[..., torch.Tensor]:
    """TrigFlow's ``F(x_t, t, **cond)`` as ``denoiser(x, sigma, **cond)`` in EDM's space, for every fewstep solver."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        t = sigma_to_t(sigma, sigma_data)
        x_t = _batch(torch.cos(t), x) * x
        return denoised_from_velocity(x_t, velocity(x_t, t, **cond).to(x.dtype), t, sigma_data)

    return denoiser


__all__ = [
    "denoised_from_velocity", "edm_denoiser", "interpolate", "proposal_times", "sigma_to_t", "t_to_sigma",
    "trigflow_velocity", "velocity_from_denoised", "velocity_target",
]
