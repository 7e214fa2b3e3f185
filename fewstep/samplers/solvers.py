"""ODE/SDE solvers in the k-diffusion form: ``solver(denoiser, x, sigmas, noise=None, callback=None) -> x``.

``denoiser(x, sigma)`` returns x0_hat with sigma of shape [batch]; ``sigmas`` is a decreasing grid
ending at 0; ``noise`` is a noise source for stochastic solvers (SeededNoise or BrownianPath, see
noise.py; None draws from torch's global generator); ``callback`` gets a dict per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fewstep.processes.schedules import Cosine, PointMassLazy, Schedule, reverse_sde_drift, velocity_from_x0

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sigma(x: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """One noise level per sample, in x's dtype (a Python float stays float64 until then)."""
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand(x.shape[0])


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1 without correction)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); no correction on the step to sigma = 0.

    It is EDM's stochastic sampler without churn, so it shares that code.
    """
    return sample_edm_sde(denoiser, x, sigmas, noise, callback, s_churn=0.0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep in lambda = -ln sigma, 1 NFE per step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised  # the exponential step to sigma = 0 lands on the data prediction
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            effective = denoised
            if old_denoised is not None:
                r = h_last / h
                effective = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * effective
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


def _randn_like(x: torch.Tensor, noise) -> torch.Tensor:
    """Per-sample noise from a SeededNoise (seed-per-image), else from the global generator."""
    if noise is None:
        return torch.randn_like(x)
    return noise.randn(x.shape[1:], dtype=x.dtype).to(x.device)


def _increment(x: torch.Tensor, noise, sigma, sigma_next) -> torch.Tensor:
    """The normalised Brownian increment over [sigma, sigma_next] (a standard normal; see noise.py)."""
    if noise is None:
        return torch.randn_like(x)
    return noise.increment(float(sigma), float(sigma_next), x.shape[1:], dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_edm_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None,
    s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): churn noise up to sigma_hat, then a Heun step."""
    n = len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (1 + gamma)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigmas[i] ** 2).sqrt() * s_noise * _randn_like(x, noise)
        denoised = denoiser(x, _sigma(x, sigma_hat))
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        x_next = x + d * dt
        if sigmas[i + 1] != 0:
            d_next = (x_next - denoiser(x_next, _sigma(x, sigmas[i + 1]))) / sigmas[i + 1]
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space: eta = 0 is deterministic (Euler), eta = 1 is DDPM's ancestral step."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.clamp(eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt(), max=sigma_next)
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_up > 0:
            x = x + sigma_up * _increment(x, noise, sigma, sigma_next)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x, sigma_i), then x = x0 + sigma_{i+1} z."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        x = denoised if sigmas[i + 1] == 0 else denoised + sigmas[i + 1] * _randn_like(x, noise)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler_maruyama(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = -2 sigma score dsigma + sqrt(2 sigma) dW (Song et al. 2021, sigma(t) = t)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            x = denoised  # the last step returns the data prediction, without noise
        else:
            x = x + 2 * (x - denoised) / sigma * (sigma_next - sigma)
            x = x + (2 * sigma * (sigma - sigma_next)).sqrt() * _increment(x, noise, sigma, sigma_next)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


# SEEDS (Gonzalez et al., NeurIPS 2023, arXiv 2305.14267), data prediction, alpha = 1, sigma = t.
# lambda = -ln sigma, h = lambda_t - lambda_s, stage k at lambda_s + c_k h. The linear part is exact,
# and the noise is one Brownian path split exactly across the stages:
# N_k = e^{-(c_k - c_{k-1}) h} N_{k-1} + sqrt(1 - e^{-2 (c_k - c_{k-1}) h}) xi_k, stage k adding sigma_k N_k.
# The xi_k are increments of one W(1 / sigma^2), so a BrownianPath drives them exactly.


def _phi2(z: float) -> float:
    """phi_2(z) = (e^z - 1 - z) / z, with its series where the difference cancels."""
    return 0.5 + z / 6 + z * z / 24 if abs(z) < 1e-4 else (math.expm1(z) - z) / z


