"""Gaussian schedules and the conversion of a model between them, checked in closed form and on exact GMMs."""

import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.processes import flow
from fewstep.processes.schedules import (
    EDM,
    VE,
    VP,
    Cosine,
    Linear,
    PointMassLazy,
    convert_velocity,
    denoiser_from_velocity,
    reverse_sde_drift,
    velocity_from_denoiser,
)

SCHEDULES = {
    "edm": (EDM(), (0.01, 60.0)),
    "ve": (VE(0.01, 50.0), (0.02, 0.98)),
    "vp": (VP(), (0.02, 0.98)),
    "cosine": (Cosine(), (0.02, 0.98)),
    "cosine_sd": (Cosine(0.5), (0.02, 0.98)),
    "linear": (Linear(), (0.02, 0.98)),
    "point_mass_lazy": (PointMassLazy(0.5), (0.02, 0.98)),
}
GMM = GaussianMixture.benchmark(dim=2, modes=4, radius=1.0, std=0.2)


def times(name, n=9):
    low, high = SCHEDULES[name][1]
    return torch.linspace(low, high, n, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_log_snr_inverse_and_derivatives(name):
    schedule, _ = SCHEDULES[name]
    t = times(name)
    lam = schedule.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1]), "lambda must fall with t"
    torch.testing.assert_close(schedule.t_from_log_snr(lam), t)
    torch.testing.assert_close(schedule.t_from_edm_sigma(schedule.edm_sigma(t)), t)
    torch.testing.assert_close(lam, schedule.alpha(t).log() - schedule.sigma(t).log())
    # closed-form derivatives against central differences
    dt = 1e-6 * t
    for f, df in [(schedule.alpha, schedule.d_alpha), (schedule.sigma, schedule.d_sigma), (schedule.log_snr, schedule.d_log_snr)]:
        torch.testing.assert_close(df(t), (f(t + dt) - f(t - dt)) / (2 * dt), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_velocity_of_the_exact_gaussian_model(name):
    # x0 ~ N(0, s^2): x_t = alpha x0 + sigma n has E[alpha' x0 + sigma' n | x_t] = (alpha' alpha s^2 + sigma' sigma) / Var x_t * x_t.
    schedule, _ = SCHEDULES[name]
    s = 0.7
    t = times(name, 5)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def denoiser(x, sigma, **_):
        return s**2 / (s**2 + sigma[:, None] ** 2) * x

    a, sig, da, ds = schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t)
    exact = ((da * a * s**2 + ds * sig) / (a**2 * s**2 + sig**2))[:, None] * x
    u = velocity_from_denoiser(denoiser, schedule)
    torch.testing.assert_close(u(x, t), exact)
    # and back: the velocity model read as a denoiser is the exact denoiser again
    sigma_edm = schedule.edm_sigma(t)
    torch.testing.assert_close(denoiser_from_velocity(u, schedule)(x, sigma_edm), denoiser(x, sigma_edm))


def test_linear_schedule_gives_the_flow_denoiser():
    # x_t = (1 - t) x0 + t n, u = n - x0: x0_hat = x_t - t u at x_t = x / (1 + sigma), t = sigma / (1 + sigma).
    x = torch.randn(4, 2, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.5, 3.0, 40.0], dtype=torch.float64)

    def velocity(x_t, t, **_):
        return torch.sin(3 * x_t) + t[:, None]  # any model

    t, x_t = sigma / (1 + sigma), x / (1 + sigma[:, None])
    expected = x_t - t[:, None] * velocity(x_t, t)
    torch.testing.assert_close(denoiser_from_velocity(velocity, Linear())(x, sigma), expected)
    torch.testing.assert_close(flow.denoiser_from_velocity(velocity)(x, sigma), expected)


PAIRS = [("linear", "vp"), ("vp", "cosine_sd"), ("edm", "point_mass_lazy"), ("cosine", "linear"), ("ve", "edm")]


@pytest.mark.parametrize("source,target", PAIRS)
def test_converting_the_exact_model_gives_the_exact_model_of_the_target(source, target):
    # Damsholt et al.'s formula (via tau(s), c_s) and the denoiser route (via sigma_edm) are derived
    # differently; on the exact GMM both must give the target schedule's exact velocity.
    src, tgt = SCHEDULES[source][0], SCHEDULES[target][0]
    s = times(target, 7)
    x = GMM.sample(7, generator=torch.Generator().manual_seed(1))[0] * 1.5
    converted = convert_velocity(velocity_from_denoiser(GMM.denoiser, src), src, tgt)
    torch.testing.assert_close(converted(x, s), velocity_from_denoiser(GMM.denoiser, tgt)(x, s))


