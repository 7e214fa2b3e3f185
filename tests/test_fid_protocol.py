"""The papers' FID protocol: reference statistics in EDM's .npz format (made by fewstep.fid_reference, or
foreign files with only mu and sigma), evaluate ref= / repeats= / protocol=paper, and EDM's data set zips."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from fewstep.data import EDMZip
from fewstep.errors import ConfigError, DatasetNotFound, FewstepError
from fewstep.metrics.inception_weights import find_weights

from helpers import run_module


def weights_available() -> bool:
    try:
        find_weights()
        return True
    except FewstepError:
        return False


needs_weights = pytest.mark.skipif(
    not weights_available(), reason="FID weights absent: run 'python -m fewstep.metrics.weights'"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- EDM data set zips


def edm_images(count: int, size: int = 16, mode: str = "RGB", seed: int = 0) -> list[np.ndarray]:
    """Random uint8 images [H, W(, 3)]; image i carries i in its first pixel, to find it after the shuffle."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    for i, image in enumerate(images):
        image[(0, 0, 0) if mode == "RGB" else (0, 0)] = i
    return images


def write_edm_dataset(dest, images, labels=None, *, as_zip: bool = True, write_json: bool = True) -> None:
    """What EDM's dataset_tool.py writes: 00000/img00000000.png, ... and dataset.json {"labels": [[name, label]] or null}."""
    files = {}
    for i, image in enumerate(images):
        name = f"{i:08d}"
        name = f"{name[:5]}/img{name}.png"
        bits = io.BytesIO()
        from PIL import Image

        Image.fromarray(image).save(bits, format="png", compress_level=0, optimize=False)
        files[name] = bits.getvalue()
    if write_json:
        entries = None if labels is None else [[name, int(label)] for name, label in zip(files, labels)]
        files["dataset.json"] = json.dumps({"labels": entries}).encode()
    if as_zip:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)


def check_images_and_labels(data: EDMZip, images, labels) -> None:
    """Every training image is one of `images` in [-1, 1] (found by its first pixel) with its label."""
    data.setup()
    seen = set()
    for x, y in data.train_set:
        index = round(((x.reshape(-1)[0] + 1) * 127.5).item())
        expected = torch.from_numpy(images[index]).float()
        expected = expected.permute(2, 0, 1) if expected.ndim == 3 else expected[None]
        torch.testing.assert_close(x, expected / 127.5 - 1, atol=1e-6, rtol=0)
        assert y.item() == (labels[index] if labels is not None else 0)
        seen.add(index)
    assert len(seen) == len(data.train_set)
    assert float(data.train_set.tensors[0].min()) >= -1 and float(data.train_set.tensors[0].max()) <= 1


def test_edm_zip_as_dataset_tool_writes_it(tmp_path):
    images, labels = edm_images(12), [i % 3 for i in range(12)]
    write_edm_dataset(tmp_path / "tiny-16x16.zip", images, labels)
    data = EDMZip(path=str(tmp_path / "tiny-16x16.zip"), val_size=2, batch_size=4)
    assert data.shape == (3, 16, 16) and data.num_classes == 3  # known before setup
    assert data.train_set is None
    check_images_and_labels(data, images, labels)
    assert len(data.train_set) == 10 and len(data.val_set) == 2
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # real_images gives the PNGs' bytes back exactly
    real = data.real_images(10)
    assert real.dtype == torch.uint8 and {int(r[0, 0, 0]) for r in real} <= set(range(12))
    for r in real:
        assert torch.equal(r, torch.from_numpy(images[int(r[0, 0, 0])]).permute(2, 0, 1))


def test_edm_folder_grey_and_unconditional(tmp_path):
    images = edm_images(6, size=8, mode="L")
    write_edm_dataset(tmp_path, images, None, as_zip=False)  # dataset.json holds "labels": null
    data = EDMZip(path=str(tmp_path), val_size=0)
    assert data.shape == (1, 8, 8) and data.num_classes == 0
    check_images_and_labels(data, images, None)
    resized = EDMZip(path=str(tmp_path), val_size=0, resolution=4)
    resized.setup()
    assert resized.shape == (1, 4, 4) and resized.train_set[0][0].shape == (1, 4, 4)


def test_edm_zip_without_dataset_json_is_unconditional(tmp_path):
    images = edm_images(5)
    write_edm_dataset(tmp_path / "plain.zip", images, write_json=False)
    data = EDMZip(path=str(tmp_path / "plain.zip"), val_size=1)
    assert data.num_classes == 0 and data.shape == (3, 16, 16)
    check_images_and_labels(data, images, None)


@pytest.mark.parametrize("path", [None, "missing.zip"])
def test_edm_zip_missing_path_is_one_line(tmp_path, path):
    data = EDMZip(path=None if path is None else str(tmp_path / path))
    with pytest.raises(DatasetNotFound) as error:
        _ = data.shape
    message = str(error.value)
    assert "\n" not in message and "dataset_tool.py" in message and "data.path" in message


