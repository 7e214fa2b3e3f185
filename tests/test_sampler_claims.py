"""The mixture benchmark's sampler claims: the second-order lazy solver (lazy_2m) and the SEEDS-2 weights (tools/bench_samplers.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.data import GaussianMixture
from fewstep.samplers import SOLVERS, CountingDenoiser, sample
from fewstep.samplers.grids import GRIDS
from fewstep.samplers.solvers import sample_seeds2, sample_seeds3


def gaussian(std: float):
    """The exact denoiser of N(0, std^2 I) and the exact probability-flow map from sigma_max to 0."""

    def denoiser(x, sigma, **_):
        return x * (std**2 / (std**2 + sigma**2)).view(-1, *[1] * (x.ndim - 1))

    def flow(x_max, sigma_max):
        return x_max * std / math.sqrt(std**2 + sigma_max**2)

    return denoiser, flow


NOISE = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)[:, None]


def slopes(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_lazy_2m_is_registered_like_lazy_ode():
    counted = CountingDenoiser(gaussian(1.0)[0])
    sample(counted, NOISE, "lazy_2m", 7, sigma_data=0.5)
    assert counted.nfe == 7 and not SOLVERS["lazy_2m"].stochastic


@pytest.mark.parametrize("sigma_data", [0.5, 2.0])
def test_lazy_2m_converges_at_order_two_and_lazy_ode_at_one(sigma_data):
    # Data N(0, 1) and a lazy schedule built for another scale: the velocity is not zero, the ODE is non-trivial.
    denoiser, flow = gaussian(1.0)
    exact = flow(NOISE * 80.0, 80.0)

    def errors(name, steps):
        return [(sample(denoiser, NOISE, name, n, sigma_data=sigma_data) - exact).abs().max().item() for n in steps]

    second = slopes(errors("lazy_2m", (64, 128, 256)))
    first = slopes(errors("lazy_ode", (128, 256, 512)))
    assert all(abs(s - 2) < 0.25 for s in second), second
    assert all(abs(s - 1) < 0.25 for s in first), first


def test_lazy_2m_converges_at_order_two_on_a_mixture():
    mixture = GaussianMixture.benchmark(dim=2, modes=4, radius=1.0, std=0.3)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = sample(mixture.denoiser, x, "lazy_2m", 1024, sigma_data=0.5)
    errors = [(sample(mixture.denoiser, x, "lazy_2m", n, sigma_data=0.5) - reference).abs().max().item() for n in (64, 128, 256)]
    assert all(abs(s - 2) < 0.3 for s in slopes(errors)), errors


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_lazy_2m_is_exact_for_gaussian_data_at_its_scale(steps):
    # On the lazy schedule the velocity of N(0, sd^2 I) data is identically zero: every step count is exact.
    denoiser, flow = gaussian(0.7)
    x = sample(denoiser, NOISE, "lazy_2m", steps, sigma_data=0.7)
    torch.testing.assert_close(x, flow(NOISE * 80.0, 80.0), rtol=1e-10, atol=1e-12)


class ZeroNoise:
    """A noise source whose every draw is zero: the SEEDS step without its noise."""

    def increment(self, sigma, sigma_next, shape, dtype=torch.float32):
        return torch.zeros(1, *shape, dtype=dtype)

    def randn(self, shape, dtype=torch.float32):
        return torch.zeros(1, *shape, dtype=dtype)


def linear_in_lambda(x, sigma, **_):
    """A denoiser linear in lambda = -ln sigma (and constant in x): 0.3 - 0.2 lambda."""
    return torch.full_like(x, 1.0) * (0.3 + 0.2 * sigma.log()).view(-1, 1)


@pytest.mark.parametrize("solver", [sample_seeds2, sample_seeds3])
def test_seeds_integrate_a_denoiser_linear_in_log_snr_exactly_over_a_long_step(solver):
    # Without noise a SEEDS step solves dx = 2 (D - x) dlambda. With D linear in lambda the solution is
    # x_t = e^{-2h} x_s + (1 - e^{-2h}) D_s + D' [h - (1 - e^{-2h}) / 2]; the exponential (phi_2) weights
    # integrate that interpolant exactly for any h. SEEDS-2's former weights (D_2 alone at c2 = 1/2) miss
    # by ~0.05 at h = 3, the size of steps at 4-12 NFE.
    sigma_s, sigma_t = 20.0, 20.0 * math.exp(-3.0)
    h, slope = 3.0, -0.2  # D' = dD / dlambda
    x_s = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)[:, None]
    d_s = 0.3 + 0.2 * math.log(sigma_s)
    expected = math.exp(-2 * h) * x_s + -math.expm1(-2 * h) * d_s + slope * (h + math.expm1(-2 * h) / 2)
    x_t = solver(linear_in_lambda, x_s, torch.tensor([sigma_s, sigma_t], dtype=torch.float64), noise=ZeroNoise())
    torch.testing.assert_close(x_t, expected, rtol=1e-12, atol=1e-12)


def test_seeds2_former_weights_remain_an_option_and_differ():
    x_s = torch.zeros(3, 1, dtype=torch.float64)
    sigmas = torch.tensor([20.0, 20.0 * math.exp(-3.0)], dtype=torch.float64)
    new = sample_seeds2(linear_in_lambda, x_s, sigmas, noise=ZeroNoise())
    old = sample_seeds2(linear_in_lambda, x_s, sigmas, noise=ZeroNoise(), weights="phi1")
    assert (new - old).abs().min() > 0.02
    with pytest.raises(ValueError, match="weights"):
        sample_seeds2(linear_in_lambda, x_s, sigmas, weights="phi3")


def test_seeds2_weights_agree_as_the_step_shrinks():
    # Both weightings are second-order: on a fine grid they approach each other at O(h^2) per unit lambda.
    mixture = GaussianMixture.benchmark(dim=2, modes=4, radius=1.0, std=0.3)
    x = mixture.sample(32, generator=torch.Generator().manual_seed(1))[0] + 20.0 * torch.randn(
        32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gaps = []
    for n in (32, 64, 128):
        grid = GRIDS["log_snr"](n + 1, 0.05, 20.0)[:-1]
        gaps.append((sample_seeds2(mixture.denoiser, x, grid, noise=ZeroNoise())
                     - sample_seeds2(mixture.denoiser, x, grid, noise=ZeroNoise(), weights="phi1")).abs().max().item())
    assert all(1.6 < s < 2.4 for s in slopes(gaps)), gaps


def test_the_kdiffusion_peer_leaves_a_package_that_others_can_still_find(monkeypatch):
    """fewstep.bench imports k_diffusion.sampling without the package's __init__ for the benchmarks. The package it
    leaves in sys.modules must keep its spec: diffusers' import calls find_spec("k_diffusion") and failed after it."""
    import importlib.util
    import sys

    from fewstep.bench import kdiffusion_sampling

    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed")
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        monkeypatch.delitem(sys.modules, name)
    sampling = kdiffusion_sampling()
    assert sampling is not None and hasattr(sampling, "sample_dpmpp_2m_sde")
    assert importlib.util.find_spec("k_diffusion") is not None
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[name]  # not restored: later tests import the package whole, as users do
