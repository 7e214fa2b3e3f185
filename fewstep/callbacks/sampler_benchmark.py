"""FID (or fid_domain, KID) against NFE of the EMA model during training, for a grid of samplers."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from fewstep.errors import ConfigError
from fewstep.generate import generate_across_ranks
from fewstep.images import image_grid, run_log_dir
from fewstep.metrics.curves import figure, setting, tables
from fewstep.metrics.score import check_metric, feature_extractor, reference_key, score
from fewstep.samplers import check_solver

SAMPLER_CONF = Path(__file__).parent.parent / "conf" / "sampler"


def sampler_options(sampler: dict | str) -> dict:
    """A sampler config {name, **options}; a bare name gets the options of conf/sampler/<name>.yaml."""
    if not isinstance(sampler, str):
        return dict(sampler)
    path = SAMPLER_CONF / f"{sampler}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {"name": sampler}


class SamplerBenchmark(L.Callback):
    """Every ``every_n_validations`` validations, scores each (sampler, NFE, guidance) of the EMA model.

    For each setting it draws ``n`` samples at seeds ``seed .. seed + n - 1`` (the same images every
    time, so curves across training are comparable) and logs to every logger ``benchmark/<metric>``,
    ``benchmark/nfe`` (as counted) and ``benchmark/images_per_second``, and to TensorBoard a grid of
    the first ``grid_images`` samples per setting and a metric-versus-NFE figure. Rows also go to
    ``<log_dir>/benchmark/results.jsonl`` and the figure to ``<log_dir>/benchmark/``.

    Like SampleGrid it runs inside the first validation batch, where EMAWeightAveraging has swapped the
    EMA weights in. Under DDP or FSDP every rank draws an equal share of the samples and the shares are
    gathered, as uint8 images, in seed order (``generate_across_ranks``), so the scores do not depend on
    the number of devices; rank zero alone builds the feature network and real images, scores, logs,
    writes and keeps the rows. ``images_per_second`` is n over the wall-clock time of the generation on
    every rank and the gather (not the scoring).

    The feature network lives here, not in the LightningModule, so checkpoints stay small; the
    checkpoint keeps only the rows measured so far (``state_dict``), so a resumed run carries its
    history on.
    """

    def __init__(
        self,
        samplers: list = ("heun",),
        nfe: list[int] = (35,),
        guidance: list[float] = (0.0,),
        n: int = 1000,
        metric: str = "fid_domain",
        every_n_validations: int = 1,
        seed: int = 0,
        batch_size: int = 256,
        grid: str | None = None,
        grid_images: int = 64,
        cache_dir: str = "~/.cache/fewstep",
    ):
        check_metric(metric)
        if n < 2:
            raise ConfigError(f"SamplerBenchmark n={n}: FID needs at least 2 generated images (n>=2)")
        if every_n_validations < 1:
            raise ConfigError(f"SamplerBenchmark every_n_validations={every_n_validations}: use a count >= 1")
        self.samplers = [sampler_options(s) for s in samplers]
        for options, budget in itertools.product(self.samplers, nfe):
            check_solver(options["name"], budget)  # fail before training, not hours into it
        self.nfe, self.guidance = list(nfe), [float(w) for w in guidance]
        self.n, self.metric, self.every, self.seed = n, metric, every_n_validations, seed
        self.batch_size, self.grid, self.grid_images = batch_size, grid, grid_images
        self.cache_dir = Path(cache_dir).expanduser()
        self.validations = 0
        self.rows: list[dict] = []
        self._extractor = None  # built on first use; never part of the checkpoint
        self._real = None

    @property
    def state_key(self) -> str:
        # two benchmarks in one run (say fid and fid_domain) keep separate histories in the checkpoint
        return self._generate_state_key(metric=self.metric, n=self.n)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if any(self.guidance) and not pl_module.num_classes:
            raise ConfigError(
                "SamplerBenchmark guidance needs a class-conditional model (method.conditional=true); use guidance=[0]"
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        # Outside validation's inference mode, because fid_domain may first have to train its classifier.
        if trainer.is_global_zero and len(trainer.datamodule.shape) == 3:
            self.references(trainer, pl_module)

    def settings(self):
        return itertools.product(self.samplers, self.nfe, self.guidance)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        self.validations += 1  # on every rank, so that all ranks generate, and gather, together
        if self.validations % self.every:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            rows = [self.measure(trainer, pl_module, *s) for s in self.settings()]
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self.rows += rows
            self.publish(trainer, rows)

    def references(self, trainer, pl_module):
        """The feature network and the real images, made once per run (the statistics are cached on disk)."""
        if self._extractor is None:
            datamodule = trainer.datamodule
            self._data_name = type(datamodule).__name__
            self._real = datamodule.real_images(self.n)
            extractor = feature_extractor(self.metric, datamodule, self._data_name, self.cache_dir)
            self._extractor = extractor.to(pl_module.device).eval()
            self._key = reference_key(self._data_name, datamodule.shape, self.metric, len(self._real))
        return self._extractor, self._real

    def measure(self, trainer, pl_module, sampler: dict, budget: int, guidance: float) -> dict:
        """One setting's row; every rank generates, rank zero alone scores (the other ranks' rows are not kept)."""
        options = {k: v for k, v in sampler.items() if k != "name"}
        synchronize(pl_module.device)
        start = time.perf_counter()
        samples, preview, used = generate_across_ranks(
            trainer, pl_module, self.n, sampler["name"], budget, self.seed, guidance, self.batch_size, self.grid,
            uint8=True, preview=self.grid_images, **options,
        )
        synchronize(pl_module.device)
        seconds = time.perf_counter() - start
        row = {
            "metric": self.metric, "sampler": sampler["name"], "nfe_budget": budget, "nfe": used, "grid": self.grid,
            "guidance": guidance, "n": self.n, "seed": self.seed, "images_per_second": self.n / seconds,
            "step": trainer.global_step, "sampler_options": options,
        }
        if samples.ndim == 4 and trainer.is_global_zero:  # images: score them; vector data has no feature network
            extractor, real = self.references(trainer, pl_module)
            row["value"] = score(self.metric, extractor, real, samples, self._key, self.cache_dir, self.batch_size)
            row["n_real"] = len(real)
            self.log_grid(trainer, row, preview)
        return row

    def log_grid(self, trainer, row: dict, samples: torch.Tensor) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                tag = f"benchmark/{tag_of(row)}"
                logger.experiment.add_image(tag, image_grid(samples), trainer.global_step)

    def publish(self, trainer, rows: list[dict]) -> None:
        step = trainer.global_step
        scalars = {}
        for row in rows:
            tag = tag_of(row)
            if "value" in row:
                scalars[f"benchmark/{self.metric}/{tag}"] = row["value"]
            scalars[f"benchmark/nfe/{tag}"] = row["nfe"]
            scalars[f"benchmark/images_per_second/{tag}"] = row["images_per_second"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        # also where the run's returned metrics come from (a sweeper's optimized_metric, ModelCheckpoint's monitor)
        trainer.callback_metrics.update({key: torch.tensor(float(value)) for key, value in scalars.items()})
        out = run_log_dir(trainer) / "benchmark"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "a") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        scored = [row for row in rows if "value" in row]
        if not scored:
            return
        from matplotlib import pyplot as plt

        fig = figure(self.metric, tables(scored)[self.metric])
        fig.axes[0].set_title(f"{self.metric} against NFE at step {step} (n = {self.n})")
        fig.savefig(out / f"{self.metric}_vs_nfe_step{step:07d}.png", dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"benchmark/{self.metric}_vs_nfe", fig, step, close=False)
        plt.close(fig)

    def state_dict(self) -> dict:
        return {"validations": self.validations, "rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validations = state_dict["validations"]
        self.rows = list(state_dict["rows"])


def tag_of(row: dict) -> str:
    return f"{setting(row)}_nfe{row['nfe_budget']}".replace(" ", "").replace(",", "_")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
