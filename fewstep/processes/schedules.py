"""Gaussian noise schedules x_t = alpha(t) x0 + sigma(t) n, and the conversion of a model between them.

Convention: t = 0 is data, t = t_max is noise; lambda = log(alpha / sigma) (half the log-SNR) falls
with t. Every schedule is EDM's sigma space in disguise: x_t / alpha = x0 + (sigma / alpha) n, so a
denoiser D(x, sigma) serves all of them, with sigma_edm = sigma / alpha = exp(-lambda).

Damsholt et al. (arXiv 2602.03789) write I_t = alpha Z + beta X with t running from noise to data;
their (alpha, beta, t) are our (sigma, alpha, t_max - t). Point-mass schedules have
alpha(t_max) = sigma(t_max) = 0: the base collapses to the origin.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class Schedule:
    """alpha(t), sigma(t), their t-derivatives, lambda(t) and its inverse. Subclasses give closed forms."""

    t_max: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda = log(alpha / sigma)."""
        return self.alpha(t).log() - self.sigma(t).log()

    def d_log_snr(self, t: Tensor) -> Tensor:
        return self.d_alpha(t) / self.alpha(t) - self.d_sigma(t) / self.sigma(t)

    def edm_sigma(self, t: Tensor) -> Tensor:
        """The noise level of x_t / alpha(t) in EDM's space: sigma / alpha."""
        return self.sigma(t) / self.alpha(t)

    def t_from_edm_sigma(self, sigma: Tensor) -> Tensor:
        return self.t_from_log_snr(-torch.as_tensor(sigma).log())

    def eps_star(self, t: Tensor) -> Tensor:
        """The statistically optimal diffusion eps*_t = sigma^2 (sigma'/sigma - alpha'/alpha) = -sigma^2 lambda'.

        With it the SDE dx = [u - eps* score] dt + sqrt(2 eps*) dW (run backwards in t) is the usual
        reverse SDE; for EDM (alpha = 1, sigma = t) it gives eps* = t, i.e. g^2 = 2 t.
        """
        return -self.sigma(t) ** 2 * self.d_log_snr(t)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class EDM(Schedule):
    """alpha = 1, sigma = t (Karras et al. 2022); t runs to infinity."""

    t_max = math.inf

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_log_snr(self, lam):
        return (-lam).exp()


