"""Reference statistics of real data (feature mean and covariance), computed once and cached.

The features are accumulated by torchmetrics' FrechetInceptionDistance itself, and `load_reference`
writes them back into its real-feature states, so FID against cached statistics is computed by
torchmetrics exactly as if the real images had been fed to it again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from fewstep.metrics.fid import UNSYNCED, update_in_batches

PROBE_IMAGES = 4  # images re-featurised on load to catch a cache made by another extractor (a retrained classifier)


def reference_stats(
    key: str, extractor: nn.Module, images_uint8: Tensor, cache_dir: Path, batch_size: int = 256
) -> dict:
    """{mean [F] float64, cov [F, F] float64, n} of `extractor`'s features of all images, cached as ref_{key}.pt.

    `key` names what determines the statistics: data set, resolution and metric (e.g. "mnist5k_28x28_fid_domain").
    A cached file is reused only if its n, feature dimension and the features of the first images still match.
    """
    path = Path(cache_dir) / f"ref_{key}.pt"
    probe = probe_features(extractor, images_uint8)
    if path.is_file():
        ref = load_cached(path, len(images_uint8), probe)
        if ref is not None:
            return ref
    ref = {**compute_stats(extractor, images_uint8, batch_size), "probe": probe}
    save_atomically(ref, path)
    return ref


def compute_stats(extractor: nn.Module, images_uint8: Tensor, batch_size: int) -> dict:
    device = device_of(extractor, images_uint8)
    metric = FrechetInceptionDistance(feature=extractor, **UNSYNCED).to(device)
    update_in_batches(metric, images_uint8, True, batch_size, device)
    return stats_from_sums(metric.real_features_sum, metric.real_features_cov_sum, metric.real_features_num_samples)


def stats_from_sums(features_sum: Tensor, cov_sum: Tensor, n: Tensor) -> dict:
    """Mean and unbiased covariance from torchmetrics' running sums (its compute() does the same arithmetic)."""
    n = int(n)
    mean = features_sum.double().cpu() / n
    cov = (cov_sum.double().cpu() - n * torch.outer(mean, mean)) / (n - 1)
    return {"mean": mean, "cov": cov, "n": n}


def load_reference(metric: FrechetInceptionDistance, ref: dict) -> FrechetInceptionDistance:
    """Put cached real statistics into a FrechetInceptionDistance's real-feature states; returns the metric.

    Then only fake images need `metric.update(..., real=False)`. Keep `reset_real_features=False` on the
    metric, or its reset() throws the statistics away.
    """
    mean, cov, n = ref["mean"], ref["cov"], ref["n"]
    if metric.real_features_sum.shape != mean.shape:
        raise ValueError(f"reference has {mean.shape[0]} features, the metric {metric.real_features_sum.shape[0]}")
    device = metric.real_features_sum.device
    # Undo stats_from_sums: sum = n mean, cov_sum = (n - 1) cov + n mean mean^T.
    metric.real_features_sum = (n * mean).to(device, torch.float64)
    metric.real_features_cov_sum = ((n - 1) * cov + n * torch.outer(mean, mean)).to(device, torch.float64)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)
    return metric


def fid_against_reference(extractor: nn.Module, ref: dict, fake_uint8: Tensor, batch_size: int = 256) -> float:
    """torchmetrics' FID between uint8 images [N, C, H, W] and cached real statistics."""
    device = device_of(extractor, fake_uint8)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, **UNSYNCED).to(device)
    load_reference(metric, ref)
    update_in_batches(metric, fake_uint8, False, batch_size, device)
    return metric.compute().item()


def device_of(extractor: nn.Module, images: Tensor) -> torch.device:
    """Where the extractor's weights are (the images move there a batch at a time); else the images' device."""
    parameter = next(extractor.parameters(), None)
    return images.device if parameter is None else parameter.device


@torch.no_grad()
def probe_features(extractor: nn.Module, images_uint8: Tensor) -> Tensor:
    return extractor(images_uint8[:PROBE_IMAGES].to(device_of(extractor, images_uint8))).double().cpu()


def load_cached(path: Path, n: int, probe: Tensor) -> dict | None:
    """The cached statistics, or None (with a one-line warning) when unreadable or made from something else."""
    try:
        ref = torch.load(path, map_location="cpu", weights_only=True)
        problem = staleness(ref, n, probe)
    except Exception as error:  # any unreadable or malformed file is recomputed, never trusted
        problem = f"unreadable ({type(error).__name__})"
    if problem is None:
        return ref
    warnings.warn(f"reference statistics {path} are stale: {problem}; recomputing them", stacklevel=3)
    return None


def staleness(ref: dict, n: int, probe: Tensor) -> str | None:
    if ref["n"] != n:
        return f"made from {ref['n']} images, {n} asked"
    if ref["mean"].shape[0] != probe.shape[1]:
        return f"{ref['mean'].shape[0]} features, the extractor gives {probe.shape[1]}"
    # Loose enough for GPU against CPU arithmetic (TF32), tight enough to catch other weights or other images.
    if ref["probe"].shape != probe.shape or (ref["probe"] - probe).norm() > 1e-2 * probe.norm():
        return "the extractor or the images changed"
    return None


def save_atomically(ref: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(ref, partial)
    partial.replace(path)
