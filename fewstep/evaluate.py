"""python -m fewstep.evaluate ckpt=PATH sampler=heun nfe=35 n=10000 metric=fid: one row of results as JSON.

The row goes to ``result.json`` in the run directory; with Hydra multirun each job writes its own,
and ``python -m fewstep.report DIR`` turns a multirun directory into a table and an FID-vs-NFE plot.

The papers' protocol: ``ref=PATH.npz`` (EDM's / ADM's ``mu``, ``sigma``, or ``python -m fewstep.fid_reference``)
replaces the training images as the real statistics, ``repeats=K`` scores K sample sets with disjoint seeds
and reports the best (EDM's practice), mean and std, and ``protocol=paper`` sets metric=fid n=50000 repeats=3.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from fewstep.checkpoints import load_method
from fewstep.cli import CONF_DIR, check_overrides, user_errors
from fewstep.errors import ConfigError, FewstepError
from fewstep.generate import generate, load_guide, resolve_device
from fewstep.images import to_uint8
from fewstep.metrics.score import feature_extractor, reference_key, score, score_against_file
from fewstep.options import check_evaluate_options
from fewstep.progress import Progress, duration
from fewstep.run_config import build_data, training_config


def evaluate_checkpoint(
    path: str | Path, sampler: str | dict | None = None, nfe: int | None = None, n: int | None = None,
    metric: str | None = None, repeats: int | None = None, out: str | Path | None = None, **more,
) -> dict:
    """``python -m fewstep.evaluate`` as a function: the result row of checkpoint ``path``, also written to
    ``out``/result.json when ``out`` is given.

    ``sampler`` is a solver name or {name, **options}; ``more`` holds any other key of conf/evaluate.yaml (seed,
    weights, ref, protocol, guidance, grid, batch_size, ...). An argument left None keeps the config's value.
    """
    return announce(result_row(evaluate_config(path, sampler, nfe=nfe, n=n, metric=metric, repeats=repeats, **more)), out)


def evaluate_config(path: str | Path, sampler: str | dict | None = None, **values) -> DictConfig:
    """conf/evaluate.yaml composed for checkpoint ``path`` with ``values`` (None: the config's own value)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    options = {"name": sampler} if isinstance(sampler, str) else dict(sampler or {})
    name, overrides = options.pop("name", None), []
    if name:  # a solver without a config of its own (one registered at run time) takes euler's, which has no options
        overrides.append(f"sampler={name if (CONF_DIR / 'sampler' / f'{name}.yaml').is_file() else 'euler'}")
    if values.get("protocol"):
        overrides.append(f"protocol={values.pop('protocol')}")
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (whose config tree is fewstep's)
        cfg = compose("evaluate", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
            cfg = compose("evaluate", overrides=overrides)
    unknown = sorted(key for key in values if key not in cfg or key in ("ckpt", "paths"))
    if unknown:
        raise ConfigError(f"evaluate_checkpoint got {unknown[0]}=: not an option of conf/evaluate.yaml; choose from "
                          f"{', '.join(key for key in cfg if key not in ('ckpt', 'paths', 'sampler'))}")
    with open_dict(cfg):
        cfg.ckpt = str(path)
        for key, value in values.items():
            if value is not None:
                cfg[key] = str(value) if isinstance(value, Path) else value
        if name:
            cfg.sampler.name = name
        cfg.sampler.update(options)
    return cfg


def evaluate(cfg: DictConfig) -> dict:
    """The result row of ``cfg`` (conf/evaluate.yaml), as the command line gives it: written to the run directory."""
    return announce(result_row(cfg), cfg.paths.output_dir)


def announce(row: dict, out: str | Path | None) -> dict:
    """Print ``row`` in one line and write it to ``out``/result.json (nowhere without ``out``)."""
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(row, indent=2))
    extra = "".join(f", {key} {row[key]:.3f}" for key in ("precision", "recall", "class_entropy") if key in row)
    if "values" in row:
        extra += (
            f"  (best of {len(row['values'])} seed sets: {', '.join(f'{v:.4g}' for v in row['values'])}; "
            f"mean {row['mean']:.4g} +- {row['std']:.2g})"
        )
    against = f", against {row['ref']}" if "ref" in row else ""
    written = f" -> {out / 'result.json'}" if out is not None else ""
    Console().print(
        f"{row['metric']} = {row['value']:.4g}{extra}  ({row['sampler']}, {row['nfe']} NFE, n = {row['n']}{against}){written}",
        soft_wrap=True,
    )
    return row


def result_row(cfg: DictConfig) -> dict:
    """Sample and score as ``cfg`` says: the row of result.json."""
    check_evaluate_options(cfg)
    reference = file_reference(cfg)  # None: the real statistics come from the training images
    seeds = repeat_seeds(cfg.seed, cfg.n, cfg.get("repeats", 1))
    device = resolve_device(cfg.device)
    # With ref= the training config only names the data set in the row; never required then (unless given).
    train_cfg = training_config(cfg.ckpt, cfg.data_config, required=reference is None or bool(cfg.data_config))
    weights = cfg.get("weights", "ema")
    method = load_method(cfg.ckpt, map_location=device, weights=weights)
    guide = load_guide(method, cfg.get("guide"), cfg.guidance, cfg.get("guidance_interval"), device, weights)
    datamodule = None if reference is not None else build_data(train_cfg.data)
    real = None if reference is not None else datamodule.real_images(cfg.n)
    data_name = None if train_cfg is None else train_cfg.data._target_.rpartition(".")[2]
    cache_dir = Path(cfg.cache_dir).expanduser()
    extractor = feature_extractor(cfg.metric, datamodule, data_name, cache_dir).to(device)
    key = None if reference is not None else reference_key(data_name, datamodule.shape, cfg.metric, len(real))

    progress = Progress.from_config(cfg.get("progress"))

    def score_set(fake, label):
        if reference is not None:
            return score_against_file(extractor, reference, fake, cfg.batch_size, progress, label)
        return score(cfg.metric, extractor, real, fake, key, cache_dir, cfg.batch_size, progress, label)

    values, first, nfe, seconds = sample_and_score(cfg, method, seeds, score_set, progress, guide)
    repeats = summarise_repeats(values, seeds)
    value = repeats.get("best", values[0])
    row = {
        "metric": cfg.metric, "value": value, "sampler": cfg.sampler.name, "nfe_budget": cfg.nfe, "nfe": nfe,
        "grid": cfg.grid, "guidance": cfg.guidance, "guide": str(Path(cfg.guide).resolve()) if cfg.get("guide") else None,
        "guidance_interval": OmegaConf.to_container(cfg.guidance_interval) if cfg.get("guidance_interval") else None, "n": cfg.n,
        "n_real": len(real) if reference is None else (None if reference["assumed_n"] else reference["n"]),
        "seed": cfg.seed, "images_per_second": cfg.n * len(seeds) / seconds, "data": data_name,
        "ckpt": str(Path(cfg.ckpt).resolve()), "sampler_options": OmegaConf.to_container(cfg.sampler),
        "device": str(device), "weights": weights, **repeats,
    }
    if reference is not None:
        row["ref"] = reference["path"]
    if cfg.get("protocol"):
        row["protocol"] = cfg.protocol
    if cfg.metric == "fid_domain":
        row["domain_classifier_accuracy"] = extractor.accuracy  # fid_domain is not comparable with published FID
        row.update(diversity(extractor, real, first, datamodule.num_classes, cfg.batch_size))
    return row


def sample_and_score(
    cfg: DictConfig, method, seeds: list[int], score_set, progress: Progress | None = None, guide=None
) -> tuple[list[float], torch.Tensor, int, float]:
    """Draw cfg.n samples from each first seed in ``seeds`` and score them with ``score_set(uint8 images, label)``;
    ``guide``: the autoguidance model (``fewstep.generate.load_guide``), or None.

    One sample set is in memory at a time (50,000 images at 3 x 32 x 32 are 600 MB as floats). Returns the
    values, the first set as uint8 (for fid_domain's diversity), the NFE as counted and the sampling seconds.
    ``progress`` shows each set's phases: sampling, features (inside ``score_set``) and statistics.
    """
    progress = progress or Progress(enabled=False)
    options = {key: value for key, value in cfg.sampler.items() if key != "name"}
    values, first, seconds = [], None, 0.0
    for k, seed in enumerate(seeds):
        label = f"set {k + 1}/{len(seeds)} " if len(seeds) > 1 else ""
        progress.note(
            f"{label}sampling {cfg.n} images (seeds {seed} to {seed + cfg.n - 1}): {cfg.sampler.name} at {cfg.nfe} NFE, "
            f"{cfg.batch_size} per batch"
        )
        start = time.perf_counter()
        with progress.task(f"{label}sampling", cfg.n, "images") as task:
            samples, _, nfe = generate(
                method, cfg.n, cfg.sampler.name, cfg.nfe, seed, cfg.guidance, cfg.batch_size, cfg.grid,
                callback=lambda info, task=task: task.update(info["done"]), guide=guide,
                guidance_interval=cfg.get("guidance_interval"), **options,
            )
        sampled = time.perf_counter() - start
        seconds += sampled
        fake = to_uint8(samples)
        del samples
        start = time.perf_counter()
        value = score_set(fake, label)
        if not math.isfinite(value):
            raise NonFiniteScore(
                f"{cfg.metric} of the samples with seeds {seed} to {seed + cfg.n - 1} is {value}: the features of the "
                "images or of the real reference are not finite; check the reference (ref=, or delete the cached "
                f"statistics under {cfg.cache_dir}) and the feature network (python -m fewstep.metrics.weights)"
            )
        values.append(value)
        if label:
            progress.note(f"{label}{cfg.metric} = {value:.4g} (sampling {duration(sampled)}, scoring "
                          f"{duration(time.perf_counter() - start)})")
        first = fake if first is None else first
    return values, first, nfe, seconds


class NonFiniteScore(FewstepError):
    """A score came out NaN or infinite: no result.json is written from it."""


def file_reference(cfg: DictConfig) -> dict | None:
    """The real statistics of ``ref=PATH.npz`` (metric=fid only; required by protocol=paper), or None without ref."""
    from fewstep.metrics.reference import MAKE_REFERENCE, read_npz_reference

    ref, protocol = cfg.get("ref"), cfg.get("protocol")
    if protocol == "paper":
        if not ref:
            raise ConfigError(
                "protocol=paper needs ref=PATH.npz: the reference statistics (mu, sigma) of the whole training set, "
                f"EDM's fid-refs file (e.g. cifar10-32x32.npz) or one made by `{MAKE_REFERENCE}`"
            )
        paper = {"metric": "fid", "n": 50_000, "repeats": 3}
        changed = [f"{name}={cfg.get(name)}" for name, value in paper.items() if cfg.get(name) != value]
        if changed:
            warnings.warn(
                f"protocol=paper with {', '.join(changed)}: not the papers' setting "
                "(metric=fid n=50000 repeats=3), so the result is not comparable with published FID",
                stacklevel=2,
            )
    if not ref:
        return None
    if cfg.metric != "fid":
        raise ConfigError(
            f"ref= holds FID Inception statistics, which metric={cfg.metric} cannot use: "
            "use metric=fid, or drop ref= to score against the training images"
        )
    reference = read_npz_reference(ref)
    reference["path"] = str(Path(ref).expanduser().resolve())
    return reference


def repeat_seeds(seed: int, n: int, repeats: int) -> list[int]:
    """First seeds of ``repeats`` sample sets of n images: set k uses seeds seed + k n .. seed + (k + 1) n - 1,
    so no two sets share a seed (image i of a set uses its first seed + i)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats}: score at least one sample set (repeats>=1)")
    return [seed + k * n for k in range(repeats)]


def summarise_repeats(values: list[float], seeds: list[int]) -> dict:
    """Every value, its set's first seed, the best (lowest: EDM reports the best of three) and mean and
    std (sample std, ddof = 1) over the sets; nothing for a single set, whose row keeps its old keys."""
    if len(values) < 2:
        return {}
    return {
        "repeats": len(values), "values": values, "seeds": seeds, "best": min(values),
        "mean": statistics.fmean(values), "std": statistics.stdev(values),
    }


@torch.no_grad()
def diversity(extractor, real, fake, num_classes: int, batch_size: int) -> dict:
    """Precision and recall on the domain classifier's features, the class coverage of its predictions, the dark pixels."""
    from fewstep.metrics.diversity import class_coverage, dark_pixel_stats, precision_recall
    from fewstep.metrics.domain import to_model_range

    device = next(extractor.parameters()).device

    def batches(images, fn):
        return torch.cat([fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])

    precision, recall = precision_recall(batches(real, extractor), batches(fake, extractor))
    predicted = batches(fake, lambda x: extractor.classifier(to_model_range(x)).argmax(1))
    return {"precision": precision, "recall": recall, **class_coverage(predicted, num_classes), **dark_pixel_stats(fake)}


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["value"]


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
