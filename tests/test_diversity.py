"""Diversity metrics: improved precision/recall and class coverage, on cases whose answer is known."""

import math

import torch

from fewstep.metrics.diversity import class_coverage, knn_radii, precision_recall


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(knn_radii(points, 1), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(knn_radii(points, 2), torch.tensor([3.0, 2.0, 3.0, 6.0]))


def test_a_generator_that_drops_half_the_modes_keeps_precision_and_loses_recall():
    generator = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(4)

    def mixture(n, modes):
        index = torch.arange(n) % len(modes)
        return modes[index] + 0.3 * torch.randn(n, 4, generator=generator)

    real = mixture(800, centres)
    full, half = mixture(800, centres), mixture(800, centres[:2])
    precision_full, recall_full = precision_recall(real, full)
    precision_half, recall_half = precision_recall(real, half)
    assert precision_full > 0.9 and recall_full > 0.9
    assert precision_half > 0.9 and abs(recall_half - 0.5) < 0.06  # the real images of the two dropped modes
    far = mixture(800, centres + 100)
    assert precision_recall(real, far) == (0.0, 0.0)


def test_class_coverage_of_uniform_and_collapsed_histograms():
    uniform = class_coverage(torch.arange(1000) % 10, 10)
    assert abs(uniform["class_entropy"] - 1) < 1e-9 and uniform["classes_covered"] == 1 and uniform["min_class_share"] == 1
    collapsed = class_coverage(torch.zeros(1000, dtype=torch.long), 10)
    assert collapsed["class_entropy"] == 0 and collapsed["classes_covered"] == 0.1 and collapsed["min_class_share"] == 0


def test_a_domain_classifier_trained_on_too_few_images_is_flagged(tmp_path, monkeypatch):
    import pytest

    import fewstep.metrics.domain as domain
    from fewstep.data import Digits
    from fewstep.metrics.score import feature_extractor

    class Poor:  # what a classifier trained on a few dozen images gives: near-chance held-out accuracy
        accuracy = 0.2

    monkeypatch.setattr(domain, "domain_features", lambda *args, **kwargs: Poor())
    with pytest.warns(UserWarning, match="held-out accuracy .* use metric=fid"):
        feature_extractor("fid_domain", Digits(limit=40, val_size=8), "Digits", tmp_path)


def test_precision_and_recall_are_undefined_for_k_points_or_fewer():
    points = torch.randn(3, 4)
    assert all(math.isnan(v) for v in precision_recall(points, torch.randn(10, 4), k=3))
    assert all(math.isnan(v) for v in precision_recall(torch.randn(10, 4), points, k=3))
    assert not any(math.isnan(v) for v in precision_recall(torch.randn(4, 4), torch.randn(4, 4), k=3))
