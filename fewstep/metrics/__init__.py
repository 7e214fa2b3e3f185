"""Metrics: analytic distances to a known distribution, standard FID with the offline Inception network,
and domain FID (a data set's own classifier; never comparable with published FID)."""

from fewstep.metrics.analytic import (
    frechet_distance,
    frechet_to_truth,
    mode_mass,
    mode_mass_error,
    random_directions,
    sliced_wasserstein2,
)
from fewstep.metrics.domain import DomainClassifier, DomainFeatures, domain_features
from fewstep.metrics.fid import fid_between, make_fid
from fewstep.metrics.inception import InceptionFeatures
from fewstep.metrics.inception_weights import find_weights
from fewstep.metrics.reference import fid_against_reference, load_reference, reference_stats

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
    "DomainClassifier",
    "DomainFeatures",
    "domain_features",
    "reference_stats",
    "load_reference",
    "fid_against_reference",
]
