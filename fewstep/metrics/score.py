"""One score of generated images against a data set: fid, fid_domain or kid, with cached real statistics.

Shared by ``python -m fewstep.evaluate`` and the ``SamplerBenchmark`` callback, so both give the same
number for the same images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError

METRICS = ("fid", "fid_domain", "kid")
MIN_DOMAIN_ACCURACY = 0.5  # below it, a domain classifier's features are too poor for fid_domain to mean anything


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")


def feature_extractor(metric: str, datamodule, data_name: str, cache_dir: Path) -> nn.Module:
    """The FID Inception network, or for fid_domain a classifier trained on the data set (once, then cached)."""
    check_metric(metric)
    if metric != "fid_domain":
        from fewstep.metrics.inception import InceptionFeatures

        return InceptionFeatures()
    from fewstep.metrics.domain import domain_features

    datamodule.setup()
    items = [datamodule.train_set[i] for i in range(len(datamodule.train_set))]
    images = torch.stack([image for image, _ in items])
    labels = torch.as_tensor([int(label) for _, label in items])  # image folders give ints, the tensor data sets tensors
    extractor = domain_features(data_name, images, labels, datamodule.num_classes, cache_dir)
    if not extractor.accuracy >= MIN_DOMAIN_ACCURACY:
        warnings.warn(
            f"fid_domain: the domain classifier reaches {extractor.accuracy:.2f} held-out accuracy (trained on "
            f"{len(images)} images), so its features and this FID mean little; train on more images (data.limit) "
            "or use metric=fid",
            stacklevel=2,
        )
    return extractor


def reference_key(data_name: str, shape, metric: str, n_real: int) -> str:
    """What determines the real statistics: data set, resolution, metric and number of real images."""
    return f"{data_name}_{'x'.join(map(str, shape))}_{metric}_n{n_real}"


def score(
    metric: str, extractor: nn.Module, real: Tensor, fake: Tensor, key: str, cache_dir: Path, batch_size: int,
    progress=None, label: str = "",
) -> float:
    """FID against the real set's cached statistics (computed once per data set, size and metric), or KID.

    ``real`` and ``fake`` are uint8 images [N, C, H, W]. ``progress`` (a ``fewstep.progress.Progress``, or None
    for none) shows the features as they are computed, and when the statistics start; ``label`` prefixes its tasks.
    """
    from fewstep.metrics.fid import UNSYNCED, update_in_batches, warn_if_biased
    from fewstep.metrics.reference import fid_against_reference, reference_stats

    check_metric(metric)
    warn_if_biased(min(len(real), len(fake)), extractor.num_features)
    if metric != "kid":
        # reference_stats first runs the extractor on a few images to check its cache (the probe): not counted; with
        # a valid cache that is all it runs, and no task is shown
        with counting_features(extractor, progress, f"{label}features (real images)", len(real), skip=1):
            reference = reference_stats(key, extractor, real, cache_dir, batch_size)
        with counting_features(extractor, progress, f"{label}features (samples)", len(fake),
                               then=f"{label}statistics: {metric} from the features' mean and covariance ..."):
            return fid_against_reference(extractor, reference, fake, batch_size)
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=extractor, subset_size=min(1000, len(real), len(fake)), **UNSYNCED)
    device = next(extractor.parameters()).device
    with counting_features(extractor, progress, f"{label}features (real images)", len(real)):
        update_in_batches(kid, real, True, batch_size, device)
    with counting_features(extractor, progress, f"{label}features (samples)", len(fake),
                           then=f"{label}statistics: kid over subsets of the features ..."):
        update_in_batches(kid, fake, False, batch_size, device)
    return kid.compute()[0].item()


def score_against_file(
    extractor: nn.Module, reference: dict, fake: Tensor, batch_size: int, progress=None, label: str = ""
) -> float:
    """Standard FID of uint8 images [N, C, H, W] against statistics read from an .npz (`read_npz_reference`)."""
    from fewstep.metrics.fid import warn_if_biased
    from fewstep.metrics.reference import fid_against_reference

    warn_if_biased(len(fake), extractor.num_features)
    with counting_features(extractor, progress, f"{label}features (samples)", len(fake),
                           then=f"{label}statistics: fid from the features' mean and covariance ..."):
        return fid_against_reference(extractor, reference, fake, batch_size)


@contextmanager
def counting_features(
    extractor: nn.Module, progress, label: str, total: int, skip: int = 0, then: str | None = None
) -> Iterator[None]:
    """Show, as a ``progress`` task, the images that ``extractor`` takes inside the block (hooks count each forward
    call's batch), leaving out its first ``skip`` calls; once all ``total`` are in, note ``then`` (what the block
    does next). The task starts as the first counted call does, so a block that runs none shows nothing."""
    if progress is None:
        yield
        return
    calls, task = 0, None

    def starting(module, args) -> None:
        nonlocal calls, task
        calls += 1
        if calls > skip and task is None:
            task = progress.task(label, total, "images").__enter__()

    def finished(module, args, output) -> None:
        if calls <= skip:
            return
        task.advance(len(args[0]))
        if then is not None and task.done >= total:
            task.close()  # its last line before the note
            progress.note(then)

    handles = [extractor.register_forward_pre_hook(starting), extractor.register_forward_hook(finished)]
    failed = True
    try:
        yield
        failed = False
    finally:
        for handle in handles:
            handle.remove()
        if task is not None:  # a failed block says so itself: no closing line
            task.__exit__(*((RuntimeError, None, None) if failed else (None, None, None)))
