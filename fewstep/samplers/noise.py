"""Seed-per-image randomness: sample i depends only on its own seed (EDM's StackedRandomGenerator)."""

from __future__ import annotations

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
