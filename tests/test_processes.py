"""Processes: the flow-to-denoiser conversion and the EDM training distribution, checked in closed form."""

import math

import torch

from fewstep.processes import flow
from fewstep.processes.gaussian import edm_training_sigmas


def test_exact_flow_velocity_converts_to_the_exact_denoiser():
    # Gaussian data x0 ~ N(0, s^2): with x_t = (1-t) x0 + t n, Var x_t = (1-t)^2 s^2 + t^2 and the exact
    # velocity E[n - x0 | x_t] = (t - (1-t) s^2) / Var x_t * x_t. Converted to sigma space it must give
    # the exact denoiser s^2 / (s^2 + sigma^2) * x.
    s = 0.7

    def velocity(x_t, t, class_labels=None):
        t = t.view(-1, 1)
        return (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * x_t

    denoiser = flow.denoiser_from_velocity(velocity)
    x = torch.randn(5, 3, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(denoiser(x, sigma), s**2 / (s**2 + sigma[:, None] ** 2) * x)


def test_interpolant_in_sigma_space():
    x0, noise = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 3.0, 50.0], dtype=torch.float64)
    t = flow.sigma_to_t(sigma)
    torch.testing.assert_close(flow.t_to_sigma(t), sigma)
    # x_t / (1 - t) = x0 + sigma * n
    torch.testing.assert_close(flow.interpolate(x0, noise, t) / (1 - t[:, None]), x0 + sigma[:, None] * noise)


def test_edm_training_sigmas_are_log_normal():
    sigma = edm_training_sigmas(200_000, -1.2, 1.2, torch.Generator().manual_seed(0))
    log_sigma = sigma.log()
    # mean and std of ln sigma within 5 standard errors
    assert abs(log_sigma.mean() + 1.2) < 5 * 1.2 / math.sqrt(2e5)
    assert abs(log_sigma.std() - 1.2) < 5 * 1.2 / math.sqrt(4e5)
