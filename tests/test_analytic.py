"""Tests for the analytic benchmark: the full-covariance Gaussian and the distances in fewstep.metrics."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.data import Gaussian, GaussianMixture
from fewstep.metrics import (
    frechet_distance,
    frechet_to_truth,
    mode_mass,
    mode_mass_error,
    random_directions,
    sliced_wasserstein2,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(dim: int, seed: int) -> torch.Tensor:
    a = torch.randn(dim, dim, dtype=torch.float64, generator=seeded(seed))
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


# ---------------------------------------------------------------- the Gaussian


def test_gaussian_denoiser_is_the_monte_carlo_posterior_mean():
    # Self-normalised importance sampling: E[x0 | x] = sum_i w_i x0_i / sum_i w_i, x0_i from the prior,
    # w_i = N(x; x0_i, sigma^2 I).
    gaussian = Gaussian(torch.tensor([0.3, -0.2, 0.5]), random_spd(3, seed=0))
    sigma, n = 0.8, 400_000
    prior = gaussian.sample(n, generator=seeded(1))
    x = gaussian.sample(4, generator=seeded(2)) + sigma * torch.randn(4, 3, dtype=torch.float64, generator=seeded(3))
    log_w = -(x[:, None, :] - prior).square().sum(-1) / (2 * sigma**2)  # [4, n]
    w = torch.softmax(log_w, dim=1)
    monte_carlo = w @ prior
    # Standard error of a self-normalised estimate: sqrt(sum w_i^2 (x0_i - mean)^2).
    se = (w.square()[:, :, None] * (prior - monte_carlo[:, None, :]).square()).sum(1).sqrt()
    exact = gaussian.denoiser(x, torch.full((4,), sigma, dtype=torch.float64))
    assert ((exact - monte_carlo).abs() < 5 * se).all()
    assert not ((gaussian.mean() - monte_carlo).abs() < 5 * se).all()  # the check can fail: the prior mean does


def test_gaussian_with_diagonal_cov_matches_a_one_mode_mixture():
    mean, stds = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    gaussian = Gaussian(mean, torch.diag(stds.square()))
    mixture = GaussianMixture(mean[None], stds[None])
    x = 3 * torch.randn(16, 4, dtype=torch.float64, generator=seeded(0))
    sigma = torch.logspace(-3, 2, 16, dtype=torch.float64)  # one sigma per row
    torch.testing.assert_close(gaussian.denoiser(x, sigma), mixture.denoiser(x, sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian.log_prob(x), mixture.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian.covariance(), mixture.covariance())


def test_gaussian_denoiser_limits():
    gaussian = Gaussian.benchmark(dim=16)
    x = gaussian.sample(8, generator=seeded(0)) + torch.randn(8, 16, dtype=torch.float64, generator=seeded(1))
    torch.testing.assert_close(gaussian.denoiser(x, 1e-7), x, rtol=0, atol=1e-9)  # no noise: x is the data
    torch.testing.assert_close(gaussian.denoiser(x, 1e6), gaussian.mean().expand(8, 16), rtol=0, atol=1e-9)


def test_gaussian_denoiser_sigma_per_row_and_float32():
    gaussian = Gaussian.benchmark(dim=8)
    x = torch.randn(5, 8, dtype=torch.float64, generator=seeded(0))
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    rows = torch.cat([gaussian.denoiser(x[i : i + 1], sigma[i]) for i in range(5)])
    torch.testing.assert_close(gaussian.denoiser(x, sigma), rows)
    out32 = gaussian.denoiser(x.float(), sigma.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, rows.float(), rtol=1e-4, atol=1e-5)


def test_gaussian_log_prob_and_sample_moments():
    gaussian = Gaussian(torch.tensor([1.0, -1.0, 0.0]), random_spd(3, seed=4))
    reference = torch.distributions.MultivariateNormal(gaussian.mean(), gaussian.covariance())
    x = torch.randn(10, 3, dtype=torch.float64, generator=seeded(0))
    torch.testing.assert_close(gaussian.log_prob(x), reference.log_prob(x))
    samples = gaussian.sample(100_000, generator=seeded(1))
    torch.testing.assert_close(samples.mean(0), gaussian.mean(), rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(samples.T), gaussian.covariance(), rtol=0, atol=0.03)


def test_gaussian_benchmark_is_seeded_with_log_spaced_stds():
    first, same, other = Gaussian.benchmark(dim=32), Gaussian.benchmark(dim=32), Gaussian.benchmark(dim=32, seed=1)
    torch.testing.assert_close(first.covariance(), same.covariance(), rtol=0, atol=0)
    assert not torch.allclose(first.covariance(), other.covariance())
    stds = torch.linalg.eigvalsh(first.covariance()).sqrt()
    torch.testing.assert_close(stds, torch.logspace(math.log10(0.05), 0, 32, dtype=torch.float64))
    assert first.covariance().diagonal().max() < 0.5  # rotated: no axis carries the largest variance alone


def test_gaussian_rejects_a_covariance_that_is_not_positive_definite():
    with pytest.raises(ValueError, match="positive definite"):
        Gaussian(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_a_gaussian_to_itself_is_zero():
    cov = random_spd(64, seed=0)
    mean = torch.randn(64, dtype=torch.float64, generator=seeded(1))
    assert abs(float(frechet_distance(mean, cov, mean, cov))) < 1e-9 * float(torch.trace(cov))


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    one_d = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert float(one_d) == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)
    # Commuting covariances, in any common rotation: |m1 - m2|^2 + sum (sqrt a - sqrt b)^2.
    a, b = (torch.rand(16, dtype=torch.float64, generator=seeded(s)) for s in (0, 1))
    m1, m2 = (torch.randn(16, dtype=torch.float64, generator=seeded(s)) for s in (2, 3))
    expected = (m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=seeded(4)))
    rotated = frechet_distance(q @ m1, q @ torch.diag(a) @ q.T, q @ m2, q @ torch.diag(b) @ q.T)
    torch.testing.assert_close(rotated, expected, rtol=1e-9, atol=0)


def test_frechet_distance_is_symmetric_for_non_commuting_covariances():
    c1, c2 = random_spd(8, seed=0), random_spd(8, seed=1)
    m = torch.zeros(8, dtype=torch.float64)
    torch.testing.assert_close(frechet_distance(m, c1, m, c2), frechet_distance(m, c2, m, c1), rtol=1e-9, atol=0)


def test_frechet_to_truth_of_true_samples_shrinks_with_n():
    gaussian = Gaussian.benchmark(dim=8)

    def mean_distance(n: int) -> float:
        return sum(
            float(frechet_to_truth(gaussian.sample(n, generator=seeded(s)), gaussian.mean(), gaussian.covariance()))
            for s in range(4)
        ) / 4

    small, large = mean_distance(1_000), mean_distance(16_000)
    assert large < small / 6  # the bias falls as 1/n: 16x more samples, ~16x smaller


# ---------------------------------------------------------------- sliced Wasserstein


def test_sliced_w2_of_a_shifted_copy_is_the_mean_squared_projected_shift():
    x = torch.randn(200, 4, dtype=torch.float64, generator=seeded(0)) * torch.tensor([0.1, 1.0, 2.0, 0.5])
    shift = torch.tensor([0.3, -0.4, 1.2, 0.0], dtype=torch.float64)
    distance = sliced_wasserstein2(x, x + shift, n_projections=20_000, generator=seeded(1))
    # A shift moves every projection by u.v and keeps the order: exactly mean_u (u.v)^2 ...
    directions = random_directions(4, 20_000, generator=seeded(1))
    torch.testing.assert_close(distance, (directions @ shift).square().mean(), rtol=1e-10, atol=0)
    # ... whose expectation over uniform u is |v|^2 / d; (u.v)^2/|v|^2 ~ Beta(1/2, (d-1)/2).
    d = 4
    sd = math.sqrt(2 * (d - 1) / (d**2 * (d + 2))) * float(shift.square().sum()) / math.sqrt(20_000)
    assert abs(float(distance) - float(shift.square().sum()) / d) < 4 * sd


def test_sliced_w2_is_small_between_true_samples_and_large_for_a_scaled_distribution():
    gaussian = Gaussian.benchmark(dim=16)
    x, y = gaussian.sample(4_000, generator=seeded(0)), gaussian.sample(4_000, generator=seeded(1))
    scaled = gaussian.mean() + 1.5 * (y - gaussian.mean())
    fresh = float(sliced_wasserstein2(x, y, generator=seeded(2)))
    wide = float(sliced_wasserstein2(x, scaled, generator=seeded(2)))
    # Scaling by 1.5 moves each projection's std s_u to 1.5 s_u: W2^2 = 0.25 s_u^2, mean over u = 0.25 tr(C) / d.
    assert wide == pytest.approx(0.25 * float(torch.trace(gaussian.covariance())) / 16, rel=0.2)
    assert fresh < 0.05 * wide


def test_sliced_w2_refuses_samples_of_different_sizes():
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein2(torch.zeros(10, 2), torch.zeros(11, 2))


# ---------------------------------------------------------------- mode mass


def unequal_mixture() -> GaussianMixture:
    means = 3 * torch.eye(4, dtype=torch.float64)  # four modes, 3 * sqrt(2) apart
    return GaussianMixture(means, torch.full((4,), 0.2), weights=torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_mode_mass_recovers_the_weights_of_a_sampled_mixture():
    mixture, n = unequal_mixture(), 20_000
    samples, labels = mixture.sample(n, generator=seeded(0))
    mass = mode_mass(samples, mixture)
    se = (mixture.weights * (1 - mixture.weights) / n).sqrt()
    assert ((mass - mixture.weights).abs() < 4 * se).all()
    # Modes this far apart: every sample goes to the mode it came from.
    torch.testing.assert_close(mass, torch.bincount(labels, minlength=4).double() / n)
    assert float(mode_mass_error(samples, mixture)) < 0.02


def test_mode_mass_error_of_a_collapsed_sample_is_the_missing_mass():
    mixture = unequal_mixture()
    samples, labels = mixture.sample(2_000, generator=seeded(0))
    collapsed = samples[labels == 3]  # only the heaviest mode (weight 0.4)
    torch.testing.assert_close(mode_mass(collapsed, mixture), torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    assert float(mode_mass_error(collapsed, mixture)) == pytest.approx(0.6)


def test_mode_mass_assigns_by_posterior_so_weights_break_ties():
    # Two unit-variance modes at -1 and +1 weighted 0.9 / 0.1: at x = 0.5 the likelihood favours the
    # right mode by e^1, the prior favours the left one by 9, so the left one takes it.
    mixture = GaussianMixture(torch.tensor([[-1.0], [1.0]]), torch.ones(2), weights=torch.tensor([0.9, 0.1]))
    points = torch.tensor([[0.0], [0.5], [2.0]], dtype=torch.float64)
    torch.testing.assert_close(mode_mass(points, mixture), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
