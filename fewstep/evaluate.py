"""python -m fewstep.evaluate ckpt=PATH sampler=heun nfe=35 n=10000 metric=fid: one row of results as JSON.

The row goes to ``result.json`` in the run directory; with Hydra multirun each job writes its own,
and ``python -m fewstep.report DIR`` turns a multirun directory into a table and an FID-vs-NFE plot.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fewstep.checkpoints import load_method
from fewstep.cli import check_overrides, user_errors
from fewstep.errors import ConfigError
from fewstep.generate import generate
from fewstep.images import to_uint8
from fewstep.metrics.score import check_metric, feature_extractor, reference_key, score
from fewstep.sample import resolve_device


def training_config(ckpt: str, data_config: str | None) -> DictConfig:
    """The training run's config: ``data_config``, or the nearest .hydra/config.yaml above the checkpoint.

    A plain run keeps it at <run>/.hydra; a staged run's checkpoints sit one level deeper, in
    <run>/stage<i>_<M>steps/checkpoints.
    """
    if data_config:
        path = Path(data_config)
    else:
        found = [d / ".hydra" / "config.yaml" for d in Path(ckpt).resolve().parents if (d / ".hydra" / "config.yaml").is_file()]
        path = found[0] if found else Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no training config at '{path}': pass data_config=PATH to the .hydra/config.yaml of the run "
            "that wrote the checkpoint, so that the reference images come from its data set"
        )
    return OmegaConf.load(path)


def evaluate(cfg: DictConfig) -> dict:
    check_metric(cfg.metric)
    if cfg.n < 1:
        raise ConfigError(f"n={cfg.n}: ask for at least one image (n>=1)")
    device = resolve_device(cfg.device)
    train_cfg = training_config(cfg.ckpt, cfg.data_config)
    method = load_method(cfg.ckpt, map_location=device)
    if cfg.guidance and not method.num_classes:
        raise ConfigError("guidance needs a class-conditional model (trained with method.conditional=true); use guidance=0")
    datamodule = instantiate(train_cfg.data)
    real = datamodule.real_images(cfg.n)

    options = {key: value for key, value in cfg.sampler.items() if key != "name"}
    start = time.perf_counter()
    samples, _, nfe = generate(
        method, cfg.n, cfg.sampler.name, cfg.nfe, cfg.seed, cfg.guidance, cfg.batch_size, cfg.grid, **options
    )
    seconds = time.perf_counter() - start
    data_name = train_cfg.data._target_.rpartition(".")[2]
    cache_dir = Path(cfg.cache_dir).expanduser()
    extractor = feature_extractor(cfg.metric, datamodule, data_name, cache_dir).to(device)
    key = reference_key(data_name, datamodule.shape, cfg.metric, len(real))
    value = score(cfg.metric, extractor, real, to_uint8(samples), key, cache_dir, cfg.batch_size)
    row = {
        "metric": cfg.metric, "value": value, "sampler": cfg.sampler.name, "nfe_budget": cfg.nfe, "nfe": nfe,
        "grid": cfg.grid, "guidance": cfg.guidance, "n": cfg.n, "n_real": len(real), "seed": cfg.seed,
        "images_per_second": cfg.n / seconds, "data": data_name,
        "ckpt": str(Path(cfg.ckpt).resolve()), "sampler_options": OmegaConf.to_container(cfg.sampler),
        "device": str(device),
    }
    if cfg.metric == "fid_domain":
        row["domain_classifier_accuracy"] = extractor.accuracy  # fid_domain is not comparable with published FID
        row.update(diversity(extractor, real, to_uint8(samples), datamodule.num_classes, cfg.batch_size))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(row, indent=2))
    extra = "".join(f", {key} {row[key]:.3f}" for key in ("precision", "recall", "class_entropy") if key in row)
    Console().print(f"{cfg.metric} = {value:.4g}{extra}  ({cfg.sampler.name}, {nfe} NFE, n = {cfg.n}) -> {out / 'result.json'}")
    return row


@torch.no_grad()
def diversity(extractor, real, fake, num_classes: int, batch_size: int) -> dict:
    """Precision and recall on the domain classifier's features, and the class coverage of its predictions."""
    from fewstep.metrics.diversity import class_coverage, precision_recall
    from fewstep.metrics.domain import to_model_range

    device = next(extractor.parameters()).device

    def batches(images, fn):
        return torch.cat([fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])

    precision, recall = precision_recall(batches(real, extractor), batches(fake, extractor))
    predicted = batches(fake, lambda x: extractor.classifier(to_model_range(x)).argmax(1))
    return {"precision": precision, "recall": recall, **class_coverage(predicted, num_classes)}


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["value"]


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
