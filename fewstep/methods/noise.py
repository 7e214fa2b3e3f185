"""A training step's randomness, independent of how the global batch is split across devices."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch


def step_seed(seed: int, step: int, micro_batch: int = 0) -> int:
    """A 63-bit seed for (run seed, optimiser step, micro-batch), well mixed so that nearby steps are unrelated."""
    digest = hashlib.blake2b(f"fewstep/{seed}/{step}/{micro_batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchNoise:
    """Noise for the rows ``rank * n .. (rank + 1) * n`` of a global batch of ``world * n``.

    Every draw is made for the whole global batch from one generator and cut to this rank's rows, so
    ``world`` ranks with batch ``n`` draw together exactly what one process draws with batch ``world * n``
    (the data order, ``ResumableSampler``, gives rank r the same rows), and a resumed run draws what the
    uninterrupted one drew. Methods must make the same draws on every rank: the number and shapes of
    draws may depend on the config, never on this rank's data. ``generator`` None draws from torch's
    global generator (a method used outside a Trainer).
    """

    def __init__(self, n: int, device, generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        self.n, self.device, self.generator = n, torch.device(device), generator
        self.total, self.rows = world * n, slice(rank * n, (rank + 1) * n)

    @classmethod
    def for_step(cls, seed: int, step: int, n: int, device, rank: int = 0, world: int = 1, micro_batch: int = 0):
        """The noise of one training step of a seeded run."""
        generator = torch.Generator(torch.device(device)).manual_seed(step_seed(seed, step, micro_batch))
        return cls(n, device, generator, rank, world)

    @classmethod
    def fixed(cls, seed: int, n: int, device):
        """The same noise at every call (validation losses comparable across steps)."""
        return cls(n, device, torch.Generator(torch.device(device)).manual_seed(seed))

    def draw(self, fn: Callable[[int, torch.Generator | None], Any]) -> Any:
        """``fn(total, generator)``, a tensor (or a tuple of them) with the global batch first, cut to this rank's rows."""
        drawn = fn(self.total, self.generator)
        return tuple(x[self.rows] for x in drawn) if isinstance(drawn, tuple) else drawn[self.rows]

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.draw(lambda total, g: torch.randn(total, *shape, generator=g, device=self.device, dtype=dtype))

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.draw(lambda total, g: torch.rand(total, *shape, generator=g, device=self.device, dtype=dtype))

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return self.draw(lambda total, g: torch.randint(high, (total, *shape), generator=g, device=self.device))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like the batch ``x`` (this rank's rows)."""
        return self.randn(*x.shape[1:], dtype=x.dtype)
