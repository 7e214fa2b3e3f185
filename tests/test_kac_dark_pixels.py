"""Faint noise on the black backgrounds of Kac samples, tested on exact Kac laws.

Per coordinate the data are a point mass (a black pixel, x0 = -1), two points (black and white pixels) or a
Gaussian N(m, s^2); the exact marginal velocity u(x, t) = E[f'(t) x0 + g'(t) v_K(x_t - f(t) x0, g(t)) | x_t = x]
is computed in closed form (point masses: the posterior over the points, atoms first) or by quadrature
(Gaussian), and the Kac samplers integrate it from exact prior draws. A pixel is faint noise when it lies more
than 16/255 above a black data value in [-1, 1] (8 levels of 255 on the image scale), as
``fewstep.metrics.diversity.dark_pixel_stats`` counts faint pixels.

What the tests show: with the exact velocity the samplers at 100 steps leave no faint pixels (so neither the
time grid nor the last step is the cause); a velocity that resolves only 3/4 of the Kac velocity at mid times
(what the probe of a trained MNIST teacher measured) leaves a quarter of the black pixels faint, because the
Kac flow moves the atoms rigidly and barely contracts the inside of the cone; the final denoising jumps
(``denoise``, the default of a Kac teacher) remove them.
"""

import numpy as np
import pytest
import torch

from fewstep.processes.kac import KacProcess
from fewstep.samplers import sample_kac
from fewstep.samplers.kac import denoise_tail

A, C = 9.0, 3.0
KAC = KacProcess(A, C)
FAINT = 16 / 255  # in [-1, 1]: 8 levels of 255
DEFAULT_DENOISE = (0.2, 0.1, 0.05)


def prior(n: int, seed: int = 0) -> torch.Tensor:
    return KAC.sample(1.0, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def points_velocity(points, weights, kac_scale=None):
    """Exact u(x, t) for data on ``points`` (probabilities ``weights``); f = 1 - t, g = t, so u = -x0 + v_K(x - f x0, t).

    A draw on an atom of one point's cone (|x - f x0| = ct) came from that point (the others' laws have no mass
    there); elsewhere the posterior weights are the continuous densities. ``kac_scale(t)`` multiplies the Kac part
    (a velocity model that resolves only part of it).
    """
    points = torch.tensor(points, dtype=torch.float64)
    weights = torch.tensor(weights, dtype=torch.float64)

    def velocity(x, t):
        t = float(t[0])
        y = x[:, None] - (1 - t) * points[None, :]
        v = KAC.velocity(y, t)
        if kac_scale is not None:
            v = kac_scale(t) * v
        ct = C * t
        excess = y.abs() - ct
        on_atom = excess.abs() <= 1e-9 * max(ct, 1.0)
        inside = excess < 0
        # log-likelihoods: an atom beats any density; outside every cone (a step's overshoot) the nearest cone wins
        score = torch.where(inside, torch.log(KAC.density(y, t).clamp_min(1e-300)), -1e6 - 1e4 * excess)
        score = torch.where(on_atom, torch.full_like(y, 1e6), score) + torch.log(weights)
        post = torch.softmax(score, dim=1)
        return (post * (-points[None, :] + v)).sum(1)

    return velocity


_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(64))


def gaussian_velocity(m: float, s: float):
    """Exact u(x, t) for data N(m, s^2): 64-node Gauss-Legendre over K in (-ct, ct) (the Gaussian in x0 = (x - K) / f is
    smooth there while ct < s f) or over x0 in m +- 8 s (once the cone is the wider), plus the two atoms."""

    def velocity(x, t):
        t = float(t[0])
        f, ct = 1 - t, C * t
        if f <= 0:  # x_T does not depend on x0
            return -m + KAC.velocity(x, t)
        x = x[:, None]
        if ct < s * f:
            k = ct * _GL_X[None, :]
            x0 = (x - k) / f
            w = ct * _GL_W[None, :] * KAC.density(k, t) / f
        else:
            x0 = m + 8 * s * _GL_X[None, :]
            k = x - f * x0
            w = 8 * s * _GL_W[None, :] * KAC.density(k, t)
            k = k.clamp(-ct, ct)
        gauss = torch.exp(-0.5 * ((x0 - m) / s) ** 2)
        num = (w * gauss * (-x0 + KAC.velocity(k, t))).sum(1)
        den = (w * gauss).sum(1)
        for sign in (1.0, -1.0):  # the atoms K = +-ct: x0 = (x -+ ct) / f, velocity -x0 +- c
            x0a = (x[:, 0] - sign * ct) / f
            pa = float(KAC.atom_mass(t)) / f * torch.exp(-0.5 * ((x0a - m) / s) ** 2)
            num, den = num + pa * (-x0a + sign * C), den + pa
        return num / den.clamp_min(1e-300)

    return velocity


