"""Reference statistics of real data (feature mean and covariance), computed once and cached.

The features are accumulated by torchmetrics' FrechetInceptionDistance itself, and `load_reference`
writes them back into its real-feature states, so FID against cached statistics is computed by
torchmetrics exactly as if the real images had been fed to it again.

The papers' statistics (EDM's fid.py `ref` files, ADM's reference batches) are `.npz` files with `mu`
[2048] and `sigma` [2048, 2048] in float64; `read_npz_reference` / `write_npz_reference` read and write
that format (ours add `n` and `note`), and `python -m fewstep.fid_reference` makes one from a data set.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from fewstep.errors import ConfigError, one_line
from fewstep.metrics.fid import UNSYNCED, update_in_batches
from fewstep.metrics.inception import FEATURE_DIM

PROBE_IMAGES = 4  # images re-featurised on load to catch a cache made by another extractor (a retrained classifier)
# The image count assumed for an .npz without `n` (EDM's and ADM's files store none): CIFAR-10's training set,
# which EDM's cifar10-32x32.npz was made from. FID does not depend on it: load_reference stores the sums that
# give back exactly this mean and covariance for any n (checked by tests/test_fid_protocol.py).
ASSUMED_N = 50_000
MAKE_REFERENCE = "python -m fewstep.fid_reference data=... out=PATH.npz"
# How far a covariance read from a file may stray from one by rounding alone (a float32 copy of a covariance of
# fewer images than features has eigenvalues near -5e-9 x the largest); beyond that FID comes out wrong, even negative.
SYMMETRY_TOLERANCE = 1e-6  # |sigma - sigma^T| at most this times the largest |sigma|
PSD_TOLERANCE = 1e-6  # the smallest eigenvalue of sigma at least -PSD_TOLERANCE times the largest


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
    return stats_of_batches(extractor, images_uint8.split(batch_size), device_of(extractor, images_uint8))


def stats_of_batches(extractor: nn.Module, batches: Iterable[Tensor], device: torch.device | str) -> dict:
    """{mean, cov, n} of the features of uint8 image batches [B, C, H, W], accumulated by torchmetrics' FID.

    The batches may come from a generator, so a whole data set never has to be in memory at once.
    """
    metric = FrechetInceptionDistance(feature=extractor, **UNSYNCED).to(device)
    for batch in batches:
        metric.update(batch.to(device), real=True)
    if int(metric.real_features_num_samples) < 2:
        raise ConfigError(f"reference statistics need at least 2 images, got {int(metric.real_features_num_samples)}")
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
    metric._computed = None  # torchmetrics caches compute() until the next update(); new states invalidate it
    return metric


def fid_against_reference(extractor: nn.Module, ref: dict, fake_uint8: Tensor, batch_size: int = 256) -> float:
    """torchmetrics' FID between uint8 images [N, C, H, W] and cached real statistics."""
    device = device_of(extractor, fake_uint8)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, **UNSYNCED).to(device)
    load_reference(metric, ref)
    update_in_batches(metric, fake_uint8, False, batch_size, device)
    return metric.compute().item()


def write_npz_reference(stats: dict, path: str | os.PathLike, note: str = "") -> Path:
    """Write {mean, cov, n} as EDM's format (`mu` [F], `sigma` [F, F] float64), plus `n` and `note`; atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:  # a file object: np.savez would append .npz to a name
            np.savez(
                file, mu=stats["mean"].double().cpu().numpy(), sigma=stats["cov"].double().cpu().numpy(),
                n=np.int64(stats["n"]), note=np.str_(note),
            )
        partial.replace(path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write reference statistics to {path}: {error.strerror or error}") from error
    return path


def read_npz_reference(path: str | os.PathLike, num_features: int = FEATURE_DIM) -> dict:
    """{mean, cov float64 tensors, n, assumed_n} from an .npz holding `mu` and `sigma` (EDM's or ADM's format, or ours).

    Each array's header is read and checked (numeric, of the feature size) before its data, so a small file cannot
    make this allocate more than the 2048 x 2048 sigma; object arrays are refused (allow_pickle=False), and sigma must
    be a covariance: finite, symmetric and positive semi-definite up to rounding. A file without `n` (EDM's, ADM's)
    gets n = ASSUMED_N and assumed_n = True. Anything unusable is a one-line ConfigError naming the problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"no reference statistics at '{path}': pass ref=PATH.npz (mu, sigma as EDM's fid.py writes them), "
            f"or make one with `{MAKE_REFERENCE}`"
        )
    try:
        with zipfile.ZipFile(path) as npz:
            members = {name[: -len(".npy")]: name for name in npz.namelist() if name.endswith(".npy")}
            missing = [key for key in ("mu", "sigma") if key not in members]
            if missing:
                raise ConfigError(one_line(
                    f"'{path}' has no {' or '.join(missing)} (it holds {', '.join(list(members)[:10]) or 'nothing'}): "
                    f"reference statistics need mu and sigma, as EDM's fid.py writes them, or `{MAKE_REFERENCE}`"
                ))
            mu = _read_npz_array(npz, members["mu"], path, [(num_features,)], "fiu")
            sigma = _read_npz_array(npz, members["sigma"], path, [(num_features, num_features)], "fiu")
            n = int(_read_npz_array(npz, members["n"], path, [(), (1,)], "iu").reshape(())) if "n" in members else None
    except ConfigError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # not an .npz, truncated, or object arrays
        raise ConfigError(one_line(
            f"cannot read reference statistics '{path}': {type(error).__name__}: {str(error)[:200]}"
        )) from error
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"'{path}' holds non-finite values in mu or sigma: remake it")
    _check_covariance(sigma.astype(np.float64), path)
    if n is not None and n < 2:
        raise ConfigError(f"'{path}' says it was made from n={n} images: a covariance needs at least 2")
    return {
        "mean": torch.from_numpy(mu.astype(np.float64)), "cov": torch.from_numpy(sigma.astype(np.float64)),
        "n": ASSUMED_N if n is None else n, "assumed_n": n is None,
    }


