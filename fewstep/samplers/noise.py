"""Seed-per-image randomness for SDE solvers, and a Brownian path that coarse and fine solvers can share.

SDE solvers ask a noise source for ``increment(sigma, sigma_next, shape, dtype)``: the normalised
increment (W(tau_next) - W(tau)) / sqrt(tau_next - tau) of one Brownian motion W in the time
tau = 1 / sigma^2, a standard normal of shape [batch, *shape]. (In tau, with y = x / sigma^2, the
reverse SDE of EDM is dy = D dtau + dW: every solver's noise is an increment of that one W.)
Asked for successive, non-overlapping intervals, fresh normals are exact; ``BrownianPath`` also
answers overlapping or nested intervals consistently, so that solvers with different step counts
are driven by the same path (strong convergence tests, k-diffusion's BrownianTree idea).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch


class SeededNoise:
    """One torch.Generator per sample; draws are stacked along the batch dimension.

    The same seed gives the same noise whatever the batch it sits in, so results do not
    depend on batch size or on how samples are split across devices.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [len(seeds), *shape]."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def increment(self, sigma: float, sigma_next: float, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """A fresh normalised Brownian increment: exact when intervals are successive and disjoint."""
        return self.randn(shape, dtype)


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
