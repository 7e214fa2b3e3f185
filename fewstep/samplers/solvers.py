"""ODE/SDE solvers in the k-diffusion form: ``solver(denoiser, x, sigmas, noise=None, callback=None) -> x``.

``denoiser(x, sigma)`` returns x0_hat with sigma of shape [batch]; ``sigmas`` is a decreasing grid
ending at 0; ``noise`` is a SeededNoise for stochastic solvers; ``callback`` gets a dict per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sigma(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value.to(x.dtype).expand(x.shape[0])


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1 without correction)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); no correction on the step to sigma = 0.

    It is EDM's stochastic sampler without churn, so it shares that code.
    """
    return sample_edm_sde(denoiser, x, sigmas, noise, callback, s_churn=0.0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep in lambda = -ln sigma, 1 NFE per step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised  # the exponential step to sigma = 0 lands on the data prediction
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            effective = denoised
            if old_denoised is not None:
                r = h_last / h
                effective = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * effective
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


def _randn_like(x: torch.Tensor, noise) -> torch.Tensor:
    """Per-sample noise from a SeededNoise (seed-per-image), else from the global generator."""
    if noise is None:
        return torch.randn_like(x)
    return noise.randn(x.shape[1:], dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_edm_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None,
    s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): churn noise up to sigma_hat, then a Heun step."""
    n = len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (1 + gamma)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigmas[i] ** 2).sqrt() * s_noise * _randn_like(x, noise)
        denoised = denoiser(x, _sigma(x, sigma_hat))
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        x_next = x + d * dt
        if sigmas[i + 1] != 0:
            d_next = (x_next - denoiser(x_next, _sigma(x, sigmas[i + 1]))) / sigmas[i + 1]
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space: eta = 0 is deterministic (Euler), eta = 1 is DDPM's ancestral step."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.clamp(eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt(), max=sigma_next)
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_up > 0:
            x = x + sigma_up * _randn_like(x, noise)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler_maruyama(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = -2 sigma score dsigma + sqrt(2 sigma) dW (Song et al. 2021, sigma(t) = t)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            x = denoised  # the last step returns the data prediction, without noise
        else:
            x = x + 2 * (x - denoised) / sigma * (sigma_next - sigma)
            x = x + (2 * sigma * (sigma - sigma_next)).sqrt() * _randn_like(x, noise)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x
