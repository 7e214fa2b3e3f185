"""Samplers: one function per solver, one entry point ``sample`` that budgets network evaluations."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewstep.errors import ConfigError
from fewstep.samplers.grids import GRIDS, karras_sigmas
from fewstep.samplers.guidance import guided_denoiser, guided_velocity
from fewstep.samplers.kac import KAC_SOLVERS, check_kac_solver, check_min_nfe, sample_kac
from fewstep.samplers.noise import BrownianPath, SeededNoise
from fewstep.samplers.solver import Solver
from fewstep.samplers.solvers import (
    sample_consistency,
    sample_ddim,
    sample_dpmpp_2m,
    sample_edm_sde,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sample_lazy_2m,
    sample_lazy_ode,
    sample_lazy_sde,
    sample_seeds1,
    sample_seeds2,
    sample_seeds3,
)

SOLVERS: dict[str, Solver] = {
    "euler": Solver(sample_euler, lambda nfe: nfe),
    # Heun: 2 evaluations per step but 1 on the last one, so NFE = 2 * steps - 1.
    "heun": Solver(sample_heun, lambda nfe: (nfe + 1) // 2),
    "dpmpp_2m": Solver(sample_dpmpp_2m, lambda nfe: nfe),
    "ddim": Solver(sample_ddim, lambda nfe: nfe, stochastic=True),
    "euler_maruyama": Solver(sample_euler_maruyama, lambda nfe: nfe, stochastic=True),
    "edm_sde": Solver(sample_edm_sde, lambda nfe: (nfe + 1) // 2, stochastic=True),  # Heun steps: NFE = 2 * steps - 1
    # SEEDS-k: k evaluations per step, 1 on the last step (onto sigma = 0, where x = D): NFE = k (steps - 1) + 1.
    "seeds1": Solver(sample_seeds1, lambda nfe: nfe, stochastic=True),
    "seeds2": Solver(sample_seeds2, lambda nfe: (nfe - 1) // 2 + 1, stochastic=True),
    "seeds3": Solver(sample_seeds3, lambda nfe: (nfe - 1) // 3 + 1, stochastic=True),
    # multistep consistency sampling: x0 = f(x, sigma_i), renoised to sigma_{i+1} (consistency models, DMD2)
    "consistency": Solver(sample_consistency, lambda nfe: nfe, stochastic=True),
    "lazy_ode": Solver(sample_lazy_ode, lambda nfe: nfe),
    "lazy_2m": Solver(sample_lazy_2m, lambda nfe: nfe),  # Adams-Bashforth 2 in the lazy schedule's time
    "lazy_sde": Solver(sample_lazy_sde, lambda nfe: nfe, stochastic=True),
}


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (NFE), so that NFE is measured, not assumed."""

    def __init__(self, denoiser: Callable[..., torch.Tensor]):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, **cond)


def check_solver(sampler: str, nfe: int, kac: bool | None = None):
    """The named solver, or a one-line ConfigError for an unknown name or an NFE below its minimum.

    ``kac``: True for a Kac model (Kac samplers only), False for a diffusion model, None for either.
    """
    if sampler in KAC_SOLVERS and kac is not False:
        return check_kac_solver(sampler, nfe)
    if kac:
        check_kac_solver(sampler, nfe)  # names the Kac samplers
    if sampler in KAC_SOLVERS:
        raise ConfigError(
            f"sampler '{sampler}' integrates a Kac flow and this is a diffusion model: choose one of {', '.join(sorted(SOLVERS))}"
        )
    if sampler not in SOLVERS:
        choices = sorted(SOLVERS) + ([] if kac is False else sorted(KAC_SOLVERS))
        raise ConfigError(f"unknown sampler '{sampler}': choose one of {', '.join(choices)}")
    return check_min_nfe(sampler, SOLVERS[sampler], nfe)


def sample(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sampler: str,
    nfe: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    generator: SeededNoise | None = None,
    rho: float = 7.0,
    callback: Callable | None = None,
    grid: str = "karras",
    **solver_options,
) -> torch.Tensor:
    """Draw samples from ``denoiser`` starting at ``sigma_max * noise``, with at most ``nfe`` denoiser calls.

    ``generator`` (a SeededNoise over the batch's seeds) draws SDE noise per sample; ``solver_options``
    go to the solver (e.g. ``s_churn`` for edm_sde).
    """
    solver = check_solver(sampler, nfe, kac=False)
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if grid not in GRIDS:
        raise ConfigError(f"unknown time grid '{grid}': choose one of {', '.join(sorted(GRIDS))}")
    steps = solver.steps_for_nfe(nfe)
    if grid in ("karras", "nested"):
        sigmas = GRIDS[grid](steps, sigma_min, sigma_max, rho)
    else:
        sigmas = GRIDS[grid](steps, sigma_min, sigma_max)
    sigmas = sigmas.to(noise.device)
    x = noise.to(torch.float64 if noise.dtype == torch.float64 else torch.float32) * sigma_max
    return solver.fn(denoiser, x, sigmas.to(x.dtype), noise=generator, callback=callback, **solver_options)


__all__ = [
    "GRIDS", "SOLVERS", "BrownianPath", "CountingDenoiser", "KAC_SOLVERS", "SeededNoise", "Solver", "check_solver",
    "guided_denoiser", "guided_velocity", "karras_sigmas", "sample", "sample_kac",
]
