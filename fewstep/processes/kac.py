"""The Kac (telegraph) process and the Kac forward path of Duong et al. (arXiv 2506.20641), used by DistillKac.

Per coordinate: V_0 = +-c with probability 1/2, V flips sign at the events of a Poisson process of rate a,
and K_t = int_0^t V_s ds, so |K_t| <= c t. The law of K_t has atoms of mass e^{-at}/2 at +-ct (no flip
yet) and on |x| < ct the density
    p(x, t) = e^{-at} / (2c) [a I0(z) + a c t I1(z) / r],  r = sqrt(c^2 t^2 - x^2),  z = a r / c.
It solves the telegrapher's equation p_tt + 2a p_t = c^2 p_xx. The densities of (K_t, V_t = +-c) are
p_+-(x, t) = e^{-at} / (4c) [a I0(z) + a (ct +- x) I1(z) / r], whence the conditional velocity
    v_K(x, t) = E[V_t | K_t = x] = c (p_+ - p_-) / p = x / (t + (r / c) I0(z) / I1(z)).

Bessel functions enter through the scaled i0e(z) = e^{-z} I0(z), i1e(z) = e^{-z} I1(z); every formula is
evaluated in float64 with e^{-at} e^{z} combined as exp(z - at) <= 1, so nothing overflows for large a t.

The path: x_t = f(t) x0 + K_{g(t)} on [0, T] with f(T) = 0, so x_T follows the product Kac law on
[-c g(T), c g(T)]^d whatever the data.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import ConfigError

# Entries (coordinates x padded flips) one simulation chunk may hold: bounds memory at ~100 MB.
_CHUNK = 1 << 21
# Below this z the series z I0/I1 = 2 + z^2/4 + O(z^4) replaces 0/0-prone Bessel ratios (next term z^4/96).
_SMALL_Z = 1e-3
# The continuous part of the CDF: 64-node Gauss-Legendre on [0, |x|], mapped to [0, 1]. p is analytic on the
# closed interval (I0(z) and I1(z)/z are entire in z^2, a polynomial in x), so the rule converges exponentially.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)
_GL_X, _GL_W = torch.from_numpy((_GL_NODES + 1) / 2), torch.from_numpy(_GL_WEIGHTS / 2)


def _positive(name: str, value: float, what: str) -> float:
    if not value > 0:
        raise ConfigError(f"{what} {name}={value} must be positive: use {name} > 0")
    return float(value)


def _time_like(t, x: Tensor) -> Tensor:
    """t in float64 on x's device, a [batch] tensor viewed as [batch, 1, ...] to broadcast against x."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.view((-1,) + (1,) * (x.ndim - 1)) if t.ndim == 1 and x.ndim > 1 else t


def _out_dtype(x) -> torch.dtype:
    return x.dtype if isinstance(x, Tensor) and x.is_floating_point() else torch.float64


