"""Samplers: grids, NFE accounting, seed-per-sample noise, guidance, and convergence on exact Gaussian data."""

import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.errors import ConfigError
from fewstep.samplers import (
    GRIDS,
    SOLVERS,
    BrownianPath,
    CountingDenoiser,
    SeededNoise,
    guided_denoiser,
    karras_sigmas,
    sample,
)
from fewstep.samplers.solvers import (
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_seeds1,
    sample_seeds2,
    sample_seeds3,
)

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


@pytest.mark.parametrize("sampler,nfe,expected", [
    ("euler", 7, 7), ("heun", 35, 35), ("heun", 34, 33), ("heun", 1, 1), ("dpmpp_2m", 10, 10),
    ("seeds1", 6, 6), ("seeds2", 7, 7), ("seeds2", 8, 7), ("seeds2", 1, 1), ("seeds3", 10, 10), ("seeds3", 9, 7),
    ("seeds3", 3, 1), ("lazy_ode", 3, 3), ("lazy_sde", 1, 1),
])
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


# lazy_ode, lazy_2m and lazy_sde are exact (below, test_sampler_claims); consistency samples a consistency function,
# not a denoiser (test_students)
@pytest.mark.parametrize("sampler", sorted(set(SOLVERS) - {"lazy_ode", "lazy_2m", "lazy_sde", "consistency"}))
def test_every_sampler_converges_to_the_gaussian_law(sampler):
    # With the exact denoiser of N(0, SD^2) from sigma_max = 80, the sample std approaches SD as NFE grows
    # (at 20 NFE the discretisation error is still 5-25%).
    noise = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # SDE noise from the global generator
    # EDM's s_noise = 1.003 inflates the variance on purpose (for ImageNet); the law test wants 1.
    options = {"s_noise": 1.0} if sampler == "edm_sde" else {}
    errors = [abs(sample(gaussian_denoiser, noise, sampler, nfe=n, **options).std().item() / SD - 1) for n in (20, 60, 200)]
    # ten times the NFE cuts the error at least fivefold (order >= 0.7); SEEDS-1, the slowest, is at 3% by 200
    assert errors[0] > errors[1] > errors[2] and errors[0] > 5 * errors[2] and errors[2] < 0.035, errors


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


@pytest.mark.parametrize("sampler", ["edm_sde", "euler_maruyama", "seeds2", "seeds3", "lazy_sde"])
def test_sde_noise_is_per_sample(sampler):
    seeds = list(range(6))
    noise = SeededNoise(seeds).randn((3,), dtype=torch.float64)
    whole = sample(gaussian_denoiser, noise, sampler, 9, generator=SeededNoise(seeds))
    parts = torch.cat([
        sample(gaussian_denoiser, noise[:2], sampler, 9, generator=SeededNoise(seeds[:2])),
        sample(gaussian_denoiser, noise[2:], sampler, 9, generator=SeededNoise(seeds[2:])),
    ])
    torch.testing.assert_close(whole, parts)  # a sample depends on its own seed, not on the batch
    other = sample(gaussian_denoiser, noise, sampler, 9, generator=SeededNoise(range(10, 16)))
    assert not torch.allclose(whole, other)  # and the SDE noise does matter


def test_edm_sde_churn_zero_is_heun():
    noise = SeededNoise(range(6)).randn((3,), dtype=torch.float64)
    heun = sample(gaussian_denoiser, noise, "heun", 9)
    assert not torch.allclose(sample(gaussian_denoiser, noise, "edm_sde", 9, generator=SeededNoise(range(6))), heun)
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


class BatchNoise:
    """One generator for the whole batch: a fast noise source for large test batches."""

    def __init__(self, batch: int, seed: int):
        self.batch, self.generator = batch, torch.Generator().manual_seed(seed)

    def randn(self, shape, dtype=torch.float64):
        return torch.randn((self.batch, *shape), generator=self.generator, dtype=dtype)

    def increment(self, sigma, sigma_next, shape, dtype=torch.float64):
        return self.randn(shape, dtype)