class _SeedsStep:
    """One SEEDS step from sigma_s towards sigma_t: stage levels, exact linear part, chained noise."""

    def __init__(self, x, sigma_s: float, sigma_t: float, noise):
        self.x_s, self.sigma_s, self.sigma_t, self.noise = x, sigma_s, sigma_t, noise
        self.h = math.log(sigma_s / sigma_t)
        self.noise_sum, self.c_prev = torch.zeros_like(x), 0.0

    def sigma_at(self, c: float) -> float:
        return self.sigma_t if c == 1 else self.sigma_s * math.exp(-c * self.h)

    def linear(self, c: float) -> tuple[torch.Tensor, float]:
        """(sigma_c / sigma_s) e^{-c h} x_s (= e^{-2 c h} x_s) and 1 - e^{-2 c h}, the weight of D_s."""
        return math.exp(-2 * c * self.h) * self.x_s, -math.expm1(-2 * c * self.h)

    def noise_to(self, c: float) -> torch.Tensor:
        """sigma_c N_c, advancing the noise chain from the previous stage to c."""
        step = (c - self.c_prev) * self.h
        sigma_c = self.sigma_at(c)
        xi = _increment(self.x_s, self.noise, self.sigma_at(self.c_prev), sigma_c)
        self.noise_sum = math.exp(-step) * self.noise_sum + math.sqrt(-math.expm1(-2 * step)) * xi
        self.c_prev = c
        return sigma_c * self.noise_sum


def _seeds(denoiser, x, sigmas, noise, callback, stages):
    """Shared loop: ``stages(step, denoised) -> x_t`` makes the rest of one step; the step to 0 returns D."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, _sigma(x, sigmas[i]))
        x = denoised if sigma_next == 0 else stages(_SeedsStep(x, sigma, sigma_next, noise), denoised)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_seeds1(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """SEEDS-1 (Gonzalez et al. 2023, Alg. 1; = first-order SDE-DPM-Solver++), 1 NFE per step."""

    def stages(step: _SeedsStep, d_s):
        linear, weight = step.linear(1.0)
        return linear + weight * d_s + step.noise_to(1.0)

    return _seeds(denoiser, x, sigmas, noise, callback, stages)


@torch.no_grad()
def sample_seeds2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None, c2: float = 0.5,
    weights: str = "phi2",
) -> torch.Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, Alg. 2, data prediction), 2 NFE per step, 1 on the step to 0.

    ``weights`` says how D_s and the stage's D_2 are combined over the step:
      "phi2" (default): the exact integral of their linear interpolant in lambda against the SDE's weight
        2 e^{-2 (lambda_t - lambda)}: D_s (1 - e^{-2h}) + (D_2 - D_s) [1 - (1 - e^{-2h}) / (2h)] / c2, the
        exponential (ETD) weights that sample_seeds3 uses (b = h phi_2(-2h) / c);
      "phi1": D_s + (D_2 - D_s) / (2 c2) with weight 1 - e^{-2h} (D_2 alone at c2 = 1/2), the DPM-Solver-2 form.
    Both are second order as h -> 0. At the step sizes of 4-24 NFE (h ~ 1-4 in lambda) the SDE's weight
    sits near the step's end, where "phi1" still uses the midpoint value (measured: docs/bench_mixture.md).
    """
    if weights not in ("phi1", "phi2"):
        raise ValueError(f"weights must be 'phi1' or 'phi2', got {weights!r}")

    def stages(step: _SeedsStep, d_s):
        linear, weight = step.linear(c2)
        x_2 = linear + weight * d_s + step.noise_to(c2)
        d_2 = denoiser(x_2, _sigma(x_2, step.sigma_at(c2)))
        linear, weight = step.linear(1.0)
        if weights == "phi1":
            return linear + weight * (d_s + (d_2 - d_s) / (2 * c2)) + step.noise_to(1.0)
        b2 = _phi2(-2 * step.h) / c2  # negative: the weight of D_2 - D_s is -b2
        return linear + weight * d_s - b2 * (d_2 - d_s) + step.noise_to(1.0)

    return _seeds(denoiser, x, sigmas, noise, callback, stages)