def test_edm_zip_refuses_mixed_sizes(tmp_path):
    images = edm_images(3) + edm_images(1, size=8)
    write_edm_dataset(tmp_path / "mixed.zip", images, write_json=False)
    with pytest.raises(DatasetNotFound, match="must have one size"):
        EDMZip(path=str(tmp_path / "mixed.zip"), val_size=0).setup()


# ---------------------------------------------------------------- reference statistics


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory):
    """A 24-image EDM zip and the .npz that `python -m fewstep.fid_reference` writes from it, as a user runs it."""
    if not weights_available():
        pytest.skip("FID weights absent: run 'python -m fewstep.metrics.weights'")
    root = tmp_path_factory.mktemp("reference")
    images, labels = edm_images(24, seed=1), [i % 4 for i in range(24)]
    write_edm_dataset(root / "real-16x16.zip", images, labels)
    result = run_module(
        "fewstep.fid_reference", "data=edm_zip", "data.path=real-16x16.zip", "out=real-16x16.npz", "batch_size=12",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "real-16x16.npz" in result.stdout
    return root, root / "real-16x16.npz", images


def fake_images(count: int = 12) -> torch.Tensor:
    """uint8 [N, 3, 16, 16]: smoother than the real ones, so the FID is clearly positive."""
    generator = torch.Generator().manual_seed(5)
    low = torch.randint(0, 256, (count, 3, 4, 4), generator=generator).float()
    return torch.nn.functional.interpolate(low, size=16, mode="bilinear").round().to(torch.uint8)


@pytest.mark.slow
@needs_weights
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric FrechetInceptionDistance was called before")
def test_fid_against_the_tools_npz_equals_fid_from_the_images(reference_npz):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fewstep.metrics.fid import UNSYNCED
    from fewstep.metrics.inception import InceptionFeatures
    from fewstep.metrics.reference import load_reference, read_npz_reference

    root, path, images = reference_npz
    with np.load(path, allow_pickle=False) as npz:  # EDM's format, plus n and a note
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048)
        assert npz["mu"].dtype == np.float64 and npz["sigma"].dtype == np.float64
        assert int(npz["n"]) == 24 and "EDMZip" in str(npz["note"]) and "real-16x16.zip" in str(npz["note"])
    real = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])  # all 24, in file order
    fake = fake_images()
    extractor = InceptionFeatures()
    direct = FrechetInceptionDistance(feature=extractor, **UNSYNCED)
    direct.update(real, real=True)
    direct.update(fake, real=False)
    from_images = direct.compute().item()
    against_file = FrechetInceptionDistance(feature=extractor, reset_real_features=False, **UNSYNCED)
    load_reference(against_file, read_npz_reference(path))
    against_file.fake_features_sum = direct.fake_features_sum.clone()  # the same fake features, not recomputed
    against_file.fake_features_cov_sum = direct.fake_features_cov_sum.clone()
    against_file.fake_features_num_samples = direct.fake_features_num_samples.clone()
    against_file.orig_dtype = direct.orig_dtype
    from_file = against_file.compute().item()
    print(f"FID from the images {from_images!r}, against the tool's npz {from_file!r} (torchmetrics' float32 result), "
          f"relative difference {abs(from_file - from_images) / from_images:.2e}")
    assert from_images > 1
    assert from_file == pytest.approx(from_images, rel=1e-6)
    # the same in float64 (torchmetrics rounds its float64 arithmetic to the features' float32 at the end)
    direct.orig_dtype = against_file.orig_dtype = torch.float64
    direct._computed = against_file._computed = None
    from_images, from_file = direct.compute().item(), against_file.compute().item()
    print(f"float64: {from_images!r} against {from_file!r}, relative difference {abs(from_file - from_images) / from_images:.2e}")
    # the square root of a rank-24 2048 x 2048 covariance magnifies float64 rounding, which differs by CPU (1.5e-8
    # relative on AMD EPYC)
    assert from_file == pytest.approx(from_images, rel=1e-7)
    # the mean in the file is torchmetrics' own, up to float32 feature rounding (which varies with the thread count)
    torch.testing.assert_close(read_npz_reference(path)["mean"], direct.real_features_sum / 24, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_weights
def test_foreign_npz_with_only_mu_and_sigma_does_not_depend_on_n(reference_npz, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fewstep.metrics.fid import UNSYNCED
    from fewstep.metrics.inception import InceptionFeatures
    from fewstep.metrics.reference import ASSUMED_N, load_reference, read_npz_reference

    _, path, _ = reference_npz
    with np.load(path, allow_pickle=False) as npz:
        mu, sigma = npz["mu"], npz["sigma"]
    edm = tmp_path / "edm-format.npz"
    np.savez(edm, mu=mu, sigma=sigma)  # exactly what EDM's fid.py ref writes
    reference = read_npz_reference(edm)
    assert reference["assumed_n"] and reference["n"] == ASSUMED_N

    metric = FrechetInceptionDistance(feature=InceptionFeatures(), reset_real_features=False, **UNSYNCED)
    metric.update(fake_images(), real=False)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-8)):
        metric.orig_dtype = dtype  # float32 is what compute() returns; float64 shows the arithmetic underneath
        values = {}
        for n in (24, ASSUMED_N, 10**8):  # the true one, CIFAR-10's (the default), far beyond any data set
            values[n] = load_reference(metric, {**reference, "n": n}).compute().item()  # load_reference clears the cache
        spread = (max(values.values()) - min(values.values())) / values[24]
        print(f"FID by assumed n ({dtype}): {values}, relative spread {spread:.2e}")
        assert spread <= tolerance