class KacProcess:
    """K_t = int_0^t V_s ds for a velocity V = +-c that flips at rate a, independently per coordinate."""

    def __init__(self, a: float = 9.0, c: float = 3.0):
        self.a = _positive("a", a, "Kac rate")
        self.c = _positive("c", c, "Kac speed")

    def __repr__(self) -> str:
        return f"KacProcess(a={self.a}, c={self.c})"

    # ----- moments and atoms -----

    def variance(self, t) -> Tensor:
        """Var K_t = (c^2 / a) [t - (1 - e^{-2at}) / (2a)] (the mean is 0)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.c**2 / self.a * (t + torch.expm1(-2 * self.a * t) / (2 * self.a))

    def atom_mass(self, t) -> Tensor:
        """P(K_t = ct) = P(K_t = -ct) = e^{-at} / 2: no flip by time t."""
        return 0.5 * torch.exp(-self.a * torch.as_tensor(t, dtype=torch.float64))

    # ----- exact simulation -----

    def sample(self, t, shape, generator: torch.Generator | None = None, return_velocity: bool = False,
               dtype: torch.dtype = torch.float32, device=None):
        """Exact draws of K_t (and V_t if ``return_velocity``) of shape ``shape``, independent per coordinate.

        t is a float or a [batch] tensor with batch = shape[0] (broadcast over the other dims). The
        telegraph process is simulated exactly: N ~ Poisson(a t) flips at the order statistics tau_j of N
        uniforms on [0, t], K_t = V_0 sum_j (-1)^j (tau_{j+1} - tau_j) with tau_0 = 0, tau_{N+1} = t, and
        V_t = V_0 (-1)^N. The N + 1 spacings of N sorted uniforms on [0, t] are t E_j / sum_i E_i with
        E_0..E_N iid Exp(1) (Renyi's representation), so the walk sum_j (-1)^j (spacing j) is
        t (G_+ - G_-) / (G_+ + G_-), with independent G_+ ~ Gamma(ceil((N + 1) / 2)) and
        G_- ~ Gamma(floor((N + 1) / 2)) the sums of the even and of the odd E_j: two gamma draws per
        coordinate, nothing sorted or padded, O(1) time and memory per coordinate for any a t. The draws
        are exact up to float64 rounding (then cast to ``dtype``); a draw with N = 0 is exactly +-c t, the
        atom. The device is ``device``, else t's, else the generator's.
        """
        shape = tuple(shape)
        if device is None:
            device = t.device if isinstance(t, Tensor) else generator.device if generator is not None else "cpu"
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.ndim > 1 or (t.ndim == 1 and (not shape or t.shape[0] != shape[0])):
            raise ConfigError(f"Kac sample time of shape {tuple(t.shape)} does not fit shape {shape}: "
                              "pass a float or a [batch] tensor with batch = shape[0]")
        if t.numel() and bool((t < 0).any()):
            raise ConfigError("Kac sample time t must be >= 0: clamp the times to t >= 0")
        t = (t.view((-1,) + (1,) * (len(shape) - 1)) if t.ndim == 1 else t).expand(shape).reshape(-1)
        sign0 = 2 * torch.randint(0, 2, t.shape, generator=generator, device=device, dtype=torch.float64) - 1
        flips = torch.poisson(self.a * t, generator=generator)
        # sum_j (-1)^j (segment j), in [-t, t]; torch._standard_gamma is what torch.distributions.Gamma draws
        # with, the one gamma sampler that takes a generator
        positive = torch._standard_gamma(torch.floor(flips / 2) + 1, generator=generator)
        odd = torch.floor((flips + 1) / 2)  # 0 without a flip: the one segment is positive
        negative = torch._standard_gamma(odd.clamp(min=1), generator=generator) * (odd > 0)
        walk = t * ((positive - negative) / (positive + negative))  # the ratio first: N = 0 gives t exactly
        cone = self.c * t
        k = torch.minimum(torch.maximum(sign0 * self.c * walk, -cone), cone).reshape(shape).to(dtype)
        if not return_velocity:
            return k
        v = (sign0 * self.c * (1 - 2 * (flips % 2))).reshape(shape).to(dtype)
        return k, v

    # ----- the law of K_t -----

    def _inside(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """r = sqrt(c^2 t^2 - x^2) as sqrt((ct - |x|)(ct + |x|)) (accurate near the cone) and z = a r / c."""
        ct = self.c * t
        r = ((ct - x.abs()).clamp(min=0) * (ct + x.abs())).sqrt()
        return r, self.a * r / self.c

    def density(self, x, t) -> Tensor:
        """p(x, t) = exp(z - at) / (2c) [a i0e(z) + a^2 t i1e(z) / z] on |x| < ct, 0 elsewhere (atoms excluded).

        a c t I1(z) / r = a^2 t I1(z) / z, whose z -> 0 limit a^2 t / 2 is taken by series.
        """
        x64 = torch.as_tensor(x, dtype=torch.float64)
        t = _time_like(t, x64)
        r, z = self._inside(x64, t)
        small = z < _SMALL_Z
        zs = torch.where(small, torch.ones_like(z), z)
        # e^{-z} I1(z) / z; series e^{-z} (1 + z^2 / 8) / 2 near 0
        i1e_over_z = torch.where(small, torch.exp(-z) * 0.5 * (1 + z**2 / 8), torch.special.i1e(zs) / zs)
        p = torch.exp(z - self.a * t) / (2 * self.c) * (self.a * torch.special.i0e(z) + self.a**2 * t * i1e_over_z)
        return torch.where(x64.abs() < self.c * t, p, torch.zeros_like(p)).to(_out_dtype(x))

    def cdf(self, x, t) -> Tensor:
        """P(K_t <= x) = 1/2 + sign(x) int_0^{|x|} p(y, t) dy on |x| < ct (symmetry), 0 below -ct, 1 from ct on.

        The atoms enter through symmetry: P(K_t < 0) = 1/2. The integral is 64-node Gauss-Legendre in
        float64; against scipy's adaptive quad the error is below 1e-13 for a t <= 2000 (5e-11 at a t = 1e4).
        """
        x64 = torch.as_tensor(x, dtype=torch.float64)
        t = _time_like(t, x64)
        x64, t = torch.broadcast_tensors(x64, t)
        y = torch.minimum(x64.abs(), self.c * t).reshape(-1, 1)
        tt = t.reshape(-1, 1)
        nodes, weights = _GL_X.to(y.device), _GL_W.to(y.device)
        integral = torch.empty(y.shape[0], dtype=torch.float64, device=y.device)
        rows = max(1, _CHUNK // nodes.numel())
        for lo in range(0, y.shape[0], rows):
            yc, tc = y[lo:lo + rows], tt[lo:lo + rows]
            integral[lo:lo + rows] = yc[:, 0] * (self.density(yc * nodes, tc) @ weights)
        f = 0.5 + torch.sign(x64) * integral.reshape(x64.shape)
        f = torch.where(x64 >= self.c * t, torch.ones_like(f), f)
        f = torch.where(x64 < -self.c * t, torch.zeros_like(f), f)
        return f.to(_out_dtype(x))

    def velocity(self, x, t) -> Tensor:
        """v_K(x, t) = E[V_t | K_t = x] = x / (t + h(z) / a) on |x| < ct, h(z) = z I0(z) / I1(z); c sign(x) on the cone.

        h = z i0e / i1e rises from h(0) = 2 (taken by its series), so |v_K| < c inside and the inner
        limit at the cone is ct / (t + 2/a). On and beyond the cone, |x| >= ct, v_K = c sign(x): there
        sit the atoms, which have not flipped. The cone is widened inward by 4 ulps of x's dtype so an
        atom drawn by ``sample`` and cast to float32 still counts as one; pass K itself, not a value
        recomputed as x_t - f(t) x0, whose rounding can move an atom off the cone. At t = 0 this gives
        v_K(0, 0) = 0 (the mean of V_0) and c sign(x) elsewhere. t: a float or [batch] (over x's dims).
        """
        x64 = torch.as_tensor(x, dtype=torch.float64)
        t = _time_like(t, x64)
        r, z = self._inside(x64, t)
        small = z < _SMALL_Z
        zs = torch.where(small, torch.ones_like(z), z)
        h = torch.where(small, 2 + z**2 / 4, zs * torch.special.i0e(zs) / torch.special.i1e(zs))
        v = x64 / (t + h / self.a)
        tol = 4 * torch.finfo(_out_dtype(x)).eps
        on_cone = x64.abs() >= self.c * t * (1 - tol)
        return torch.where(on_cone, self.c * torch.sign(x64), v).to(_out_dtype(x))


# ----- the forward path x_t = f(t) x0 + K_{g(t)} -----

_F = {  # name -> (f, f')
    "linear": (lambda t, T: 1 - t / T, lambda t, T: torch.full_like(t, -1 / T)),
    "cosine": (lambda t, T: torch.cos(math.pi * t / (2 * T)),
               lambda t, T: -math.pi / (2 * T) * torch.sin(math.pi * t / (2 * T))),
}
_G = {  # name -> (g, g')
    "linear": (lambda t, T: t, lambda t, T: torch.ones_like(t)),
    "quadratic": (lambda t, T: t**2 / T, lambda t, T: 2 * t / T),
}


def _schedule(table: dict, kind: str, name: str):
    if name not in table:
        raise ConfigError(f"unknown Kac path schedule {kind}={name!r}: choose one of {', '.join(table)}")
    return table[name]


def _view(t: Tensor, x: Tensor) -> Tensor:
    """t of shape [batch] as [batch, 1, ...] in x's dtype, for broadcasting against x."""
    return t.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1))


