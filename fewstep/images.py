"""Conversions between model space ([-1, 1] floats) and uint8 images, and image grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from fewstep.atomic import atomic_write
from fewstep.errors import FewstepError


class ImageWriteError(FewstepError):
    """An image file could not be written (a full disk, a read-only directory)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"could not write the image grid '{path}' ({reason}): free space (or fix the directory)")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 [0, 255], clipping what the sampler overshot."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(x: torch.Tensor) -> torch.Tensor:
    """A near-square grid of [-1, 1] images as a [C, H, W] float tensor in [0, 1]."""
    nrow = max(1, math.ceil(math.sqrt(x.shape[0])))
    return make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)


def save_grid(x: torch.Tensor, path: str | Path) -> Path:
    """Write the grid of ``x`` to ``path`` whole or not at all (a temporary file beside it, then a rename); a failed
    write (a full disk) is a one-line ImageWriteError and leaves no partial image behind."""
    path = Path(path)
    grid = image_grid(x)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    try:
        atomic_write(path, lambda file: save_image(grid, file, format=image_format))
    except OSError as error:
        raise ImageWriteError(path, error.strerror or str(error)) from None
    return path


def run_log_dir(trainer) -> Path:
    """Where a run's logger writes (``trainer.log_dir`` without its broadcast, which would deadlock in
    code that only rank zero runs under DDP)."""
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return Path(logger.log_dir)
    return Path(trainer.default_root_dir)