def test_reference_file_errors_are_one_line(tmp_path):
    from fewstep.metrics.reference import read_npz_reference

    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(2048))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = {
        tmp_path / "absent.npz": "fewstep.fid_reference",
        tmp_path / "mu_only.npz": "has no sigma",
        tmp_path / "small.npz": "not the 2048 features",
        tmp_path / "junk.npz": "cannot read reference statistics",
    }
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as error:
            read_npz_reference(path)
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.slow
def test_fid_reference_refuses_missing_data_in_one_line(tmp_path):
    result = run_module("fewstep.fid_reference", "data=edm_zip", "data.path=nowhere.zip", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "dataset_tool.py" in lines[0], result.stderr


# ---------------------------------------------------------------- evaluate ref= repeats= protocol=paper


@pytest.fixture(scope="module")
def lone_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny teacher's checkpoint copied away from its run directory, so no training config lies beside it."""
    _, last = tiny_checkpoint
    root = tmp_path_factory.mktemp("evaluate_ref")
    lone = root / "elsewhere" / "teacher.ckpt"
    lone.parent.mkdir()
    shutil.copy(last, lone)
    return root, lone


@pytest.mark.slow
@needs_weights
def test_evaluate_against_npz_with_repeats_needs_no_training_config(lone_checkpoint, reference_npz, tmp_path, compose_cfg):
    from fewstep.evaluate import evaluate

    root, ckpt = lone_checkpoint
    _, npz, _ = reference_npz
    result = run_module(
        "fewstep.evaluate", f"ckpt={ckpt}", f"ref={npz}", "repeats=2", "seed=3", "n=4", "sampler=euler", "nfe=1",
        f"paths.root={tmp_path}", cwd=root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = tmp_path.glob("evaluate/*/result.json")
    row = json.loads(path.read_text())
    assert row["metric"] == "fid" and row["ref"] == str(npz) and row["n_real"] == 24 and row["data"] is None
    assert row["repeats"] == 2 and row["seeds"] == [3, 7] and len(row["values"]) == 2  # seeds 3..6, then 7..10
    assert row["values"][0] != row["values"][1]
    assert row["value"] == row["best"] == min(row["values"])
    assert row["mean"] == pytest.approx(sum(row["values"]) / 2)
    assert row["std"] == pytest.approx(abs(row["values"][0] - row["values"][1]) / 2**0.5)
    assert "best of 2" in result.stdout
    # the second set is exactly the samples of seeds 7..10: a single run from seed 7 gives its value
    cfg = compose_cfg("evaluate", [f"ckpt={ckpt}", f"ref={npz}", "seed=7", "n=4", "sampler=euler", "nfe=1"])
    single = evaluate(cfg)
    assert single["value"] == pytest.approx(row["values"][1], rel=1e-6) and "values" not in single


@pytest.mark.slow
def test_evaluate_protocol_paper_without_ref_is_one_line(lone_checkpoint):
    root, ckpt = lone_checkpoint
    result = run_module("fewstep.evaluate", f"ckpt={ckpt}", "protocol=paper", cwd=root)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "protocol=paper needs ref=PATH.npz" in lines[0] and "python -m fewstep.fid_reference" in lines[0]


def test_evaluate_protocol_paper_sets_the_papers_values(compose_cfg):
    cfg = compose_cfg("evaluate", ["ckpt=x.ckpt", "protocol=paper", "ref=r.npz"])
    assert (cfg.metric, cfg.n, cfg.repeats, cfg.protocol) == ("fid", 50_000, 3, "paper")
    plain = compose_cfg("evaluate", ["ckpt=x.ckpt"])
    assert (plain.n, plain.repeats, plain.ref, plain.protocol) == (10_000, 1, None, None)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["metric=kid", "ref=r.npz"], "metric=kid cannot use"),
        (["metric=fid_domain", "ref=r.npz"], "metric=fid_domain cannot use"),
        (["ref=absent.npz"], "no reference statistics at"),
        (["repeats=0"], "repeats=0"),
    ],
)
def test_evaluate_ref_errors_before_loading_anything(compose_cfg, overrides, expected):
    from fewstep.evaluate import evaluate

    cfg = compose_cfg("evaluate", ["ckpt=/nonexistent.ckpt", *overrides])
    with pytest.raises(ConfigError) as error:
        evaluate(cfg)
    assert expected in str(error.value) and "\n" not in str(error.value)
