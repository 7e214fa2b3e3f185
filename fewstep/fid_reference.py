"""python -m fewstep.fid_reference data=cifar10 data.root=DIR out=cifar10-32x32.npz: the papers' FID reference.

Writes ``mu`` [2048] and ``sigma`` [2048, 2048] (float64) of the FID Inception network's features of a data
set's images, in the format of EDM's ``fid.py ref`` files (plus ``n`` and a ``note``), for
``python -m fewstep.evaluate ckpt=PATH ref=FILE.npz``. By default every image of the data set (the config
sets ``data.val_size=0``, so no validation split is held out); ``n=N`` takes the first N training images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console

from fewstep.cli import check_overrides, user_errors
from fewstep.errors import ConfigError
from fewstep.generate import resolve_device
from fewstep.metrics.fid import warn_if_biased
from fewstep.metrics.reference import stats_of_batches, write_npz_reference


def uint8_batches(dataset, count: int, batch_size: int):
    """The first ``count`` images of a data set of (x in [-1, 1], y) as uint8 batches [B, C, H, W]
    (the conversion of ``ImageDataModule.real_images``), one batch in memory at a time."""
    for start in range(0, count, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(count, start + batch_size))])
        yield ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def fid_reference(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from fewstep.data.images import ImageDataModule

    if cfg.n is not None and cfg.n < 2:
        raise ConfigError(f"n={cfg.n}: reference statistics need at least 2 images (n>=2, or n=null for all)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be >= 1")
    datamodule = instantiate(cfg.data)
    data_name = cfg.data._target_.rpartition(".")[2]
    if not isinstance(datamodule, ImageDataModule):
        raise ConfigError(
            f"{data_name} ({cfg.data._target_}) is not an image data set: FID reference statistics need images "
            "(data=cifar10, data=edm_zip data.path=..., data=image_folder data.root=...)"
        )
    datamodule.setup()
    available = len(datamodule.train_set)
    count = available if cfg.n is None else min(cfg.n, available)
    shape = "x".join(map(str, datamodule.shape[1:]))
    out = Path(cfg.out).expanduser() if cfg.out else Path(cfg.paths.output_dir) / f"{data_name.lower()}-{shape}.npz"

    from fewstep.metrics.inception import InceptionFeatures

    device = resolve_device(cfg.device)
    warn_if_biased(count)
    console = Console()
    console.print(f"Inception features of {count} {data_name} images ({shape}) on {device} ...")
    stats = stats_of_batches(
        InceptionFeatures().to(device), uint8_batches(datamodule.train_set, count, cfg.batch_size), device
    )
    selection = "all" if count == available else f"the first {count} of {available}"
    settings = ", ".join(
        f"data.{key}={cfg.data[key]}" for key in ("path", "root", "split", "resolution", "limit", "val_size", "seed")
        if key in cfg.data
    )
    note = (
        f"fewstep.fid_reference: {selection} training images of {data_name} at {shape} ({settings}), "
        "2015-12-05 FID Inception pool features of uint8 images"
    )
    write_npz_reference(stats, out, note)
    console.print(
        f"mu, sigma of {stats['n']} images -> {out}  (use: python -m fewstep.evaluate ckpt=PATH ref={out})", soft_wrap=True
    )
    return {"path": str(out), "n": stats["n"], "note": note}


@hydra.main(version_base="1.3", config_path="conf", config_name="fid_reference")
@user_errors
def main(cfg: DictConfig) -> None:
    fid_reference(cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
