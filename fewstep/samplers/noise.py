"""Seed-per-image randomness for SDE solvers, and a Brownian path that coarse and fine solvers can share.

SDE solvers ask a noise source for ``increment(sigma, sigma_next, shape, dtype)``: the normalised
increment (W(tau_next) - W(tau)) / sqrt(tau_next - tau) of one Brownian motion W in the time
tau = 1 / sigma^2, a standard normal of shape [batch, *shape]. (In tau, with y = x / sigma^2, the
reverse SDE of EDM is dy = D dtau + dW: every solver's noise is an increment of that one W.)
Asked for successive, non-overlapping intervals, fresh normals are exact; ``BrownianPath`` also
answers overlapping or nested intervals consistently, so that solvers with different step counts
are driven by the same path (strong convergence tests, k-diffusion's BrownianTree idea).

The per-image generator is counter-based: image i's noise is a pure function of (its seed, the index of
the draw along the trajectory, the element's index), computed for the whole batch at once with a few
int64 tensor operations. It is SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
number generators", OOPSLA; the splitmix64.c of Vigna): its output function

    mix64(z) = z3,  z1 = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9,  z2 = (z1 ^ (z1 >>> 27)) * 0x94D049BB133111EB,
               z3 = z2 ^ (z2 >>> 31)                                             (all mod 2^64)

a bijection of 64-bit words with full avalanche (Stafford's "Mix13"), and its state update z += GOLDEN,
GOLDEN = 0x9E3779B97F4A7C15 (2^64 / golden ratio, odd). For seed s and draw d:

    seed key   S(s)    = mix64(s + GOLDEN)                   the first SplitMix64 output of state s
    draw key   D(d)    = mix64(DRAW_SALT + d * GOLDEN)        output d of a SplitMix64 stream with a fixed salt
    row key    R(s, d) = mix64(S(s) + D(d))
    word j     w_j     = mix64(R(s, d) + (j + 1) * GOLDEN)    output j of SplitMix64 started at state R(s, d)

so every (seed, draw) row is its own SplitMix64 stream (a generator that passes BigCrush), seeds
0, 1, 2, ... and draws 0, 1, 2, ... enter only through full-avalanche hashes (seed s at draw d + 1 is
unrelated to seed s + 1 at draw d), and two rows' streams overlap only if their keys differ by j GOLDEN
with |j| below the row length: probability ~2 n / 2^64 per pair of rows (n words a row), like any
64-bit counter space. Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3",
SC11) was the alternative: collision-free by construction, but its ten rounds of 32x32->64 multiplies
cost ~100 tensor operations per 128 bits where mix64 costs 11 per 64 bits, and here the cost of a draw
is the point. torch's int64 multiply wraps mod 2^64 on CPU and CUDA; torch's >> is arithmetic, so the
logical shifts >>> are a shift and a mask. The words are thus the same integers on every device and in
every batch (checked against a pure-Python SplitMix64 in tests/test_counter_noise.py).

From words to numbers:
  * ``randn``: one word gives two normals by Box-Muller. Its high 32 bits, as a signed int h, folded to
    k = h ^ (h >> 31) in [0, 2^31), give u1 = (k + 1/2) 2^-31 in (0, 1) (never 0, so no log(0)); its low
    32 bits, signed, give theta = pi l 2^-31 in [-pi, pi); with m = ceil(n / 2) words for n elements,
    element j is r cos(theta) and element m + j is r sin(theta) of word j, r = sqrt(-2 log u1).
    u1 >= 2^-32 bounds |z| by sqrt(64 log 2) = 6.66 (P(|Z| > 6.66) = 2.7e-11); u1 is fine-grained where
    it matters, near 0 (the tails). The arithmetic is float32 (float64 when float64 is asked for), so the
    floats agree across devices up to the rounding of log, sin and cos.
  * ``rand``: one word per element, uniform on (0, 1): its top 23 bits k as (k + 1/2) 2^-23 in float32,
    its top 52 as (k + 1/2) 2^-52 in float64 (exact: never 0 or 1).
A draw is one call: each ``randn``/``rand`` call advances the draw counter by one (draw 0 is the first
call, e.g. the prior x_T), whatever its shape.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's output multipliers
DRAW_SALT = 0xD1B54A32D192ED03  # an odd constant that keeps the draw keys apart from the seed keys
# the int32 halves of an int64 word in memory (CUDA devices are little-endian)
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)


def _signed(value: int) -> int:
    """A 64-bit word as the int64 that holds the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64_int(z: int) -> int:
    """SplitMix64's output function on a Python int (mod 2^64): the reference the tensor version follows."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * MIX2) & _MASK64
    return z ^ (z >> 31)


_S_GOLDEN, _S_MIX1, _S_MIX2 = _signed(GOLDEN), _signed(MIX1), _signed(MIX2)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """mix64 in place on an int64 tensor; >>> k is (>> k) & (2^(64-k) - 1), torch's >> being arithmetic."""
    t = torch.bitwise_right_shift(z, 30)
    z.bitwise_xor_(t.bitwise_and_((1 << 34) - 1)).mul_(_S_MIX1)
    torch.bitwise_right_shift(z, 27, out=t)
    z.bitwise_xor_(t.bitwise_and_((1 << 37) - 1)).mul_(_S_MIX2)
    torch.bitwise_right_shift(z, 31, out=t)
    return z.bitwise_xor_(t.bitwise_and_((1 << 33) - 1))


