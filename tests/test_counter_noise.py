"""The counter-based per-image generator (fewstep.samplers.noise): its integers against a pure-Python
SplitMix64, its normals and uniforms by test, independence across seeds, draws and elements, per-image
samples that do not depend on the batch, and the Kac prior against the closed-form law."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fewstep.processes.kac import KacProcess
from fewstep.samplers import BrownianPath, SeededNoise, sample
from fewstep.samplers.noise import kac_prior, poisson_cdf_table

# ----- a pure-Python reference: SplitMix64 (Steele, Lea & Flood 2014; Vigna's splitmix64.c), ints mod 2^64 -----

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix64_outputs(state: int, count: int) -> list[int]:
    """The first ``count`` outputs of splitmix64.c's next() from ``state``."""
    out = []
    for _ in range(count):
        state = (state + GAMMA) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def reference_words(seed: int, draw: int, count: int) -> list[int]:
    """Words 0 .. count - 1 of (seed, draw): SplitMix64 started at the row key, as the module documents."""
    seed_key = splitmix64_outputs(seed & M64, 1)[0]
    draw_key = splitmix64_outputs((0xD1B54A32D192ED03 - GAMMA + draw * GAMMA) & M64, 1)[0]
    (row,) = splitmix64_outputs((seed_key + draw_key - GAMMA) & M64, 1)
    return splitmix64_outputs(row, count)


def reference_normals(word: int) -> tuple[float, float]:
    """Box-Muller from one word, in float64: (r cos theta, r sin theta)."""
    high, low = word >> 32, word & 0xFFFFFFFF
    high, low = high - (1 << 32) if high >= 1 << 31 else high, low - (1 << 32) if low >= 1 << 31 else low
    folded = high ^ (high >> 31)  # Python's >> is arithmetic on negative ints too
    radius = math.sqrt(-2 * math.log((folded + 0.5) * 2.0**-31))
    angle = math.pi * low * 2.0**-31
    return radius * math.cos(angle), radius * math.sin(angle)


SEEDS = [0, 1, 2, 12345, 2**63 + 11, -7]  # negative and >= 2^63 seeds are taken mod 2^64


def test_words_are_splitmix64_integers_for_any_seed_draw_and_element():
    noise = SeededNoise(SEEDS)
    for draw in range(3):
        words = noise.words(11)
        assert noise.draws == draw + 1
        for row, seed in enumerate(SEEDS):
            assert [w & M64 for w in words[row].tolist()] == reference_words(seed, draw, 11)


def test_uniforms_and_normals_are_the_reference_arithmetic_of_those_words():
    shape = (2, 5)  # 10 elements: 5 words for randn, 10 for rand
    noise = SeededNoise(SEEDS)
    u32, u64, z64 = noise.rand(shape), noise.rand(shape, torch.float64), noise.randn(shape, torch.float64)
    for row, seed in enumerate(SEEDS):
        words = reference_words(seed, 0, 10)
        assert u32[row].flatten().tolist() == [((w >> 41) + 0.5) * 2.0**-23 for w in words]  # exact
        words = reference_words(seed, 1, 10)
        assert u64[row].flatten().tolist() == [((w >> 12) + 0.5) * 2.0**-52 for w in words]
        pairs = [reference_normals(w) for w in reference_words(seed, 2, 5)]
        expected = torch.tensor([c for c, _ in pairs] + [s for _, s in pairs], dtype=torch.float64)
        torch.testing.assert_close(z64[row].flatten(), expected, rtol=1e-14, atol=1e-14)  # libm vs torch's log/sin
    odd = SeededNoise(SEEDS).randn((7,), torch.float64)  # 4 words: the last one's sine is left out
    even = SeededNoise(SEEDS).randn((8,), torch.float64)
    assert torch.equal(odd[:, :4], even[:, :4]) and torch.equal(odd[:, 4:], even[:, 4:7])