def faint(x: torch.Tensor, black: float = -1.0) -> float:
    """The share of samples of a black pixel that are faint noise (more than 8/255 above black)."""
    return float((x > black + FAINT).double().mean())


@pytest.mark.parametrize("sampler", ["kac_euler", "kac_ab2"])
def test_the_exact_velocity_leaves_black_pixels_black(sampler):
    x = sample_kac(points_velocity([-1.0], [1.0]), prior(4000), sampler, 100)
    assert faint(x) == 0.0 and abs(float(x.mean()) + 1) < 2e-3
    # black and white pixels: every sample lands within 8/255 of one of them, in the right proportions
    x = sample_kac(points_velocity([-1.0, 1.0], [0.7, 0.3]), prior(4000, seed=1), sampler, 100)
    black = x < 0
    assert faint(x[black]) == 0.0 and float((x[~black] - 1).abs().max()) < FAINT
    assert abs(float(black.double().mean()) - 0.7) < 0.03  # 4 standard errors


def test_the_exact_velocity_reproduces_a_gaussian():
    m, s = -0.5, 0.2
    x = sample_kac(gaussian_velocity(m, s), prior(300, seed=2), "kac_euler", 40)
    assert abs(float(x.mean()) - m) < 0.04 and abs(float(x.std()) - s) < 0.04  # sampling error of 300 draws ~0.012 and 0.008


def _resolves_three_quarters(t: float) -> float:
    """A velocity model that resolves 3/4 of the Kac velocity on 0.05 <= t <= 0.5 (a trained MNIST teacher: 0.69-0.75)."""
    return 0.75 if 0.05 <= t <= 0.5 else 1.0


def test_a_velocity_error_at_mid_times_stays_in_the_sample_and_the_final_jumps_remove_it():
    velocity = points_velocity([-1.0], [1.0], kac_scale=_resolves_three_quarters)
    x = sample_kac(velocity, prior(4000, seed=3), "kac_euler", 100)
    # the Kac flow does not contract the error: about a quarter of the black pixels end faint (20-50% in the Kac students' samples)
    assert faint(x) > 0.15
    # the default final jumps (their NFE out of the same budget), taken with the model's own velocity
    denoised = sample_kac(velocity, prior(4000, seed=3), "kac_euler", 100, denoise=DEFAULT_DENOISE)
    assert faint(denoised) < 0.2 * faint(x)


def test_the_final_jumps_keep_black_and_white_pixels():
    # on exact samples of black and white pixels the jumps change nothing that survives clipping to [-1, 1]
    velocity = points_velocity([-1.0, 1.0], [0.5, 0.5])
    x = torch.cat([torch.full((8,), -1.0, dtype=torch.float64), torch.full((8,), 1.0, dtype=torch.float64)])
    out = denoise_tail(velocity, x, DEFAULT_DENOISE).clamp(-1, 1)
    torch.testing.assert_close(out, x)


def test_the_dark_pixel_fraction_counts_faint_pixels_among_the_dark_ones():
    from fewstep.metrics.diversity import dark_pixel_stats

    images = torch.tensor([0, 0, 0, 9, 64, 65, 255, 8], dtype=torch.uint8)  # dark: 0 0 0 9 64 8; faint: 9 64
    stats = dark_pixel_stats(images)
    assert stats["dark_fraction"] == pytest.approx(2 / 6)
    assert stats["dark_mean"] == pytest.approx((9 + 64 + 8) / 6) and stats["zero_fraction"] == pytest.approx(3 / 8)
    # per image: the first has 1 faint pixel among 4 dark (0.25, not noisy), the second 2 among 3 (noisy)
    batch = torch.tensor([[[0, 0, 0, 9]], [[64, 9, 255, 8]]], dtype=torch.uint8)
    stats = dark_pixel_stats(batch)
    assert stats["noisy_share"] == 0.5 and stats["dark_fraction"] == pytest.approx(3 / 7)
