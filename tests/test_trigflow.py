"""TrigFlow and EDM's sigma space are one model written twice: the conversions are exact both ways, the exact
Gaussian denoiser gives the exact TrigFlow velocity, and that velocity run through a fewstep solver draws the data."""

import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.processes import trigflow
from fewstep.samplers import sample

SD = 0.5  # sigma_d
MU, S = 0.3, 0.2  # data N(MU, S^2 I)


def nonlinear_denoiser(x, sigma, class_labels=None):
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = sigma.view(shape)
    return torch.tanh(x) * sigma / (1 + sigma) + 0.1 * x.square() / (1 + sigma**2)


def nonlinear_velocity(x_t, t, class_labels=None):
    t = t.view((-1,) + (1,) * (x_t.ndim - 1))
    return torch.sin(3 * x_t) * torch.cos(t) + t * x_t


def states(n=16, dim=3, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=generator, dtype=dtype) * 1.5 + 0.02
    return torch.randn(n, dim, generator=generator, dtype=dtype), t


def test_times_and_noise_levels_convert_both_ways():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    t = trigflow.sigma_to_t(sigma, SD)
    torch.testing.assert_close(trigflow.t_to_sigma(t, SD), sigma, rtol=1e-12, atol=0)
    assert math.isclose(float(t[-1]), math.atan(160.0)) and float(t[1]) == pytest.approx(math.pi / 4)


def test_a_denoiser_made_a_velocity_and_back_is_itself():
    x, t = states()
    sigma = trigflow.t_to_sigma(t, SD)
    back = trigflow.edm_denoiser(trigflow.trigflow_velocity(nonlinear_denoiser, SD), SD)
    torch.testing.assert_close(back(x, sigma), nonlinear_denoiser(x, sigma), rtol=1e-10, atol=1e-12)


def test_a_velocity_made_a_denoiser_and_back_is_itself():
    x_t, t = states()
    back = trigflow.trigflow_velocity(trigflow.edm_denoiser(nonlinear_velocity, SD), SD)
    torch.testing.assert_close(back(x_t, t), nonlinear_velocity(x_t, t), rtol=1e-10, atol=1e-10)


def test_the_conversions_pass_class_labels_on():
    seen = []
    denoiser = lambda x, sigma, class_labels=None: seen.append(class_labels) or x  # noqa: E731
    x_t, t = states(n=2)
    trigflow.trigflow_velocity(denoiser, SD)(x_t, t, class_labels=torch.tensor([1, 2]))
    assert seen[0].tolist() == [1, 2]


def exact_gaussian_velocity(x_t, t):
    """E[dx_t/dt | x_t] / sigma_d for x0 ~ N(MU, S^2 I): x0 and z given x_t by Gaussian conditioning."""
    t = t.view(-1, *[1] * (x_t.ndim - 1))
    cos, sin = torch.cos(t), torch.sin(t)
    variance = cos**2 * S**2 + sin**2 * SD**2
    centred = x_t - cos * MU
    mean_x0 = MU + cos * S**2 / variance * centred
    mean_z = sin * SD**2 / variance * centred
    return (cos * mean_z - sin * mean_x0) / SD


def gaussian():
    return GaussianMixture(torch.full((1, 3), MU, dtype=torch.float64), torch.tensor([S], dtype=torch.float64))


def test_the_exact_gaussian_denoiser_gives_the_exact_trigflow_velocity():
    x_t, t = states()
    velocity = trigflow.trigflow_velocity(gaussian().denoiser, SD)
    torch.testing.assert_close(velocity(x_t, t), exact_gaussian_velocity(x_t, t), rtol=1e-10, atol=1e-12)


def test_the_velocity_is_the_mean_of_the_conditional_velocity():
    # x_t fixed; x0 from its posterior, z = (x_t - cos t x0) / sin t: the mean of cos t z - sin t x0 is sigma_d F
    generator = torch.Generator().manual_seed(1)
    t = torch.tensor([0.7], dtype=torch.float64)
    x_t = torch.tensor([[0.4, -0.2, 1.0]], dtype=torch.float64)
    cos, sin = math.cos(0.7), math.sin(0.7)
    variance = cos**2 * S**2 + sin**2 * SD**2
    mean = MU + cos * S**2 / variance * (x_t - cos * MU)
    std = math.sqrt(S**2 - (cos * S**2) ** 2 / variance)
    x0 = mean + std * torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
    z = (x_t - cos * x0) / sin
    conditional = trigflow.velocity_target(x0, z, t.expand(len(x0)))
    torch.testing.assert_close(conditional.mean(0, keepdim=True), SD * exact_gaussian_velocity(x_t, t), rtol=0, atol=5e-3)


def test_the_exact_velocity_through_an_existing_solver_maps_noise_to_the_data():
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(4096, 3, generator=generator, dtype=torch.float64)
    denoiser = trigflow.edm_denoiser(exact_gaussian_velocity, SD)
    x = sample(lambda x, sigma: denoiser(x, sigma), noise, "heun", 101)
    # what the solver makes of the exact EDM denoiser, to float tolerance, and (fine steps) the data law
    direct = sample(lambda x, sigma: gaussian().denoiser(x, sigma), noise, "heun", 101)
    torch.testing.assert_close(x, direct, rtol=1e-9, atol=1e-9)
    assert abs(float(x.mean()) - MU) < 0.01 and abs(float(x.std()) - S) < 0.01


def test_the_proposal_is_log_normal_in_sigma():
    t = trigflow.proposal_times(100_000, -1.0, 1.4, SD, torch.Generator().manual_seed(3))
    log_sigma = torch.log(trigflow.t_to_sigma(t.double(), SD))
    assert abs(float(log_sigma.mean()) + 1.0) < 0.02 and abs(float(log_sigma.std()) - 1.4) < 0.02
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