def _read_npz_array(npz: zipfile.ZipFile, member: str, path: Path, shapes: list[tuple], kinds: str) -> np.ndarray:
    """One array of an .npz, its header checked before numpy allocates what the header declares: one of ``shapes``,
    a plain number type of one of ``kinds`` (numpy's dtype.kind letters), never objects."""
    key = member[: -len(".npy")]
    with npz.open(member) as file:
        version = np.lib.format.read_magic(file)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ConfigError(one_line(f"'{path}': {key} is in .npy format version {version}, not 1.0 or 2.0: remake it"))
        shape, _fortran, dtype = readers[version](file)
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None:
        wanted = "an integer" if kinds == "iu" else "a number"
        raise ConfigError(one_line(
            f"'{path}': {key} holds {dtype.str[:40]} values, not {wanted} type: reference statistics are float64 mu "
            f"and sigma as EDM's fid.py writes them, or `{MAKE_REFERENCE}`"
        ))
    if tuple(shape) not in shapes:
        features = shapes[0][0] if shapes[0] else None
        why = (f"not the {features} features of the FID Inception network's pool layer: these statistics come from "
               "another network") if features else "not a single number"
        raise ConfigError(one_line(f"'{path}': {key} has shape {tuple(shape)[:8]}, {why}"))
    with npz.open(member) as file:
        return np.lib.format.read_array(file, allow_pickle=False)


def _top_eigenvalue(matrix: np.ndarray, iterations: int = 30) -> float:
    """v' matrix v for the unit vector v that power iteration reaches: at most the largest eigenvalue of a symmetric
    matrix, close to it, and far cheaper than eigvalsh (seconds for 2048 x 2048 on a busy machine)."""
    vector = np.random.default_rng(0).standard_normal(len(matrix))
    vector /= np.linalg.norm(vector)
    for _ in range(iterations):
        product = matrix @ vector
        norm = np.linalg.norm(product)
        if norm == 0:
            break
        vector = product / norm
    return float(vector @ matrix @ vector)


def _check_covariance(sigma: np.ndarray, path: Path) -> None:
    """Refuses a sigma that is not a covariance up to rounding: FID computed from it would be wrong."""
    scale = float(np.abs(sigma).max())
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise ConfigError(one_line(
            f"'{path}': sigma is not symmetric (|sigma - sigma^T| reaches {asymmetry:.3g}, its entries {scale:.3g}): "
            f"it is not a covariance; remake it with `{MAKE_REFERENCE}`"
        ))
    largest = max(_top_eigenvalue(sigma), 0.0)
    allowed = -PSD_TOLERANCE * largest  # the most negative eigenvalue rounding can explain
    try:  # sigma - allowed I has a Cholesky factor exactly when sigma's smallest eigenvalue exceeds allowed
        np.linalg.cholesky(sigma - allowed * np.eye(len(sigma)))
        return
    except np.linalg.LinAlgError:
        pass
    # v' sigma v for v near the bottom eigenvector (power iteration on largest I - sigma) bounds the smallest above
    smallest = largest - _top_eigenvalue(largest * np.eye(len(sigma)) - sigma)
    if smallest >= allowed:  # no witness yet (a singular sigma, or one at the edge): the exact answer, slowly
        smallest = float(np.linalg.eigvalsh(sigma)[0])
    if smallest < allowed:
        raise ConfigError(one_line(
            f"'{path}': sigma is not positive semi-definite (it has an eigenvalue of {smallest:.3g} or less, its largest "
            f"is about {largest:.3g}): it is not a covariance and would give a wrong FID; remake it with `{MAKE_REFERENCE}`"
        ))


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
