"""Properties of the samplers and of students' rollouts that retired investigation tools relied on: a solver resumed
at a level of its grid continues the same trajectory, and a student's own rollout states have the forward law exactly
when its denoiser is exact."""

from __future__ import annotations

import pytest
import torch

from fewstep.images import to_uint8
from fewstep.methods import Progressive
from fewstep.methods.student import level_index
from fewstep.samplers import SOLVERS, SeededNoise, karras_sigmas, sample

from helpers import student

SHAPE = (1, 4, 4)


def gaussian_denoiser(x, sigma):
    """The exact denoiser of N(0.1, 0.5^2) per pixel."""
    mean, s2 = 0.1, 0.25
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return mean + (x - mean) * s2 / (s2 + sigma**2)


@pytest.mark.parametrize("sampler, nfe", [("seeds3", 8), ("seeds2", 9), ("heun", 7)])
def test_a_solver_run_in_two_pieces_of_its_grid_is_the_solver(sampler, nfe):
    """Cut at a level, the two halves of a grid run one after the other (the same per-image noise going on) give the
    images of the whole run: a step's result depends only on the levels it joins."""
    grid = karras_sigmas(SOLVERS[sampler].steps_for_nfe(nfe))
    for start in (0, 5):
        noise = SeededNoise(range(start, start + 5))
        x = noise.randn(SHAPE) * float(grid[0])
        for part in (grid[:2], grid[1:]):
            x = SOLVERS[sampler].fn(gaussian_denoiser, x, part.to(x.dtype), noise=noise)
        whole = SeededNoise(range(start, start + 5))
        expected = sample(gaussian_denoiser, whole.randn(SHAPE), sampler, nfe, generator=whole)
        assert torch.equal(to_uint8(x), to_uint8(expected))


def point_mass_student(steps: int, bias: float = 0.0) -> Progressive:
    """A progressive student whose denoiser is the exact one of data at 0 (D = 0), or that one moved by ``bias``."""
    method = student(Progressive, student_steps=steps)
    method.denoiser = lambda x, sigma, labels=None: torch.full_like(x, bias)
    return method


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_an_exact_students_own_states_have_the_forward_law_and_a_biased_students_do_not(bias):
    """Data at 0 and D = 0: a DDIM step scales x by sigma_next / sigma, so the student's own state at sigma_k is
    sigma_k z, the forward law; a student biased by 0.5 ends its states 0.5 (1 - sigma_k / sigma_0) off it. So a
    student's covariate shift (what DDIL's rollouts correct) is measurable from its rollouts alone."""
    n = 256
    method = point_mass_student(4, bias)
    x, sigma, _ = method.rollout("student", n)
    levels = method.state_sigmas
    index = level_index(sigma, levels)
    assert sorted(set(index.tolist())) == [0, 1, 2, 3]  # the 4-step student's levels, 0 excluded
    for level in range(1, 4):
        own, sigma_k = x[index == level], float(levels[level])
        assert len(own) == n and abs(own.std() / sigma_k - 1) < 0.03
        assert abs(float(own.mean()) - bias * (1 - sigma_k / float(levels[0]))) < 0.05 * sigma_k + 1e-3
