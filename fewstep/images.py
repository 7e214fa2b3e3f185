"""Conversions between model space ([-1, 1] floats) and uint8 images, and image grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 [0, 255], clipping what the sampler overshot."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(x: torch.Tensor) -> torch.Tensor:
    """A near-square grid of [-1, 1] images as a [C, H, W] float tensor in [0, 1]."""
    nrow = max(1, math.ceil(math.sqrt(x.shape[0])))
    return make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)


def save_grid(x: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(x), path)
    return path


def run_log_dir(trainer) -> Path:
    """Where a run's logger writes (``trainer.log_dir`` without its broadcast, which would deadlock in
    code that only rank zero runs under DDP)."""
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return Path(logger.log_dir)
    return Path(trainer.default_root_dir)