def draw_key(draw: int) -> int:
    """D(d) = mix64(DRAW_SALT + d GOLDEN), as an int64 value."""
    return _signed(mix64_int(DRAW_SALT + draw * GOLDEN))


class SeededNoise:
    """Per-image noise from a counter-based generator (SplitMix64 over (seed, draw, element); module docstring).

    Image i's noise depends only on its seed and on how many draws came before, not on the batch it sits in,
    the batch's order or size, or the device count. ``seeds``: any integers (taken mod 2^64).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        seeds = torch.as_tensor([_signed(s) for s in self.seeds], dtype=torch.int64, device=self.device)
        self.seed_keys = _mix64_(seeds + _S_GOLDEN)  # S(s), [batch]
        self.draws = 0  # the index of the next draw
        self._offsets: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.seed_keys)

    def words(self, n: int) -> torch.Tensor:
        """The next draw's raw 64-bit words w_0 .. w_{n-1} per seed, an int64 tensor [batch, n]; advances the draw."""
        offsets = self._offsets.get(n)
        if offsets is None:  # (j + 1) GOLDEN, j < n
            if len(self._offsets) >= 8:  # a solver asks for one or two shapes
                self._offsets.clear()
            offsets = torch.arange(1, n + 1, dtype=torch.int64, device=self.device).mul_(_S_GOLDEN)
            self._offsets[n] = offsets
        rows = _mix64_(self.seed_keys + draw_key(self.draws))  # R(s, d)
        self.draws += 1
        return _mix64_(rows[:, None] + offsets)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [len(seeds), *shape] (Box-Muller, two normals per word)."""
        shape = tuple(shape)
        n = math.prod(shape)
        pairs = (n + 1) // 2
        halves = self.words(pairs).view(torch.int32).view(len(self), pairs, 2)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        # |h + 1/2| for the signed high half h is k + 1/2 with k = h ^ (h >> 31): exact wherever u1 is small
        radius = halves[..., _HI].to(work).add_(0.5).abs_().mul_(2.0**-31).log_().mul_(-2.0).sqrt_()
        angle = halves[..., _LO].to(work).mul_(math.pi * 2.0**-31)
        out = torch.empty(len(self), n, dtype=work, device=self.device)
        torch.mul(radius, torch.cos(angle), out=out[:, :pairs])  # element j < pairs: r_j cos(theta_j)
        if n > pairs:  # element pairs + j: r_j sin(theta_j)
            torch.mul(radius[:, : n - pairs], angle[:, : n - pairs].sin_(), out=out[:, pairs:])
        return out.view(len(self), *shape).to(dtype)

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform noise on the open interval (0, 1) of shape [len(seeds), *shape], float32 or float64."""
        shape = tuple(shape)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"SeededNoise.rand draws float32 or float64, not {dtype}")
        bits = 52 if dtype == torch.float64 else 23
        top = self.words(math.prod(shape)).bitwise_right_shift_(64 - bits).bitwise_and_((1 << bits) - 1)
        return top.to(dtype).add_(0.5).mul_(2.0**-bits).reshape(len(self), *shape)

    def increment(self, sigma: float, sigma_next: float, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """A fresh normalised Brownian increment: exact when intervals are successive and disjoint."""
        return self.randn(shape, dtype)


# ----- the Kac prior from uniforms -----

POISSON_TAIL = 1e-12  # the Poisson law is cut where P(N > n_max) < POISSON_TAIL; that mass goes to n_max


def poisson_cdf_table(mean: float, tail: float = POISSON_TAIL) -> torch.Tensor:
    """P(N <= k), k = 0 .. n_max, float64, for N ~ Poisson(mean), n_max the least k with P(N > k) < tail.

    The last entry is set to 1: the tail mass beyond n_max (< ``tail``) is drawn as n_max.
    """
    if mean == 0:
        return torch.ones(1, dtype=torch.float64)
    top = int(mean + 40 * math.sqrt(mean) + 60)  # P(N > top) is far below 1e-100
    k = torch.arange(top + 1, dtype=torch.float64)
    pmf = torch.exp(k * math.log(mean) - mean - torch.lgamma(k + 1))
    above = pmf.flip(0).cumsum(0).flip(0) - pmf  # P(N > k), summed from the small end of the tail
    n_max = int(torch.nonzero(above < tail)[0])
    cdf = 1 - above[: n_max + 1]
    cdf[-1] = 1.0
    return cdf


def kac_prior(noise: SeededNoise, process, t: float, shape: Sequence[int], dtype: torch.dtype = torch.float32):
    """Exact draws of K_t (``process`` a KacProcess: rate a, speed c) of shape [len(seeds), *shape], per seed.

    The law of ``KacProcess.sample``: N ~ Poisson(a t) flips, K_t = V_0 t (G+ - G-) / (G+ + G-) with
    G+ ~ Gamma(floor(N / 2) + 1), G- ~ Gamma(floor((N + 1) / 2)) the sums of the even and of the odd ones
    among N + 1 exponentials, V_0 = +-c, built from counter-based uniforms so that image i depends on its seed
    only: N by inversion of a float64 Poisson table (``poisson_cdf_table``, cut at tail mass 1e-12), the sign
    from one uniform, exponential j = -log U_j for j = 0 .. n_max (masked to j <= N). Uses 3 + n_max draws of
    ``noise``, in that order; N = 0 gives exactly +-c t, the atom. Arithmetic in float64, cast to ``dtype``.
    """
    shape = tuple(shape)
    t = float(t)
    cdf = poisson_cdf_table(process.a * t).to(noise.device)
    flips = torch.searchsorted(cdf, noise.rand(shape, torch.float64))  # least k with U <= P(N <= k)
    sign = torch.where(noise.rand(shape, torch.float64) < 0.5, -1.0, 1.0)
    positive = torch.zeros(len(noise), *shape, dtype=torch.float64, device=noise.device)
    negative = torch.zeros_like(positive)
    for j in range(len(cdf)):
        exponential = noise.rand(shape, torch.float64).log_().neg_()
        (positive if j % 2 == 0 else negative).add_(exponential.mul_(flips >= j))
    walk = t * ((positive - negative) / (positive + negative))  # the ratio first: N = 0 gives t exactly
    cone = process.c * t
    return (sign * process.c * walk).clamp_(-cone, cone).to(dtype)


class BrownianPath:
    """A Brownian motion W(tau), tau = 1 / sigma^2, W(0) = 0, sampled lazily and exactly.

    A new time beyond the last one extends the path by an independent increment; a time between two
    known ones is drawn from the Brownian bridge between them. Every query, in any order, is thus
    consistent with one path, and each sample's path depends only on its own seed (through
    ``source``, e.g. a SeededNoise).
    """

    def __init__(self, source):
        self.source = source
        self.times: list[float] = [0.0]
        self.values: list[torch.Tensor | float] = [0.0]  # W(0) = 0

    def _at(self, tau: float, shape, dtype) -> torch.Tensor:
        i = bisect.bisect_left(self.times, tau)
        if i < len(self.times) and self.times[i] == tau:
            return self.values[i]
        xi = self.source.randn(shape, dtype)
        left_t, left_w = self.times[i - 1], self.values[i - 1]
        if i == len(self.times):
            value = left_w + math.sqrt(tau - left_t) * xi
        else:
            right_t, right_w = self.times[i], self.values[i]
            weight = (tau - left_t) / (right_t - left_t)
            std = math.sqrt((tau - left_t) * (right_t - tau) / (right_t - left_t))
            value = left_w + weight * (right_w - left_w) + std * xi
        self.times.insert(i, tau)
        self.values.insert(i, value)
        return value

    def increment(self, sigma: float, sigma_next: float, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        tau, tau_next = 1 / float(sigma) ** 2, 1 / float(sigma_next) ** 2
        w, w_next = self._at(tau, shape, dtype), self._at(tau_next, shape, dtype)
        return ((w_next - w) / math.sqrt(tau_next - tau)).to(dtype)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noise that is not part of the path (EDM's churn), straight from the source."""
        return self.source.randn(shape, dtype)
