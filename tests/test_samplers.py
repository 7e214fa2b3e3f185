"""Samplers: grids, NFE accounting, seed-per-sample noise, guidance, and convergence on exact Gaussian data."""

import math

import pytest
import torch

from fewstep.errors import ConfigError
from fewstep.samplers.solvers import sample_dpmpp_2m, sample_euler, sample_heun
from fewstep.samplers import CountingDenoiser, SeededNoise, guided_denoiser, karras_sigmas, sample

SD = 0.5  # data std of the analytic Gaussian


def gaussian_denoiser(x, sigma, **_):
    """Exact E[x0 | x] for x0 ~ N(0, SD^2 I)."""
    return x * (SD**2 / (SD**2 + sigma**2)).view(-1, *[1] * (x.ndim - 1))


def exact_ode_endpoint(noise, sigma_max, sigma_min):
    # The probability-flow ODE of Gaussian data scales x by sqrt(SD^2 + sigma^2).
    return noise * sigma_max * math.sqrt((SD**2 + sigma_min**2) / (SD**2 + sigma_max**2))


def test_karras_grid():
    s = karras_sigmas(18, 0.002, 80.0)
    assert len(s) == 19 and s[-1] == 0
    assert math.isclose(s[0], 80.0) and math.isclose(s[-2], 0.002, rel_tol=1e-9)
    assert torch.all(s[:-1] > s[1:])


@pytest.mark.parametrize("sampler,nfe,expected", [("euler", 7, 7), ("heun", 35, 35), ("heun", 34, 33), ("heun", 1, 1), ("dpmpp_2m", 10, 10)])
def test_nfe_is_counted_and_within_budget(sampler, nfe, expected):
    counted = CountingDenoiser(gaussian_denoiser)
    sample(counted, torch.randn(4, 3), sampler, nfe)
    assert counted.nfe == expected


def test_bad_input():
    with pytest.raises(ConfigError, match="choose one of"):
        sample(gaussian_denoiser, torch.randn(2, 2), "nope", 4)
    with pytest.raises(ConfigError, match="nfe>=1"):
        sample(gaussian_denoiser, torch.randn(2, 2), "heun", 0)
    with pytest.raises(ConfigError, match="sigma_min"):
        sample(gaussian_denoiser, torch.randn(2, 2), "heun", 4, sigma_min=90.0)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_gaussian_data(sampler, order):
    # Stop at sigma_min (no final jump to 0) to measure the ODE discretisation error alone.
    noise = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}[sampler]
    exact = exact_ode_endpoint(noise, 80.0, 0.02)
    errors = []
    for n in (16, 32, 64):
        sigmas = karras_sigmas(n, 0.02, 80.0, rho=7.0).double()[:-1]
        x = solver(gaussian_denoiser, noise * 80.0, sigmas)
        errors.append((x - exact).abs().max().item())
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(o - order) < 0.35 for o in observed), (errors, observed)


def test_samples_depend_on_their_own_seed_only():
    seeds = list(range(10, 18))
    noise_all = SeededNoise(seeds).randn((3, 4))
    noise_sub = SeededNoise(seeds[3:5]).randn((3, 4))
    torch.testing.assert_close(noise_all[3:5], noise_sub)
    assert not torch.allclose(noise_all[0], noise_all[1])


def test_guidance_zero_is_conditional_and_extrapolates():
    def denoiser(x, sigma, class_labels=None):
        return x * 0 + class_labels.view(-1, 1).float()

    labels = torch.tensor([1, 2])
    x, sigma = torch.zeros(2, 3), torch.ones(2)
    torch.testing.assert_close(guided_denoiser(denoiser, 0.0, labels, null_label=0)(x, sigma), denoiser(x, sigma, labels))
    # (1 + w) * y - w * 0 with the null label 0
    torch.testing.assert_close(guided_denoiser(denoiser, 2.0, labels, null_label=0)(x, sigma), 3 * denoiser(x, sigma, labels))


@pytest.mark.parametrize("sampler", sorted(__import__("fewstep.samplers", fromlist=["SOLVERS"]).SOLVERS))
def test_every_sampler_converges_to_the_gaussian_law(sampler):
    # With the exact denoiser of N(0, SD^2) from sigma_max = 80, the sample std approaches SD as NFE grows
    # (at 20 NFE the discretisation error is still 5-20%; by 200 NFE it is under 2%).
    noise = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # SDE noise from the global generator
    # EDM's s_noise = 1.003 inflates the variance on purpose (for ImageNet); the law test wants 1.
    options = {"s_noise": 1.0} if sampler == "edm_sde" else {}
    errors = [abs(sample(gaussian_denoiser, noise, sampler, nfe=n, **options).std().item() / SD - 1) for n in (20, 60, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors


def test_other_time_grids():
    from fewstep.samplers import GRIDS

    log_snr = GRIDS["log_snr"](9, 0.01, 100.0)
    steps = log_snr[:-1].log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()))  # uniform in lambda
    uniform = GRIDS["uniform_t"](5, 0.5, 2.5)
    torch.testing.assert_close(uniform, torch.tensor([2.5, 2.0, 1.5, 1.0, 0.5, 0.0], dtype=torch.float64))
    for name, grid in GRIDS.items():
        s = grid(1, 0.002, 80.0)
        assert s.tolist() == [80.0, 0.0], name
    counted = CountingDenoiser(gaussian_denoiser)
    sample(counted, torch.randn(3, 2), "heun", 9, grid="log_snr")
    assert counted.nfe == 9
    with pytest.raises(ConfigError, match="unknown time grid"):
        sample(gaussian_denoiser, torch.randn(2, 2), "heun", 4, grid="cosine")


def test_edm_sde_noise_is_per_sample_and_churn_zero_is_heun():
    seeds = list(range(6))
    noise = SeededNoise(seeds).randn((3,), dtype=torch.float64)
    whole = sample(gaussian_denoiser, noise, "edm_sde", 9, generator=SeededNoise(seeds))
    parts = torch.cat([
        sample(gaussian_denoiser, noise[:2], "edm_sde", 9, generator=SeededNoise(seeds[:2])),
        sample(gaussian_denoiser, noise[2:], "edm_sde", 9, generator=SeededNoise(seeds[2:])),
    ])
    torch.testing.assert_close(whole, parts)  # a sample depends on its own seed, not on the batch
    heun = sample(gaussian_denoiser, noise, "heun", 9)
    assert not torch.allclose(whole, heun)
    torch.testing.assert_close(sample(gaussian_denoiser, noise, "edm_sde", 9, s_churn=0.0), heun)


def test_ddim_eta_zero_is_euler_and_eta_one_is_stochastic():
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sample(gaussian_denoiser, noise, "ddim", 8), sample(gaussian_denoiser, noise, "euler", 8))
    a = sample(gaussian_denoiser, noise, "ddim", 8, eta=1.0, generator=SeededNoise(range(4)))
    b = sample(gaussian_denoiser, noise, "ddim", 8, eta=1.0, generator=SeededNoise(range(10, 14)))
    assert not torch.allclose(a, b)
    # Ancestral sampling converges to the right law, at first order: plugging in the posterior mean
    # drops the posterior variance, so coarse grids come out too narrow (about 10% at 50 NFE).
    big = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # generator=None: SDE noise from the global generator (fast for a big batch)
    errors = [abs(sample(gaussian_denoiser, big, "ddim", n, eta=1.0).std().item() / SD - 1) for n in (50, 200, 800)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.015, errors