def moments_within_clt_bounds(x: np.ndarray) -> None:
    n, bound = len(x), 5.0  # ~5 standard errors, for 1e6 draws
    assert abs(x.mean()) < bound / math.sqrt(n)
    assert abs(x.var() - 1) < bound * math.sqrt(2 / n)
    assert abs(stats.skew(x)) < bound * math.sqrt(6 / n)
    assert abs(stats.kurtosis(x)) < bound * math.sqrt(24 / n)  # excess kurtosis


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randn_is_standard_normal(dtype):
    z = SeededNoise(range(1000)).randn((1000,), dtype)
    assert z.dtype == dtype and z.shape == (1000, 1000)
    x = z.double().flatten().numpy()
    moments_within_clt_bounds(x)
    assert stats.kstest(x, "norm").pvalue > 1e-3
    assert np.abs(x).max() < math.sqrt(64 * math.log(2)) + 1e-5  # the documented bound on |z|
    # the tails: P(|Z| > 4) = 6.3e-5, ~63 of 1e6
    tail = int((np.abs(x) > 4).sum())
    expected = 2 * stats.norm.sf(4) * len(x)
    assert abs(tail - expected) < 5 * math.sqrt(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rand_is_uniform_on_the_open_interval(dtype):
    u = SeededNoise(range(500, 1500)).rand((10, 100), dtype)
    assert u.dtype == dtype and u.shape == (1000, 10, 100)
    assert 0 < float(u.min()) and float(u.max()) < 1
    x = u.double().flatten().numpy()
    assert stats.kstest(x, "uniform").pvalue > 1e-3
    assert abs(x.mean() - 0.5) < 5 * math.sqrt(1 / 12 / len(x))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_adjacent_seeds_draws_and_elements_are_uncorrelated():
    noise = SeededNoise(range(2001))
    first, second = noise.randn((500,)), noise.randn((500,))
    bound = 4 / math.sqrt(2000 * 500)
    for x in (first, second, first**2, noise.rand((500,))):  # squares: a dependence correlation misses
        assert abs(correlation(x[:-1], x[1:])) < bound  # seed s against seed s + 1
    assert abs(correlation(first, second)) < 4 / math.sqrt(2001 * 500)  # draw d against draw d + 1, same seed
    assert abs(correlation(first**2, second**2)) < 4 / math.sqrt(2001 * 500)
    bound = 4 / math.sqrt(2001 * 499)
    for x in (first, first**2):
        assert abs(correlation(x[:, :-1], x[:, 1:])) < bound  # element j against j + 1
    # the two normals of one word (element j and 250 + j): independent by Box-Muller
    assert abs(correlation(first[:, :250], first[:, 250:])) < 4 / math.sqrt(2001 * 250)
    assert abs(correlation(first[:, :250] ** 2, first[:, 250:] ** 2)) < 4 / math.sqrt(2001 * 250)


def test_no_diagonal_aliasing_between_seeds_and_draws():
    # seed s at draw d + 1 is not seed s + 1 at draw d (as it would be with a key seed + draw)
    noise = SeededNoise(range(1001))
    draws = [noise.randn((1000,)) for _ in range(3)]
    for d in range(2):
        later, next_seed = draws[d + 1][:-1], draws[d][1:]
        assert not torch.isclose(later, next_seed).any(dim=1).all()
        assert abs(correlation(later, next_seed)) < 4 / math.sqrt(1000 * 1000)
    words = SeededNoise([5]).words(4), SeededNoise([6]).words(4)
    other = SeededNoise([5])
    other.words(4)
    assert not torch.equal(other.words(4), words[1])  # (5, draw 1) against (6, draw 0)


# ----- per-image samples do not depend on the batch -----

SHAPE = (3, 8, 8)


def nonlinear_denoiser(x, sigma, **_):
    """A small deterministic, elementwise (so row-by-row exact) stand-in for a network."""
    scale = (1 / (1 + sigma**2)).view(-1, *[1] * (x.ndim - 1))
    return torch.tanh(x * scale.sqrt()) * 0.7 + 0.1 * x * scale


def draw_in_batches(sampler: str, nfe: int, seeds: list[int], batch: int, brownian: bool = False) -> torch.Tensor:
    out = []
    for start in range(0, len(seeds), batch):
        part = seeds[start : start + batch]
        x_t = SeededNoise(part).randn(SHAPE)
        source = SeededNoise(part)
        source.randn(SHAPE)  # draw 0 was x_T; the solver draws on from draw 1
        generator = BrownianPath(source) if brownian else source
        out.append(sample(nonlinear_denoiser, x_t, sampler, nfe, generator=generator))
    return torch.cat(out)


@pytest.mark.parametrize("sampler, brownian", [("seeds3", False), ("euler_maruyama", False), ("edm_sde", False),
                                               ("euler_maruyama", True)])
def test_samples_are_bit_identical_in_batches_of_1_7_and_64(sampler, brownian):
    seeds = list(range(100, 164))
    whole = draw_in_batches(sampler, 6, seeds, 64, brownian)
    assert torch.isfinite(whole).all() and whole.std() > 0.1
    for batch in (1, 7):
        assert torch.equal(draw_in_batches(sampler, 6, seeds, batch, brownian), whole)
    assert not torch.equal(draw_in_batches(sampler, 6, list(range(200, 264)), 64, brownian), whole)


# ----- the Kac prior -----


def test_poisson_table_is_the_poisson_cdf_cut_at_1e_12():
    for mean in (0.5, 9.0, 40.0):
        cdf = poisson_cdf_table(mean).numpy()
        n_max = len(cdf) - 1
        assert stats.poisson.sf(n_max, mean) < 1e-12 <= stats.poisson.sf(n_max - 1, mean)
        np.testing.assert_allclose(cdf[:-1], stats.poisson.cdf(np.arange(n_max), mean), rtol=0, atol=1e-14)
        assert cdf[-1] == 1.0
    assert poisson_cdf_table(0.0).tolist() == [1.0]


@pytest.mark.parametrize("a, c, t", [(9.0, 3.0, 1.0), (2.0, 1.0, 0.5)])
def test_kac_prior_follows_the_closed_form_law(a, c, t):
    process = KacProcess(a, c)
    k = kac_prior(SeededNoise(range(400)), process, t, (250,), torch.float64).flatten()
    n = k.numel()
    assert float(k.abs().max()) <= c * t
    mass = float(process.atom_mass(t))  # at each of +-ct
    for atom in (c * t, -c * t):
        count = int((k == atom).sum())
        assert abs(count - n * mass) < 5 * math.sqrt(n * mass * (1 - mass)) + 1
    # Kolmogorov's distance on a fine grid (a lower bound of the sup over all x, so a conservative KS test;
    # conservative also for a law with atoms): the closed-form CDF at 513 points instead of 1e5
    grid = torch.linspace(-c * t, c * t, 513, dtype=torch.float64)[1:-1]
    empirical = torch.searchsorted(k.sort().values, grid, right=True).double() / n
    distance = float((empirical - process.cdf(grid, t)).abs().max())
    assert stats.kstwo.sf(distance, n) > 1e-3
    assert float(k.var()) == pytest.approx(float(process.variance(t)), rel=0.03)


def test_kac_prior_rows_depend_on_their_seed_only():
    process = KacProcess(9.0, 3.0)
    whole = kac_prior(SeededNoise(range(10)), process, 1.0, (2, 6))
    assert whole.shape == (10, 2, 6) and whole.dtype == torch.float32
    assert torch.equal(kac_prior(SeededNoise(range(4, 10)), process, 1.0, (2, 6)), whole[4:])
    assert torch.equal(kac_prior(SeededNoise([3]), process, 1.0, (2, 6)), whole[3:4])


# ----- DDIL rollouts -----


def test_ddil_rollouts_are_per_trajectory_and_do_not_touch_the_global_generator():
    from fewstep.methods import Consistency

    from helpers import DDIL, student

    method = student(Consistency, teacher_steps=8, sample_steps=4, ddil=DDIL)  # the consistency sampler renoises
    for source, visits in (("teacher", 8), ("student", 4)):
        torch.manual_seed(1)
        x, sigma, _ = method.rollout(source, 3)
        torch.manual_seed(2)
        again, sigma_again, _ = method.rollout(source, 3)
        assert torch.equal(x, again) and torch.equal(sigma, sigma_again)
        more, _, _ = method.rollout(source, 5)  # trajectory i is seed i's, whatever the rollout's size
        torch.testing.assert_close(more.view(visits, 5, *x.shape[1:])[:, :3], x.view(visits, 3, *x.shape[1:]))
