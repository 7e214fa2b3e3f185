"""Power-function EMAs tracked during training and stored as snapshots for post-hoc EMA (Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3): ``python -m fewstep.phema`` later
reconstructs the EMA of any sigma_rel from them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from fewstep.errors import CheckpointError, ConfigError
from fewstep.phema import (
    SNAPSHOT_DIR,
    SNAPSHOT_NAME,
    check_sigma_rel,
    per_step_beta,
    save_snapshot,
    sigma_rel_name,
    sigma_rel_to_gamma,
)


class PowerFunctionEMA(L.Callback):
    """EMAs of the method's network (``module``, its trainable parameters) with the profiles tau^gamma of each
    ``sigma_rel``, updated after every optimiser step t with beta_t = (1 - 1/t)^(gamma + 1), and written every
    ``snapshot_every`` steps (and at the end of training) to ``dirpath``/phema-<t>-<sigma_rel>.pt.

    t counts the training steps this callback has seen (an optimiser step, or a GAN's generator-and-critic round:
    Lightning's global_step grows by one per optimiser there). The EMAs and t are part of Lightning's checkpoint, so a
    resumed run continues them bit for bit; snapshots beyond the step it resumes from are removed, as the resumed run
    writes them again. ``dirpath`` None: <trainer.default_root_dir>/phema. The fixed EMA (callbacks.ema) is untouched.
    """

    def __init__(self, sigma_rel=(0.05, 0.10), snapshot_every: int = 250, dirpath: str | None = None,
                 module: str = "net", snapshot_at_end: bool = True):
        self.sigma_rel = [float(s) for s in sigma_rel]
        check_sigma_rel(self.sigma_rel)
        if len({sigma_rel_name(s) for s in self.sigma_rel}) != len(self.sigma_rel):
            raise ConfigError(f"callbacks.phema.sigma_rel={self.sigma_rel} names a value twice: give each once")
        if not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ConfigError(f"callbacks.phema.snapshot_every={snapshot_every}: give a whole number of steps, 1 or more")
        self.gamma = [float(g) for g in sigma_rel_to_gamma(self.sigma_rel)]
        self.snapshot_every = snapshot_every
        self.dirpath = dirpath
        self.module = module
        self.snapshot_at_end = snapshot_at_end
        self.t = 0  # steps averaged so far
        self.seen_global_step = 0  # trainer.global_step at the last update
        self.averages: list[dict[str, torch.Tensor]] | None = None  # one {name: tensor} per sigma_rel
        self.loaded: dict | None = None

    # -- what is tracked -------------------------------------------------------------------------------------------------
    def tracked(self, pl_module) -> dict[str, torch.Tensor]:
        """The trainable parameters of ``pl_module.<module>``, by their names in the method's state_dict."""
        network = getattr(pl_module, self.module, None)
        if not isinstance(network, torch.nn.Module):
            raise ConfigError(f"callbacks.phema.module={self.module}: {type(pl_module).__name__} has no network of that "
                              "name; use net (the network every fewstep method samples with)")
        return {f"{self.module}.{name}": p for name, p in network.named_parameters() if p.requires_grad}

    def directory(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / SNAPSHOT_DIR

    # -- Lightning -------------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and "FSDP" in type(trainer.strategy).__name__:
            raise ConfigError("callbacks.phema does not average sharded (FSDP) weights: use trainer=gpu or trainer=ddp")

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning restored the checkpoint (load_state_dict), so resumed averages replace the fresh ones here
        params = self.tracked(pl_module)
        if self.loaded is not None:
            state, self.loaded = self.loaded, None
            for averages in state["averages"]:
                reason = mismatch(params, averages)
                if reason:
                    raise CheckpointError(f"the checkpoint's post-hoc EMA does not fit this run's network ({reason}): "
                                          "resume with the run's own model settings")
            self.averages = [{n: a.to(params[n].device) for n, a in averages.items()} for averages in state["averages"]]
            self.t, self.seen_global_step = state["t"], state["seen_global_step"]
        else:
            self.averages = [{n: p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
                              for n, p in params.items()} for _ in self.sigma_rel]
            self.seen_global_step = trainer.global_step  # a run resumed from a checkpoint without them starts them here
        if trainer.is_global_zero:
            self.remove_later_snapshots(trainer)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.seen_global_step:  # no optimiser step in this batch (gradient accumulation)
            return
        self.seen_global_step = trainer.global_step
        self.t += 1
        params = self.tracked(pl_module)
        names = list(params)
        for averages, gamma in zip(self.averages, self.gamma):
            weight = 1.0 - per_step_beta(self.t, gamma)  # 1 at t = 1: the first average is the weights themselves
            torch._foreach_lerp_([averages[n] for n in names], [params[n].detach().to(averages[n].dtype) for n in names],
                                 weight)
        if self.t % self.snapshot_every == 0:
            self.write_snapshots(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.snapshot_at_end and self.t > 0 and self.t % self.snapshot_every != 0:
            self.write_snapshots(trainer, pl_module)

    def state_dict(self) -> dict:
        averages = self.averages if self.averages is not None else (self.loaded or {}).get("averages")
        if averages is None:
            return {}
        return {"sigma_rel": list(self.sigma_rel), "t": self.t, "seen_global_step": self.seen_global_step,
                "averages": [{n: a.detach().to("cpu", copy=True) for n, a in ema.items()} for ema in averages]}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if [float(s) for s in state_dict.get("sigma_rel", [])] != self.sigma_rel:
            raise CheckpointError(f"the checkpoint's post-hoc EMA tracks sigma_rel={state_dict.get('sigma_rel')}, this run's "
                                  f"callbacks.phema.sigma_rel={self.sigma_rel}: resume with the same values")
        self.loaded = state_dict

    # -- snapshots -------------------------------------------------------------------------------------------------------
    def write_snapshots(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        cls = type(pl_module)
        directory = self.directory(trainer)
        for sigma_rel, averages in zip(self.sigma_rel, self.averages):
            try:
                save_snapshot(directory, self.t, trainer.global_step, sigma_rel, f"{cls.__module__}.{cls.__qualname__}",
                              averages)
            except OSError as error:
                raise CheckpointError(f"could not write the post-hoc EMA snapshot of step {self.t} under '{directory}' "
                                      f"({error.strerror or error}): free space and continue with resume=auto") from None

    def remove_later_snapshots(self, trainer) -> None:
        """Snapshots past this run's step are of the run it resumes (killed after them): it writes them again."""
        for path in self.directory(trainer).glob("phema-*.pt"):
            match = SNAPSHOT_NAME.fullmatch(path.name)
            if match and int(match[1]) > self.t:
                path.unlink(missing_ok=True)


def mismatch(params: dict[str, torch.Tensor], averages: dict[str, torch.Tensor]) -> str | None:
    for name, p in params.items():
        if name not in averages:
            return f"it has no average of {name!r}"
        if averages[name].shape != p.shape:
            return f"its average of {name!r} is {tuple(averages[name].shape)}, the network's {tuple(p.shape)}"
    extra = next((n for n in averages if n not in params), None)
    return f"it averages {extra!r}, which this network does not train" if extra else None
