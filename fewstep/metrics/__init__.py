"""Metrics: analytic distances to a known distribution, and standard FID with the offline Inception network."""

from fewstep.metrics.analytic import (
    frechet_distance,
    frechet_to_truth,
    mode_mass,
    mode_mass_error,
    random_directions,
    sliced_wasserstein2,
)
from fewstep.metrics.fid import fid_between, make_fid
from fewstep.metrics.inception import InceptionFeatures
from fewstep.metrics.inception_weights import find_weights

__all__ = [
    "frechet_distance",
    "frechet_to_truth",
    "sliced_wasserstein2",
    "random_directions",
    "mode_mass",
    "mode_mass_error",
    "InceptionFeatures",
    "make_fid",
    "fid_between",
    "find_weights",
]
