"""Domain FID (a classifier trained on the data set, cached) and cached reference statistics, on 8x8 digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from fewstep.data.images import Digits
from fewstep.errors import ConfigError
from fewstep.metrics import domain, reference
from fewstep.metrics.domain import DomainFeatures, TrainSettings, cache_path, domain_features
from fewstep.metrics.reference import fid_against_reference, reference_stats


@pytest.fixture(scope="module")
def digits():
    data = Digits(val_size=256, seed=0)
    data.setup()
    return data


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("domain_cache")


def train_tensors(data: Digits) -> tuple[torch.Tensor, torch.Tensor]:
    return data.train_set.tensors


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def extractor(digits, cache_dir) -> DomainFeatures:
    images, labels = train_tensors(digits)
    return domain_features("digits", images, labels, digits.num_classes, cache_dir)


def test_classifier_beats_chance_on_held_out_digits(extractor, digits):
    assert extractor.accuracy > 0.85  # chance is 0.1; 4 epochs reach ~0.96
    # The DataModule's own validation images, never seen in training, agree.
    x, y = digits.val_set.tensors
    assert (extractor.classifier(x).argmax(1) == y).float().mean() > 0.85


def test_features_are_float32_and_frozen(extractor, digits):
    images = digits.real_images(8)
    features = extractor(images)
    assert features.shape == (8, extractor.num_features) and features.dtype == torch.float32
    extractor.train()  # as a parent LightningModule's .train() would
    assert not extractor.training and torch.equal(extractor(images), features)


def test_second_call_loads_the_cache_without_training(extractor, digits, cache_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(domain, "train_classifier", no_training)
    images, labels = train_tensors(digits)
    loaded = domain_features("digits", images, labels, digits.num_classes, cache_dir)
    assert loaded.path == extractor.path and loaded.path.is_file()
    assert loaded.accuracy == extractor.accuracy
    real = digits.real_images(64)
    assert torch.equal(loaded(real), extractor(real))


def test_cache_file_depends_on_data_name_shape_and_settings(tmp_path):
    base = cache_path("digits", (1, 8, 8), 10, 1541, TrainSettings(), tmp_path)
    assert base.name.startswith("domain_digits_8x8_") and base.suffix == ".pt"
    others = [
        cache_path("mnist5k", (1, 8, 8), 10, 1541, TrainSettings(), tmp_path),
        cache_path("digits", (1, 16, 16), 10, 1541, TrainSettings(), tmp_path),
        cache_path("digits", (1, 8, 8), 10, 1541, TrainSettings(epochs=9), tmp_path),
        cache_path("digits", (1, 8, 8), 10, 1541, TrainSettings(seed=1), tmp_path),
    ]
    assert len({base, *others}) == 5
    assert others[1].name.startswith("domain_digits_16x16_")


@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_classifier_takes_the_image_sizes_of_the_data_sets(channels, size):
    classifier = domain.DomainClassifier(channels, 10, size)
    x = torch.zeros(2, channels, size, size)
    assert classifier(x).shape == (2, 10) and classifier.features(x).shape == (2, domain.FEATURE_DIM)


def test_data_without_labels_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="standard FID") as error:
        domain_features("folder", torch.zeros(4, 1, 8, 8), None, 0, tmp_path)
    assert "\n" not in str(error.value)


def domain_fid(extractor: DomainFeatures, real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute().item()


def blur(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    return F.conv2d(images.float(), kernel, padding=1).round().to(torch.uint8)


def test_domain_fid_ranks_real_blurred_and_noise(extractor, digits):
    real_test = to_uint8(digits.val_set.tensors[0])
    real_train = digits.real_images(512)
    noise = torch.randint(0, 256, real_test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fid_real = domain_fid(extractor, real_train, real_test)
    fid_blur = domain_fid(extractor, real_train, blur(real_test))
    fid_noise = domain_fid(extractor, real_train, noise)
    # Measured: 12, 168, 383 (a 3x3 blur of 8x8 digits is heavy, hence the narrower second margin).
    assert 4 * fid_real < fid_blur and 1.5 * fid_blur < fid_noise, (fid_real, fid_blur, fid_noise)


def test_reference_stats_are_cached_and_give_torchmetrics_fid(extractor, digits, tmp_path, monkeypatch):
    real, fake = digits.real_images(512), blur(to_uint8(digits.val_set.tensors[0]))
    first = reference_stats("digits_8x8_fid_domain", extractor, real, tmp_path)
    assert (tmp_path / "ref_digits_8x8_fid_domain.pt").is_file()
    assert first["n"] == 512 and first["mean"].dtype == first["cov"].dtype == torch.float64
    assert first["cov"].shape == (extractor.num_features, extractor.num_features)

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(reference, "compute_stats", no_recompute)
    cached = reference_stats("digits_8x8_fid_domain", extractor, real, tmp_path)
    assert torch.equal(cached["mean"], first["mean"]) and torch.equal(cached["cov"], first["cov"])
    from_cache = fid_against_reference(extractor, cached, fake)
    from_scratch = domain_fid(extractor, real, fake)
    assert from_cache == pytest.approx(from_scratch, rel=1e-6)


def test_stale_reference_stats_are_recomputed(extractor, digits, tmp_path):
    real = digits.real_images(512)
    reference_stats("k", extractor, real, tmp_path)
    with pytest.warns(UserWarning, match="made from 512 images, 300 asked"):
        assert reference_stats("k", extractor, real[:300], tmp_path)["n"] == 300
    (tmp_path / "ref_k.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert reference_stats("k", extractor, real[:300], tmp_path)["n"] == 300
    other = DomainFeatures(domain.DomainClassifier(1, 10, 8))  # untrained: other weights, same shapes
    with pytest.warns(UserWarning, match="extractor or the images changed"):
        reference_stats("k", other, real[:300], tmp_path)