@torch.no_grad()
def sample_seeds3(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """SEEDS-3 (Gonzalez et al. 2023, Alg. 4, data prediction, c2 = 1/3, c3 = 2/3), 3 NFE per step, 1 on the step to 0."""
    c2, c3 = 1 / 3, 2 / 3

    def stages(step: _SeedsStep, d_s):
        h = step.h
        linear, weight = step.linear(c2)
        x_2 = linear + weight * d_s + step.noise_to(c2)
        d_2 = denoiser(x_2, _sigma(x_2, step.sigma_at(c2)))
        a32 = (c3 / c2) * _phi2(-2 * c3 * h)
        a31 = math.expm1(-2 * c3 * h) - a32
        linear, _ = step.linear(c3)
        x_3 = linear - (a31 * d_s + a32 * d_2) + step.noise_to(c3)
        d_3 = denoiser(x_3, _sigma(x_3, step.sigma_at(c3)))
        b3 = _phi2(-2 * h) / c3
        b1 = math.expm1(-2 * h) - b3
        linear, _ = step.linear(1.0)
        return linear - (b1 * d_s + b3 * d_3) + step.noise_to(1.0)

    return _seeds(denoiser, x, sigmas, noise, callback, stages)


# Lazy and point-mass schedules (Damsholt et al., arXiv 2602.03789): the EDM denoiser converted, without
# retraining, to a schedule in which the drift of N(0, sd^2 I) data is identically zero, so that near-
# Gaussian data needs few steps. Steps fall at the grid's noise levels, mapped to the schedule's t.


def _schedule_times(schedule: Schedule, sigmas: torch.Tensor) -> torch.Tensor:
    return schedule.t_from_edm_sigma(sigmas.to(torch.float64))


@torch.no_grad()
def sample_euler_in_schedule(denoiser: Denoiser, x, sigmas, schedule: Schedule, callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE of ``schedule`` (x_t = alpha x0 + sigma n), 1 NFE per step."""
    t = _schedule_times(schedule, sigmas)
    x_t = x * float(schedule.alpha(t[0]))
    for i in range(len(sigmas) - 1):
        alpha = float(schedule.alpha(t[i]))
        denoised = denoiser(x_t / alpha, _sigma(x, sigmas[i]))
        x_t = x_t + float(t[i + 1] - t[i]) * velocity_from_x0(x_t, denoised, t[i].to(x.dtype), schedule)
        if callback is not None:
            callback({"i": i, "x": x_t / float(schedule.alpha(t[i + 1])), "sigma": sigmas[i], "denoised": denoised})
    return x_t / float(schedule.alpha(t[-1]))


@torch.no_grad()
def sample_euler_maruyama_in_schedule(denoiser: Denoiser, x, sigmas, schedule: Schedule, noise=None, callback=None) -> torch.Tensor:
    """Euler-Maruyama on the eps*-SDE of ``schedule`` run from noise to data, 1 NFE per step."""
    t = _schedule_times(schedule, sigmas)
    x_t = x * float(schedule.alpha(t[0]))
    for i in range(len(sigmas) - 1):
        alpha, dt = float(schedule.alpha(t[i])), float(t[i] - t[i + 1])
        denoised = denoiser(x_t / alpha, _sigma(x, sigmas[i]))
        drift = reverse_sde_drift(x_t, denoised, t[i].to(x.dtype), schedule)
        diffusion = math.sqrt(2 * float(schedule.eps_star(t[i])) * dt)
        # The step onto sigma = 0 has no Brownian increment in tau = 1 / sigma^2 (tau is infinite there).
        xi = _increment(x, noise, sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else _randn_like(x, noise)
        x_t = x_t - dt * drift + diffusion * xi
        if callback is not None:
            callback({"i": i, "x": x_t / float(schedule.alpha(t[i + 1])), "sigma": sigmas[i], "denoised": denoised})
    return x_t / float(schedule.alpha(t[-1]))


@torch.no_grad()
def sample_ab2_in_schedule(denoiser: Denoiser, x, sigmas, schedule: Schedule, callback=None) -> torch.Tensor:
    """Adams-Bashforth 2 (variable step) on the probability-flow ODE of ``schedule`` in its own time t, 1 NFE per step.

    x_{n+1} = x_n + h_n [(1 + r/2) u_n - (r/2) u_{n-1}], r = min(h_n / h_{n-1}, 1), h = t_{n+1} - t_n, u the schedule's
    velocity dx_t/dt from the denoiser; the first step is Euler. Second order in t: the local error is
    O(h^3) in the schedule's variable x_t and its own time t, not in EDM's sigma or in log-SNR.
    """
    t = _schedule_times(schedule, sigmas)
    x_t = x * float(schedule.alpha(t[0]))
    u_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        alpha = float(schedule.alpha(t[i]))
        denoised = denoiser(x_t / alpha, _sigma(x, sigmas[i]))
        u = velocity_from_x0(x_t, denoised, t[i].to(x.dtype), schedule)
        h = float(t[i + 1] - t[i])
        if u_prev is None:
            x_t = x_t + h * u
        else:
            # The extrapolation of u reaches r = h / h_prev history spans ahead; capped at one span. On a smoothly
            # refined grid r = 1 + O(h), so the cap changes the step by O(h^3): still second order. Without it the
            # geometrically growing t-steps of EDM's grid mapped to t (r up to 3) overshoot at 3-12 NFE.
            r = min(h / h_prev, 1.0)
            x_t = x_t + h * ((1 + r / 2) * u - (r / 2) * u_prev)
        u_prev, h_prev = u, h
        if callback is not None:
            callback({"i": i, "x": x_t / float(schedule.alpha(t[i + 1])), "sigma": sigmas[i], "denoised": denoised})
    return x_t / float(schedule.alpha(t[-1]))


def sample_lazy_ode(denoiser: Denoiser, x, sigmas, noise=None, callback=None, sigma_data: float = 0.5) -> torch.Tensor:
    """Euler on Damsholt et al.'s lazy ODE schedule alpha = cos, sigma = sd sin (Sec. 4); exact in 1 step for N(0, sd^2 I)."""
    return sample_euler_in_schedule(denoiser, x, sigmas, Cosine(sigma_data), callback)


def sample_lazy_sde(denoiser: Denoiser, x, sigmas, noise=None, callback=None, sigma_data: float = 0.5) -> torch.Tensor:
    """Euler-Maruyama on Damsholt et al.'s lazy point-mass schedule with eps* (Sec. 4); exact in 1 step for N(0, sd^2 I)."""
    return sample_euler_maruyama_in_schedule(denoiser, x, sigmas, PointMassLazy(sigma_data), noise, callback)


def sample_lazy_2m(denoiser: Denoiser, x, sigmas, noise=None, callback=None, sigma_data: float = 0.5) -> torch.Tensor:
    """Second-order multistep on the lazy ODE schedule (alpha = cos, sigma = sd sin): Adams-Bashforth 2 in its time t.

    Same time grid and 1 NFE per step as lazy_ode (EDM's grid mapped to t), whose Euler step it extends by
    the variable-step AB2 correction: second order in the cosine schedule's own t (not in log-SNR, where an
    exponential integrator would be DPM-Solver++(2M) again, the same map as in EDM's sigma). For
    N(0, sd^2 I) data the velocity is identically zero, so it is exact at any step count, 1 included.
    Measured against dpmpp_2m and lazy_ode on a 16-d mixture: docs/bench_mixture.md.
    """
    return sample_ab2_in_schedule(denoiser, x, sigmas, Cosine(sigma_data), callback)
