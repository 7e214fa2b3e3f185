"""Diversity of generated images: improved precision and recall, and per-class coverage.

FID mixes fidelity and diversity into one number; a distilled student can lose modes while its FID
moves little. Recall (Kynkaenniemi et al. 2019) is the fraction of real images whose feature lies
inside the k-NN balls of the generated ones, precision the converse; class coverage reads the class
of each generated image off a classifier of the data set and compares the class histogram with the
uniform one. ``python -m fewstep.evaluate metric=fid_domain`` reports all three beside the FID, on the
domain classifier's features and predictions, and the dark-pixel fraction: faint noise left on a black
background, which FID barely sees (the Kac samplers leave it on flat regions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DARK, FAINT = 64, 8  # uint8 levels: a pixel <= DARK is dark; a dark pixel > FAINT is faint noise
# An image is noisy when over a quarter of its own dark pixels are faint: no MNIST digit is (the most of 2,000 at
# 16 x 16 is 0.227), while ~15% of the Kac students' samples were before rollouts (docs/reproduction.md).
NOISY = 0.25


def dark_pixel_stats(images: Tensor) -> dict:
    """Among the dark pixels (<= 64 of 255), the fraction above 8: faint noise on a black background; uint8 input.

    MNIST's backgrounds are exactly 0, so on real images it counts only the anti-aliased feet of strokes. Also
    the mean dark pixel, the share of exact zeros, and ``noisy_share``: the share of images whose own fraction is
    above NOISY (a mean can hide a few wholly noisy samples).
    """
    per_image = images.to(torch.int64).reshape(len(images) if images.ndim > 1 else 1, -1)  # 1-d: one image
    dark_per_image = per_image <= DARK
    faint_per_image = ((per_image > FAINT) & dark_per_image).sum(1)
    x, dark = per_image.flatten(), dark_per_image.flatten()
    n_dark = int(dark.sum())
    own = faint_per_image.double() / dark_per_image.sum(1).clamp(min=1)
    return {
        "dark_fraction": float(faint_per_image.sum()) / max(n_dark, 1),
        "dark_mean": float(x[dark].double().mean()) if n_dark else float("nan"),
        "zero_fraction": float((x == 0).double().mean()),
        "noisy_share": float((own > NOISY).double().mean()),
    }


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance of each point to its k-th nearest neighbour among the others."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # +1: the point itself, at distance 0


def manifold_coverage(points: Tensor, support: Tensor, k: int = 3) -> float:
    """The fraction of ``points`` inside at least one k-NN ball of ``support`` (improved precision/recall)."""
    radii = knn_radii(support, k)
    inside = torch.cdist(points, support) <= radii[None, :]
    return inside.any(dim=1).float().mean().item()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of features ``fake`` [N, D] against ``real`` [M, D], with k-NN manifolds (k = 3).

    Undefined (NaN, NaN) when either set has k points or fewer: no point has k neighbours among the others.
    """
    if min(len(real), len(fake)) <= k:
        return float("nan"), float("nan")
    real, fake = real.double(), fake.double()
    return manifold_coverage(fake, real, k), manifold_coverage(real, fake, k)


def class_coverage(predicted: Tensor, num_classes: int) -> dict[str, float]:
    """From the predicted class of each generated image: {class_entropy: the histogram's entropy over the
    uniform one's (1 = every class equally often), classes_covered: the fraction of classes with at least
    a quarter of their uniform share, min_class_share: the rarest class's count over its uniform share}."""
    counts = torch.bincount(predicted.long(), minlength=num_classes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum() / math.log(num_classes)
    share = p * num_classes
    return {
        "class_entropy": entropy.item() + 0.0,  # + 0.0: no "-0.0" for a single class
        "classes_covered": (share >= 0.25).double().mean().item(),
        "min_class_share": share.min().item(),
    }


__all__ = ["class_coverage", "knn_radii", "manifold_coverage", "precision_recall"]