class KacPath:
    """x_t = f(t) x0 + K_{g(t)} on [0, T], f and g named schedules (_F, _G), each coordinate its own Kac process."""

    def __init__(self, process: KacProcess, T: float = 1.0, f: str = "linear", g: str = "linear"):
        self.process = process
        self.T = _positive("T", T, "Kac path horizon")
        self.f_name, self.g_name = f, g
        self._f, self._df = _schedule(_F, "f", f)
        self._g, self._dg = _schedule(_G, "g", g)

    def __repr__(self) -> str:
        return f"KacPath({self.process!r}, T={self.T}, f={self.f_name!r}, g={self.g_name!r})"

    def f(self, t: Tensor) -> Tensor:
        return self._f(t, self.T)

    def df(self, t: Tensor) -> Tensor:
        return self._df(t, self.T)

    def g(self, t: Tensor) -> Tensor:
        return self._g(t, self.T)

    def dg(self, t: Tensor) -> Tensor:
        return self._dg(t, self.T)

    def forward(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, k) with x_t = f(t) x0 + k, k = K_{g(t)} drawn exactly; t of shape [batch]."""
        t = torch.as_tensor(t, device=x0.device)
        k = self.displacement(t, x0.shape, generator, x0.dtype, x0.device)
        return self.at(x0, t, k), k

    def displacement(self, t: Tensor, shape, generator: torch.Generator | None = None, dtype=torch.float32,
                     device=None) -> Tensor:
        """k = K_{g(t)} of shape ``shape`` for times t of shape [shape[0]], drawn exactly."""
        return self.process.sample(self.g(t), shape, generator=generator, dtype=dtype, device=device)

    def at(self, x0: Tensor, t: Tensor, k: Tensor) -> Tensor:
        """x_t = f(t) x0 + k."""
        return _view(self.f(t), x0) * x0 + k

    def target(self, x0: Tensor, k: Tensor, t: Tensor) -> Tensor:
        """u* = f'(t) x0 + g'(t) v_K(k, g(t)) = E[d x_t / dt | x0, K_{g(t)} = k]; pass k from ``forward``."""
        t = torch.as_tensor(t, device=x0.device)
        return _view(self.df(t), x0) * x0 + _view(self.dg(t), x0) * self.process.velocity(k, self.g(t)).to(x0.dtype)

    def prior_time(self) -> float:
        """g(T), the Kac time of the prior x_T = K_{g(T)}; a ConfigError unless f(T) = 0 (x_T free of the data)."""
        big_t = torch.tensor(self.T, dtype=torch.float64)
        f_end = float(self.f(big_t))
        if abs(f_end) > 1e-12:
            raise ConfigError(f"Kac path f(T)={f_end:g} is not 0, so x_T depends on the data: use f with f(T) = 0")
        return float(self.g(big_t))

    def prior(self, shape, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
              device=None) -> Tensor:
        """Draws of x_T = K_{g(T)}: the product Kac law on [-c g(T), c g(T)]^d (needs f(T) = 0)."""
        return self.process.sample(self.prior_time(), shape, generator=generator, dtype=dtype, device=device)
