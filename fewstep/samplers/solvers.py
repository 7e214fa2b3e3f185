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


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); no correction on the step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_next = x + d * dt
            d_next = (x_next - denoiser(x_next, _sigma(x, sigmas[i + 1]))) / sigmas[i + 1]
            x = x + (d + d_next) / 2 * dt
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


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
