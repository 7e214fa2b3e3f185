"""Metrics: analytic distances to a known distribution (FID arrives with the evaluation issue)."""

from fewstep.metrics.analytic import (
    frechet_distance,
    frechet_to_truth,
    mode_mass,
    mode_mass_error,
    random_directions,
    sliced_wasserstein2,
)

__all__ = [
    "frechet_distance",
    "frechet_to_truth",
    "sliced_wasserstein2",
    "random_directions",
    "mode_mass",
    "mode_mass_error",
]