class ZeroNoise:
    """A Brownian path that stays at 0: what is left of an SDE solver is its deterministic part."""

    def increment(self, sigma, sigma_next, shape, dtype=torch.float64):
        return torch.zeros(shape, dtype=dtype)


def test_brownian_path_is_one_consistent_path():
    path = BrownianPath(BatchNoise(20_000, 0))
    # nested queries agree: the increment over [a, c] is the sum over [a, b] and [b, c]
    a, b, c = 2.0, 0.7, 0.1  # sigmas; tau = 1 / sigma^2 grows as sigma falls
    tau = {s: 1 / s**2 for s in (a, b, c)}
    whole = path.increment(a, c, (1,), torch.float64) * math.sqrt(tau[c] - tau[a])
    first = path.increment(a, b, (1,), torch.float64) * math.sqrt(tau[b] - tau[a])
    second = path.increment(b, c, (1,), torch.float64) * math.sqrt(tau[c] - tau[b])
    torch.testing.assert_close(whole, first + second)
    # the point b was drawn from the bridge after a and c: still standard normal and independent increments
    z1, z2 = first / math.sqrt(tau[b] - tau[a]), second / math.sqrt(tau[c] - tau[b])
    se = 1 / math.sqrt(20_000)
    for z in (z1, z2):
        assert abs(z.mean()) < 4 * se and abs(z.var() - 1) < 4 * math.sqrt(2) * se
    assert abs((z1 * z2).mean()) < 4 * se


