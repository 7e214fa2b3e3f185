"""Plumbing shared by every method: the network from its config, label dropout, optimisers,
logging, and the denoiser interface that samplers and callbacks use."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

from fewstep.constructors import build, plain
from fewstep.errors import ConfigError, TrainingDiverged
from fewstep.methods.noise import BatchNoise
from fewstep.networks.preconditioning import edm_denoise
from fewstep.samplers import CountingDenoiser, sample
from fewstep.samplers.guidance import check_guide, guided_by

RNG_KEY = "rng"  # checkpoint["fewstep"][RNG_KEY]: the global generators' states, restored on resume


def plain_rng_states(states: dict) -> dict:
    """Lightning's RNG states with numpy's (a tuple holding an ndarray) as a tensor: loadable with weights_only."""
    states = dict(states)
    if "numpy" in states and isinstance(states["numpy"][1], np.ndarray):
        kind, keys, *rest = states["numpy"]
        states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), *rest)
    return states


def rng_states_from_plain(states: dict) -> dict:
    states = dict(states)
    if "numpy" in states and isinstance(states["numpy"][1], torch.Tensor):
        kind, keys, *rest = states["numpy"]
        states["numpy"] = (kind, keys.numpy().astype(np.uint32), *rest)
    return states


class GenerativeMethod(L.LightningModule):
    """Base LightningModule. Subclasses implement ``loss`` and ``denoiser``.

    ``net`` is the model config (a dict with ``_target_``); the network is built here from it, the
    data shape and the class count, so that a checkpoint alone can rebuild the method.
    """

    def __init__(
        self,
        net: dict,
        data_shape: Sequence[int],
        num_classes: int = 0,
        conditional: bool = False,
        label_dropout: float = 0.1,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ):
        super().__init__()
        net, optimizer, scheduler = plain(net), plain(optimizer), plain(scheduler)
        data_shape = list(data_shape)
        self.save_hyperparameters()
        # Lightning collects the arguments from every __init__ frame, the callers' unconverted ones too
        self.hparams.update(net=net, data_shape=data_shape, optimizer=optimizer, scheduler=scheduler)
        self.num_classes = num_classes if conditional else 0
        self.net = build(net, data_shape=data_shape, num_classes=self.num_classes)

    # -- conditioning ----------------------------------------------------------------------
    @property
    def null_label(self) -> int:
        """The class index that means "no label" (classifier-free guidance)."""
        return self.num_classes

    def training_labels(self, y: torch.Tensor, rng: BatchNoise) -> torch.Tensor | None:
        """Class labels with label dropout applied, or None for an unconditional method."""
        if not self.num_classes:
            return None
        drop = rng.rand() < self.hparams.label_dropout
        return torch.where(drop, torch.full_like(y, self.null_label), y)

    # -- interface for subclasses ----------------------------------------------------------
    def loss(self, x0: torch.Tensor, class_labels: torch.Tensor | None, rng: BatchNoise) -> torch.Tensor:
        """The loss of the batch ``x0``, all its randomness drawn from ``rng`` (``BatchNoise(n, device)``: torch's)."""
        raise NotImplementedError

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # -- sampling: one template, ``draw`` the hook -------------------------------------------------------------
    sampled = "denoiser"  # the model samplers call: denoiser(x, sigma, class_labels), or a Kac model's velocity

    def sample_batch(self, noise, sampler: str, nfe: int, class_labels=None, guidance: float = 0.0, grid=None,
                     guide=None, interval=None, **options):
        """Samples for the seeds of ``noise`` (a SeededNoise) with at most ``nfe`` network calls: (x, NFE counted).

        ``draw`` runs the sampler on the model, guided as ``sampling_model`` says, and counted.
        """
        counted = CountingDenoiser(self.sampling_model(class_labels, guidance, guide, interval))
        return self.draw(counted, noise, sampler, nfe, grid, options), counted.nfe

    def sampling_model(self, class_labels, guidance: float, guide=None, interval=None):
        """What the sampler calls, f(x, sigma): ``sampled``, with autoguidance by ``guide``'s denoiser when one is given
        (Karras et al. 2024), else with classifier-free guidance when ``class_labels`` are given; only for sigma in
        ``interval`` [sigma_lo, sigma_hi] when one is given (Kynkaanniemi et al. 2024).

        One call of f is one NFE: where guidance applies it evaluates both networks (the model and its guide, or the
        conditional and the unconditional model in one batch), elsewhere the model alone.
        """
        if guide is not None:
            check_guide(self, guide)
        elif interval is not None and (self.sampled != "denoiser" or getattr(self, "guided", False)):
            raise ConfigError(f"guidance_interval is in EDM's noise levels sigma, and this {type(self).__name__} is not "
                              "sampled through a denoiser D(x, sigma) with classifier-free guidance: use guidance_interval=null")
        guide_denoiser = None if guide is None else guide.denoiser
        return guided_by(getattr(self, self.sampled), guidance, class_labels, self.null_label, guide_denoiser, interval)

    def sampler_defaults(self) -> dict:
        """The sampler options (``grid`` included) this model is sampled with unless told otherwise."""
        return {"grid": "karras"}

    def draw(self, model, noise, sampler: str, nfe: int, grid: str | None, options: dict) -> torch.Tensor:
        """x from ``model``: a diffusion sampler from the seeds' x_T, with ``sampler_defaults`` under ``options``."""
        options = {**self.sampler_defaults(), **options, **({"grid": grid} if grid else {})}
        if options.get("sigma_data", 0.5) is None:  # lazy samplers: the data scale the model was trained with
            options["sigma_data"] = float(self.hparams.get("sigma_data", 0.5))
        x_T = noise.randn(tuple(self.hparams.data_shape))
        return sample(model, x_T, sampler, nfe, generator=noise, **options)

    def step_rng(self, n: int, device, batch_idx: int = 0) -> BatchNoise:
        """This training step's randomness for ``n`` samples per rank, seeded by the run's seed (seed_everything), the
        step and the micro-batch: the same on any number of devices, and again after a resume."""
        trainer = self._trainer
        if trainer is None:
            return BatchNoise(n, device)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        micro_batch = batch_idx % trainer.accumulate_grad_batches
        return BatchNoise.for_step(seed, self.global_step, n, device, trainer.global_rank, trainer.world_size, micro_batch)

    # -- Lightning -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0, y = batch
        rng = self.step_rng(x0.shape[0], x0.device, batch_idx)
        loss = self.loss(x0, self.training_labels(y, rng), rng)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def check_finite(self, value: torch.Tensor, what: str = "training", hint: str = "lower method.optimizer.lr") -> None:
        """Stop the run, in one line, when a loss is NaN or infinite: nothing is saved after the last good checkpoint."""
        if torch.isfinite(value).all():
            return
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        where = f"the last good checkpoint is {Path(last).resolve()}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"the {what} loss is {value.float().mean().item()} at step {self.global_step}: training diverged and "
            f"stopped; {where} (nothing was saved after it); {hint} and continue from it with ckpt_path=PATH"
        )

    def validation_step(self, batch, batch_idx):
        # Fixed noise per validation batch, so the validation loss is comparable across steps.
        x0, y = batch
        labels = y if self.num_classes else None
        loss = self.loss(x0, labels, BatchNoise.fixed(batch_idx, x0.shape[0], x0.device))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        optimizer = build(self.hparams.optimizer)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        spec = dict(self.hparams.scheduler)
        if "total_steps" in spec and spec["total_steps"] is None:  # OneCycleLR over this fit: a stage's own length
            spec["total_steps"] = int(self.trainer.max_steps)
        scheduler = build(spec)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What fewstep.checkpoints needs to rebuild this method from the file alone, and the random state,
        # so that a resumed run draws the noise the uninterrupted one would have drawn.
        cls = type(self)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # never initialise CUDA just for this
        # Plain containers only, so that fewstep reads its checkpoints with weights_only=True (no code from files):
        # Lightning keeps the OmegaConf nodes the configs came in, and numpy's RNG state is a numpy array.
        checkpoint["hyper_parameters"] = plain(checkpoint.get("hyper_parameters", {}))
        checkpoint.pop("hparams_type", None)
        rng = plain_rng_states(_collect_rng_states(cuda))
        checkpoint["fewstep"] = {"method_class": f"{cls.__module__}.{cls.__qualname__}", RNG_KEY: rng}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("fewstep", {}).get(RNG_KEY)
        self._resumed_rng = None if states is None else rng_states_from_plain(states)

    def on_train_start(self) -> None:
        # after the checkpoint and the dataloaders: nothing else draws from the generators before the first step
        states = getattr(self, "_resumed_rng", None)
        if states is not None:
            _set_rng_states(states)
            self._resumed_rng = None



class DenoiserMethod(GenerativeMethod):
    """A method whose model is a denoiser D(x, sigma, class_labels) in EDM's sigma space, made from its network:
    fewstep's networks get EDM's preconditioning (``sigma_data``), networks that carry their own (EDM's, diffusers')
    are called as they are. Any such method can teach the Gaussian students (``fewstep.methods.teacher``)."""

    kind_name = "an EDM-space denoiser"
    teacher_source = "a method=edm_teacher run, an EDM network pickle or a diffusers folder (teacher.ckpt=PATH)"

    def denoiser(self, x, sigma, class_labels=None):
        return edm_denoise(self.net, x, sigma, class_labels, self.hparams.sigma_data)

    def sampler_defaults(self) -> dict:
        # A network trained on a bounded range of noise levels (EDM's VP, a DDPM) is sampled inside it, as EDM does.
        defaults = super().sampler_defaults()
        low, high = getattr(self.net, "sigma_min", 0.0), getattr(self.net, "sigma_max", float("inf"))
        if low > 0.002:
            defaults["sigma_min"] = float(low)
        if high < 80.0:
            defaults["sigma_max"] = float(high)
        return defaults