class VE(Schedule):
    """Song et al. 2021 variance exploding: alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def t_from_log_snr(self, lam):
        return (-lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


class VP(Schedule):
    """Song et al. 2021 variance preserving (DDPM's linear beta): log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return self._log_alpha(t).exp()

    def sigma(self, t):
        return (-torch.expm1(2 * self._log_alpha(t))).sqrt()

    def d_alpha(self, t):
        return self.alpha(t) * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def log_snr(self, t):
        log_alpha = self._log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(2 lambda); solve the quadratic in t for log alpha.
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        delta = self.beta_max - self.beta_min
        return (-0.5 * self.beta_min + (0.25 * self.beta_min**2 - delta * log_alpha).sqrt()) / (0.5 * delta)


class Cosine(Schedule):
    """alpha = cos(pi t / 2), sigma = k sin(pi t / 2) (Nichol & Dhariwal 2021 without the offset).

    With k = sigma_data it is the lazy ODE schedule of Damsholt et al.: alpha^2 sd^2 + sigma^2 is
    constant, so for data N(0, sd^2 I) the probability-flow velocity is identically zero.
    """

    def __init__(self, noise_scale: float = 1.0):
        self.noise_scale = noise_scale

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return self.noise_scale * torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * self.noise_scale * torch.cos(0.5 * math.pi * t)

    def t_from_log_snr(self, lam):
        return torch.atan((-lam).exp() / self.noise_scale) * (2 / math.pi)


class Linear(Schedule):
    """The linear interpolant of flow matching / rectified flow: alpha = 1 - t, sigma = t."""

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_log_snr(self, lam):
        return torch.sigmoid(-lam)


class PointMassLazy(Schedule):
    """alpha = 1 - t, sigma = sd sqrt(t (1 - t)): a point-mass schedule (both vanish at t = 1).

    Damsholt et al.'s lazy SDE schedule: alpha_paper^2 = sd^2 beta (1 - beta). Then eps* = sd^2 / 2
    is constant and, for data N(0, sd^2 I), E[x0 | x_t] = x_t, so the eps*-SDE has zero drift:
    x_t = sd W_{1-t}, and one Euler-Maruyama step samples the data law exactly.
    """

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return self.sigma_data * (t * (1 - t)).sqrt()

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return self.sigma_data * (1 - 2 * t) / (2 * (t * (1 - t)).sqrt())

    def log_snr(self, t):
        return 0.5 * (torch.log1p(-t) - t.log()) - math.log(self.sigma_data)

    def d_log_snr(self, t):
        return -0.5 / (t * (1 - t))

    def t_from_log_snr(self, lam):
        # (1 - t) / t = sd^2 e^{2 lambda}
        return torch.sigmoid(-2 * lam - 2 * math.log(self.sigma_data))


SCHEDULES: dict[str, type[Schedule]] = {
    "edm": EDM, "ve": VE, "vp": VP, "cosine": Cosine, "linear": Linear, "point_mass_lazy": PointMassLazy,
}


def _view(t: Tensor, x: Tensor) -> Tensor:
    """t as a [batch, 1, ...] tensor in x's dtype and device, for broadcasting against x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return t.view((-1,) + (1,) * (x.ndim - 1))


def x0_from_velocity(x: Tensor, u: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """Invert u = alpha' x0 + sigma' n at x = alpha x0 + sigma n: x0 = (sigma u - sigma' x) / (alpha' sigma - sigma' alpha)."""
    a, s, da, ds = (_view(f(t), x) for f in (schedule.alpha, schedule.sigma, schedule.d_alpha, schedule.d_sigma))
    return (s * u - ds * x) / (da * s - ds * a)


def velocity_from_x0(x: Tensor, x0: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """u = alpha' x0 + sigma' n with n = (x - alpha x0) / sigma."""
    a, s, da, ds = (_view(f(t), x) for f in (schedule.alpha, schedule.sigma, schedule.d_alpha, schedule.d_sigma))
    return da * x0 + ds * (x - a * x0) / s


def denoiser_from_velocity(velocity: Callable[..., Tensor], schedule: Schedule) -> Callable[..., Tensor]:
    """A velocity model ``velocity(x_t, t, **cond)`` of ``schedule`` as an EDM denoiser ``D(x, sigma, **cond)``."""

    def denoiser(x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        t = schedule.t_from_edm_sigma(sigma)
        x_t = x * _view(schedule.alpha(t), x)
        return x0_from_velocity(x_t, velocity(x_t, t, **cond).to(x.dtype), t, schedule)

    return denoiser


def x0_from_denoiser(denoiser: Callable[..., Tensor], x: Tensor, t: Tensor, schedule: Schedule, **cond) -> Tensor:
    """E[x0 | x_t = x] under ``schedule`` from an EDM denoiser: D(x / alpha, sigma / alpha)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return denoiser(x / _view(schedule.alpha(t), x), schedule.edm_sigma(t), **cond)


def velocity_from_denoiser(denoiser: Callable[..., Tensor], schedule: Schedule) -> Callable[..., Tensor]:
    """The probability-flow velocity ``u(x_t, t, **cond)`` of ``schedule`` from an EDM denoiser."""

    def velocity(x: Tensor, t: Tensor, **cond) -> Tensor:
        return velocity_from_x0(x, x0_from_denoiser(denoiser, x, t, schedule, **cond), t, schedule)

    return velocity


def convert_velocity(velocity: Callable[..., Tensor], source: Schedule, target: Schedule) -> Callable[..., Tensor]:
    """Damsholt et al.'s schedule conversion: a model of ``source`` becomes the velocity of ``target``.

    Matching the signal-to-noise ratio, tau(s) = lambda_src^{-1}(lambda_tgt(s)) and c_s = alpha_tgt(s) /
    alpha_src(tau(s)), so X_tgt(s) = c_s X_src(tau(s)) and
    u_tgt(s, x) = (c'_s / c_s) x + c_s tau'(s) u_src(tau(s), x / c_s), with tau' = lambda_tgt' / lambda_src'.
    No retraining; the same ODE solution, reparametrised.
    """

    def converted(x: Tensor, s: Tensor, **cond) -> Tensor:
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
        tau = source.t_from_log_snr(target.log_snr(s))
        d_tau = target.d_log_snr(s) / source.d_log_snr(tau)
        c = target.alpha(s) / source.alpha(tau)
        # c'/c = alpha_tgt'/alpha_tgt - tau' alpha_src'(tau)/alpha_src(tau)
        dc_over_c = target.d_alpha(s) / target.alpha(s) - d_tau * source.d_alpha(tau) / source.alpha(tau)
        u = velocity(x / _view(c, x), tau, **cond).to(x.dtype)
        return _view(dc_over_c, x) * x + _view(c * d_tau, x) * u

    return converted


def reverse_sde_drift(x: Tensor, x0: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """Drift f of the eps*-SDE dx = f dt + sqrt(2 eps*) dW run from t_max down to 0, given x0 = E[x0 | x_t].

    f = u - eps* score = (2 sigma'/sigma - alpha'/alpha) x + 2 (alpha' - sigma' alpha / sigma) x0.
    """
    a, s, da, ds = (_view(f(t), x) for f in (schedule.alpha, schedule.sigma, schedule.d_alpha, schedule.d_sigma))
    return (2 * ds / s - da / a) * x + 2 * (da - ds * a / s) * x0