def _rk4(velocity, x, t0, t1, steps):
    ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    for a, b in zip(ts[:-1], ts[1:]):
        h, ta, tm, tb = float(b - a), a.expand(len(x)), ((a + b) / 2).expand(len(x)), b.expand(len(x))
        k1 = velocity(x, ta)
        k2 = velocity(x + h / 2 * k1, tm)
        k3 = velocity(x + h / 2 * k2, tm)
        k4 = velocity(x + h * k3, tb)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("source,target", [("linear", "cosine_sd"), ("vp", "point_mass_lazy")])
def test_converted_model_reproduces_the_same_marginals(source, target):
    # Integrate the probability-flow ODE under the target with the converted model, and under the source
    # with the original: X_tgt(s) = c_s X_src(tau(s)) along the whole path, and equal samples at the data end.
    src, tgt = SCHEDULES[source][0], SCHEDULES[target][0]
    u_src = velocity_from_denoiser(GMM.denoiser, src)
    u_tgt = convert_velocity(u_src, src, tgt)
    s0, s1 = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    tau0, tau1 = (src.t_from_log_snr(tgt.log_snr(s)) for s in (s0, s1))
    c0, c1 = (tgt.alpha(s) / src.alpha(src.t_from_log_snr(tgt.log_snr(s))) for s in (s0, s1))
    x_src = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * src.sigma(tau0)
    x_tgt = c0 * x_src
    end_src, end_tgt = _rk4(u_src, x_src, tau0, tau1, 400), _rk4(u_tgt, x_tgt, s0, s1, 400)
    torch.testing.assert_close(end_tgt, c1 * end_src, rtol=1e-6, atol=1e-7)
    # all the way to the data (t = 0 is the same point, alpha = 1, for both): the same samples
    tau2 = torch.tensor(1e-3, dtype=torch.float64)
    s2 = tgt.t_from_log_snr(src.log_snr(tau2))
    data_src, data_tgt = _rk4(u_src, end_src, tau1, tau2, 400), _rk4(u_tgt, end_tgt, s1, s2, 400)
    torch.testing.assert_close(data_tgt, data_src * tgt.alpha(s2) / src.alpha(tau2), rtol=1e-6, atol=1e-7)
    # and the marginal is the GMM's: most points end within 4 stds of a mode
    distance = (data_src[:, None, :] - GMM.means[None]).norm(dim=-1).min(dim=1).values
    assert (distance < 4 * 0.2).float().mean() > 0.95


def test_lazy_schedules_have_zero_drift_on_their_gaussian():
    sd = 0.5
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)

    def denoiser(x, sigma, **_):
        return sd**2 / (sd**2 + sigma[:, None] ** 2) * x

    # ODE: the cosine schedule with noise scale sd is variance preserving for N(0, sd^2 I)
    torch.testing.assert_close(velocity_from_denoiser(denoiser, Cosine(sd))(x, t), torch.zeros_like(x))
    assert velocity_from_denoiser(denoiser, Cosine(1.0))(x, t).abs().max() > 0.1  # not for another scale
    # SDE: the point-mass schedule's eps*-SDE has zero drift, constant diffusion sd^2 / 2, and E[x0 | x_t] = x_t
    lazy = PointMassLazy(sd)
    from fewstep.processes.schedules import x0_from_denoiser

    x0 = x0_from_denoiser(denoiser, x, t, lazy)
    torch.testing.assert_close(x0, x)
    torch.testing.assert_close(reverse_sde_drift(x, x0, t, lazy), torch.zeros_like(x))
    torch.testing.assert_close(lazy.eps_star(t), torch.full_like(t, sd**2 / 2))
    other = PointMassLazy(1.0)
    assert reverse_sde_drift(x, x0_from_denoiser(denoiser, x, t, other), t, other).abs().max() > 0.1
    # a point mass: both coefficients vanish at t = 1
    one = torch.tensor([1.0], dtype=torch.float64)
    assert lazy.alpha(one).item() == 0 and lazy.sigma(one).item() == 0


def test_eps_star_of_edm_is_the_reverse_sde_diffusion():
    # EDM's reverse SDE dx = -2 sigma score dsigma + sqrt(2 sigma) dW: g^2 = 2 sigma, so eps* = t.
    t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(EDM().eps_star(t), t)
    # and the drift is EDM's 2 (x - D) / sigma
    x, x0 = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(reverse_sde_drift(x, x0, t, EDM()), 2 * (x - x0) / t[:, None])


def test_vp_matches_ddpm_alpha_bar():
    # DDPM's linear betas (1e-4 to 0.02 over 1000 steps) are VP(0.1, 20) sampled at t = i / 1000.
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    vp = VP(0.1, 20.0)
    assert (vp.alpha(t) ** 2 - alpha_bar).abs().max() < 2e-3
    assert math.isclose(float(vp.alpha(t[-1:]) ** 2 + vp.sigma(t[-1:]) ** 2), 1.0, rel_tol=1e-12)
