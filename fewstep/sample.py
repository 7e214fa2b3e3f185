"""python -m fewstep.sample ckpt=PATH sampler=heun nfe=35 n=64 seed=0: a PNG grid and an .npz of samples."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console

from fewstep.checkpoints import load_method
from fewstep.cli import check_overrides, user_errors
from fewstep.generate import generate, load_guide, resolve_device
from fewstep.images import save_grid, to_uint8
from fewstep.options import check_sample_options
from fewstep.progress import Progress


def sample_checkpoint(cfg: DictConfig) -> dict:
    check_sample_options(cfg)
    device = resolve_device(cfg.device)
    method = load_method(cfg.ckpt, map_location=device, weights=cfg.get("weights", "ema"))
    guide = load_guide(method, cfg.get("guide"), cfg.guidance, cfg.get("guidance_interval"), device, cfg.get("weights", "ema"))
    progress = Progress.from_config(cfg.get("progress"))
    progress.note(f"sampling {cfg.n} samples: {cfg.sampler.name} at {cfg.nfe} NFE, {cfg.batch_size} per batch, on {device}")
    start = time.perf_counter()
    with progress.task("sampling", cfg.n, "samples") as task:
        samples, labels, nfe = generate(
            method, cfg.n, cfg.sampler.name, cfg.nfe, cfg.seed, cfg.guidance, cfg.batch_size, cfg.grid,
            callback=lambda info: task.update(info["done"]), guide=guide, guidance_interval=cfg.get("guidance_interval"),
            **{key: value for key, value in cfg.sampler.items() if key != "name"},
        )
    seconds = time.perf_counter() - start

    out = Path(cfg.paths.output_dir)
    arrays = {"samples": samples.cpu().numpy(), "seeds": np.arange(cfg.seed, cfg.seed + cfg.n)}
    if samples.ndim == 4:
        arrays["images"] = to_uint8(samples).cpu().numpy()
        save_grid(samples, out / "samples.png")
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez_compressed(out / "samples.npz", **arrays)
    Console().print(
        f"{cfg.n} samples, {cfg.sampler.name} at {nfe} NFE, {cfg.n / seconds:.1f} samples/s -> "
        f"{out / 'samples.npz'}" + (f" and {out / 'samples.png'}" if samples.ndim == 4 else ""),
        soft_wrap=True,  # paths stay whole, to be copied from a log
    )
    return {"nfe": nfe, "seconds": seconds, "dir": str(out)}


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@user_errors
def main(cfg: DictConfig) -> None:
    sample_checkpoint(cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
