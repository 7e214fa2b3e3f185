"""Standard FID: torchmetrics' FrechetInceptionDistance on the FID Inception network's 2048-d features."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from fewstep.metrics.inception import FEATURE_DIM, InceptionFeatures

COMPARABLE_N = 10_000  # the smallest sample size at which published FIDs are usually reported (50k is common)
# One process scores (rank zero of a DDP run): by default torchmetrics' compute() gathers the states of every
# rank, and would wait forever for ranks that never score.
UNSYNCED = {"sync_on_compute": False}


def make_fid(
    weights: str | os.PathLike | None = None, reset_real_features: bool = False, antialias: bool = False
) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance that takes uint8 images [N, 1 or 3, H, W] of any size.

    `reset_real_features=False` keeps the real statistics across `reset()`, so a data set's features
    are computed once per evaluation run. `antialias` as in `InceptionFeatures`.
    """
    return FrechetInceptionDistance(
        feature=InceptionFeatures(weights, antialias=antialias), reset_real_features=reset_real_features, **UNSYNCED
    )


def update_in_batches(metric, images_uint8: Tensor, real: bool, batch_size: int, device) -> None:
    """Feed uint8 images to a torchmetrics FID/KID ``batch_size`` at a time, moving each batch to ``device``."""
    for batch in images_uint8.split(batch_size):
        metric.update(batch.to(device), real=real)


def warn_if_biased(n: int, dim: int = FEATURE_DIM) -> None:
    # Below the feature dimension the covariance estimate is singular; FID's bias grows like 1/n well beyond that.
    if n < dim:
        warnings.warn(
            f"FID from n={n} < {dim} images is biased upwards; use n >= {COMPARABLE_N} for comparable numbers",
            stacklevel=3,
        )


def fid_between(
    real_uint8: Tensor,
    fake_uint8: Tensor,
    batch_size: int = 64,
    weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> float:
    """FID between two sets of uint8 images [N, 1 or 3, H, W], fed to the network `batch_size` at a time.

    `device` defaults to the images' device; the images move there one batch at a time.
    """
    warn_if_biased(min(len(real_uint8), len(fake_uint8)))
    device = real_uint8.device if device is None else device
    metric = make_fid(weights).to(device)
    update_in_batches(metric, real_uint8, True, batch_size, device)
    update_in_batches(metric, fake_uint8, False, batch_size, device)
    return metric.compute().item()
