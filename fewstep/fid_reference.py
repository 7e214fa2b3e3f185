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
from fewstep.options import check_reference_options
from fewstep.progress import Progress


def uint8_batches(dataset, count: int, batch_size: int):
    """The first ``count`` images of a data set of (x in [-1, 1], y) as uint8 batches [B, C, H, W]
    (the conversion of ``ImageDataModule.real_images``), one batch in memory at a time.

    An image holding NaN or infinite values stops in one line (``uint8`` would turn NaN into black pixels, and the
    statistics would be wrong with no sign of it)."""
    for start in range(0, count, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(count, start + batch_size))])
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).nonzero().flatten().tolist()
            named = ", ".join(str(start + k) for k in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ConfigError(
                f"training images {named} of the data set hold NaN or infinite values: no statistics were written; "
                "check the data files (data.path / data.root) or leave those images out (data.limit)"
            )
        yield ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def fid_reference(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from fewstep.data.images import ImageDataModule

    check_reference_options(cfg)
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
    console = Console(soft_wrap=True)  # paths stay whole, to be copied from a log
    console.print(f"Inception features of {count} {data_name} images ({shape}) on {device} ...")
    progress = Progress.from_config(cfg.get("progress"))
    batches = progress.track(uint8_batches(datamodule.train_set, count, cfg.batch_size), "features", count, "images")
    stats = stats_of_batches(InceptionFeatures().to(device), batches, device)
    if not (torch.isfinite(stats["mean"]).all() and torch.isfinite(stats["cov"]).all()):
        raise ConfigError(
            f"the Inception features of the {count} images are not finite: no statistics were written to {out}; the "
            "FID Inception weights are damaged: reinstall them (python -m fewstep.metrics.weights)"
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