@pytest.mark.parametrize("solver", [sample_seeds1, sample_seeds2, sample_seeds3])
def test_seeds_noise_is_the_exact_brownian_path_at_every_stage(solver):
    # With D = 0 (the exact denoiser of data at the origin) the reverse SDE is solved exactly by
    # x(sigma) = sigma^2 (x_s / sigma_s^2 + W(1/sigma^2) - W(1/sigma_s^2)). Every stage's input must equal
    # it on the same Brownian path: this checks the linear part, each stage's noise variance
    # sigma_k^2 (1 - e^{-2 c_k h}), and the correlation of the chained stage noises.
    seen = []

    def zero_denoiser(x, sigma, **_):
        seen.append((x.clone(), float(sigma[0])))
        return torch.zeros_like(x)

    path = BrownianPath(BatchNoise(5, 1))
    x_start = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 20.0
    sigmas = GRIDS["log_snr"](5, 0.1, 20.0)[:-1]  # stop at sigma = 0.1, without the jump to 0
    end = solver(zero_denoiser, x_start, sigmas, noise=path)
    seen.append((end, float(sigmas[-1])))

    def exact(sigma):
        return sigma**2 * (x_start / 20.0**2 + path.increment(20.0, sigma, (3,), torch.float64) * math.sqrt(1 / sigma**2 - 1 / 20.0**2))

    assert len(seen) == 1 + (len(sigmas) - 1) * {sample_seeds1: 1, sample_seeds2: 2, sample_seeds3: 3}[solver]
    for x, sigma in seen[1:]:
        torch.testing.assert_close(x, exact(sigma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", [sample_seeds1, sample_seeds2, sample_seeds3])
def test_seeds_stage_variances_with_fresh_noise(solver):
    # The same identity in law with the default noise source (fresh per-sample normals for each
    # increment): with D = 0, every stage and step has the exact marginal N(0, sigma^2).
    variances = []

    def zero_denoiser(x, sigma, **_):
        variances.append((x.var().item(), float(sigma[0])))
        return torch.zeros_like(x)

    n = 40_000
    solver(zero_denoiser, torch.randn(n, 1, dtype=torch.float64) * 20.0, GRIDS["log_snr"](4, 0.1, 20.0)[:-1], noise=BatchNoise(n, 3))
    for var, sigma in variances:
        assert abs(var / sigma**2 - 1) < 5 * math.sqrt(2 / n), (var, sigma)


GMM2 = GaussianMixture.benchmark(dim=2, modes=4, radius=1.0, std=0.3)


@pytest.mark.parametrize("solver,order", [(sample_seeds1, 1), (sample_seeds2, 2), (sample_seeds3, 3)])
def test_seeds_deterministic_part_converges_at_its_order(solver, order):
    # With the Brownian path held at 0 a SEEDS-k step is an exponential Runge-Kutta step of order k for
    # dy = D dtau (y = x / sigma^2, tau = 1 / sigma^2). On a GMM (non-linear D; for Gaussian data D is
    # constant along this path and every order is exact) the error must fall at order k.
    x = GMM2.sample(64, generator=torch.Generator().manual_seed(4))[0] + 20.0 * torch.randn(64, 2, dtype=torch.float64)
    grid = lambda n: GRIDS["log_snr"](n + 1, 0.05, 20.0)[:-1]  # noqa: E731
    reference = sample_seeds3(GMM2.denoiser, x, grid(512), noise=ZeroNoise())
    errors = [(solver(GMM2.denoiser, x, grid(n), noise=ZeroNoise()) - reference).abs().max().item() for n in (32, 64, 128)]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(o - order) < 0.35 for o in observed), (errors, observed)


def test_seeds_strong_error_on_a_shared_brownian_path():
    # Driven by the same Brownian path as a fine-step reference, every SEEDS solver converges strongly at
    # order 1: no scheme that sees the path only at its stage points can do better on a non-trivial SDE
    # (Clark & Cameron 1980), whatever its deterministic order. The higher stages buy a smaller constant.
    n_samples = 400
    path = BrownianPath(BatchNoise(n_samples, 5))
    x = torch.randn(n_samples, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 20.0
    grid = lambda n: GRIDS["log_snr"](n + 1, 0.05, 20.0)[:-1]  # noqa: E731
    reference = sample_seeds3(gaussian_denoiser, x, grid(1536), noise=path)
    errors = {}
    for solver in (sample_seeds1, sample_seeds2, sample_seeds3):
        errors[solver] = [
            (solver(gaussian_denoiser, x, grid(n), noise=path) - reference).pow(2).sum(1).mean().sqrt().item()
            for n in (12, 24, 48, 96)
        ]
        observed = math.log2(errors[solver][0] / errors[solver][-1]) / 3  # slope over a factor 8 in steps
        assert 0.75 < observed < 1.25, (solver.__name__, errors[solver], observed)
    for e1, e2, e3 in zip(*errors.values()):
        assert e3 < e2 < e1, errors


@pytest.mark.parametrize("sampler", ["lazy_ode", "lazy_sde"])
def test_lazy_samplers_draw_gaussian_data_exactly_in_one_step(sampler):
    # Damsholt et al.: on their lazy schedules the drift of N(0, sd^2 I) data vanishes, so one step is exact.
    n = 50_000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    counted = CountingDenoiser(gaussian_denoiser)
    x = sample(counted, noise, sampler, 1, sigma_data=SD)
    assert counted.nfe == 1
    se = math.sqrt(2 / (2 * n))  # standard error of a variance ratio
    assert abs(x.var().item() / SD**2 - 1) < 4 * se
    assert abs(x.mean().item()) < 4 * SD / math.sqrt(2 * n)
    # fourth moment of a Gaussian: E x^4 = 3 sd^4 (the output is Gaussian, not just of the right variance)
    assert abs((x**4).mean().item() / (3 * SD**4) - 1) < 0.05
    # with a wrong sigma_data the drift no longer vanishes: one step is visibly off, more steps recover
    wrong = [abs(sample(gaussian_denoiser, noise, sampler, n_, sigma_data=1.0).var().item() / SD**2 - 1) for n_ in (1, 64)]
    assert wrong[0] > 20 * se and wrong[1] < wrong[0] / 4, wrong
