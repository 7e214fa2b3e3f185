"""python -m fewstep.train [group=choice ...]: train a method from the Hydra config tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from fewstep import rundir
from fewstep.checkpoints import AtomicCheckpointIO, check_compatible, latest_checkpoint, read_checkpoint
from fewstep.cli import CONF_DIR, check_overrides, fail, user_errors
from fewstep.errors import ConfigError, FewstepError
from fewstep.images import run_log_dir


def train(cfg: DictConfig) -> dict:
    """Train the configured method; a distillation method (one with a ``teacher``) gets its teacher first.

    The run directory is locked for the whole run (``fewstep.rundir``), and one that already holds checkpoints is
    refused before anything is loaded unless ``resume=auto`` or ``overwrite=true`` says what to do with them.
    """
    check_accelerator(cfg.trainer)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    taught = distills(cfg)
    if cfg.get("ddil") is not None and not taught:
        raise ConfigError("ddil=default changes how a distillation student trains; this method has no teacher: use ddil=none")
    with rundir.hold(cfg.paths.output_dir):
        rundir.check_checkpoints(cfg, stages=taught)
        datamodule = load_data(cfg)
        if taught:
            from fewstep.distill import train_student

            return train_student(cfg, fit, datamodule)
        return fit(cfg, datamodule=datamodule)


def distills(cfg: DictConfig) -> bool:
    """Whether this run distils a teacher: the method has a ``teacher`` group and, as configured, is taught
    (``TaughtMethod.taught``: scm only in scd mode). A ``teacher.ckpt`` for a method that is not is refused."""
    if cfg.get("teacher") is None:
        return False
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    cls = get_class(cfg.method._target_)
    taught = getattr(cls, "taught", None)
    if taught is None or taught(OmegaConf.to_container(cfg.method, resolve=True)):
        return True
    if cfg.teacher.get("ckpt"):
        raise ConfigError(f"teacher.ckpt={cfg.teacher.ckpt}: {cls.__name__} as configured trains from data without a "
                          "teacher; drop teacher.ckpt, or set the method's option that distils (scm: method.mode=scd)")
    return False


def check_accelerator(trainer: DictConfig) -> None:
    """A GPU trainer on a machine without CUDA fails here, in one line, before any data is loaded."""
    if trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "the trainer needs a CUDA GPU (trainer=gpu, ddp and fsdp do) and none is visible: use trainer=cpu, "
            "or trainer.devices=2 trainer.strategy=ddp for two CPU processes"
        )


def load_data(cfg: DictConfig):
    """The datamodule, loaded before the Trainer starts, so a missing data set fails at once, in one line."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def fit(cfg: DictConfig, method: L.LightningModule | None = None, datamodule=None) -> dict:
    """Instantiate what ``cfg`` names (the method too, unless given); fit; report where things are.

    ``cfg.paths.output_dir`` is locked while the fit uses it; the temporary files of checkpoint writes that a dead
    process left are removed, and existing checkpoints are continued (resume=auto, ckpt_path) or replaced
    (overwrite=true), never silently overwritten.
    """
    with rundir.hold(cfg.paths.output_dir):
        rundir.prepare(cfg)
        return fit_here(cfg, method, datamodule)


def fit_here(cfg: DictConfig, method: L.LightningModule | None, datamodule) -> dict:
    """``fit`` once its run directory is held."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    if datamodule is None:
        datamodule = load_data(cfg)
    if method is None:
        method = instantiate(cfg.method, net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes)
    if cfg.get("compile"):
        method.net.compile()  # in place: the state_dict keys, and so the checkpoints, stay those of the eager network
    ckpt_path = resume_from(cfg)
    if ckpt_path:
        check_compatible(read_checkpoint(ckpt_path), method, ckpt_path)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # a TensorBoardLogger becomes fewstep's GuardedTensorBoardLogger: a full disk is one warning, not a traceback
    loggers = [instantiate(c, **rundir.logger_target(c)) for c in (cfg.get("logger") or {}).values() if c is not None]
    # a GAN's two updates each leave the other network's parameters out of the graph, which DDP must be told
    unused = {"strategy": "ddp_find_unused_parameters_true"} if (
        cfg.trainer.get("strategy") == "ddp" and getattr(method, "ddp_unused_parameters", False)) else {}
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **unused
    )
    # weights_only: fewstep's checkpoints hold tensors and plain containers only, and no file runs code here
    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        report(trainer, Path(cfg.paths.output_dir), metrics)
    return metrics


def resume_from(cfg: DictConfig) -> str | None:
    """``ckpt_path``, or with ``resume=auto`` the latest readable checkpoint of this run directory (None: start)."""
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        raise ConfigError(f"resume={resume}: use resume=auto (the run directory's last checkpoint) or ckpt_path=PATH")
    if cfg.get("ckpt_path") or resume != "auto":
        return cfg.get("ckpt_path")
    directory = rundir.checkpoint_dir(cfg)
    found = latest_checkpoint(directory)
    Console().print(f"[bold]resume=auto[/]: {f'continuing from {found}' if found else f'no checkpoint in {directory}, starting'}")
    return str(found) if found else None


def report(trainer: L.Trainer, output_dir: Path, metrics: dict) -> None:
    """Print where the checkpoints, samples and TensorBoard logs are, and how to look at them.

    Plain lines, ``key: value``, never wrapped (soft_wrap), and each command alone on its own line, so that
    a long path can be copied from a terminal or a log file in one piece.
    """
    rows: list[tuple[str, str, bool]] = [("run directory", str(output_dir), False)]  # (label, text, is a command)
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        rows.append(("checkpoints", str(trainer.checkpoint_callback.dirpath), False))
        if last.exists():
            rows.append(("sample it", f"python -m fewstep.sample ckpt={last}", True))
    samples = sorted((run_log_dir(trainer) / "samples").glob("*.png"))
    if samples:
        rows.append(("latest samples", str(samples[-1]), False))
    if any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        rows.append(("TensorBoard", f"tensorboard --logdir {output_dir}", True))
    rows += [(name, f"{value:.4g}", False) for name, value in sorted(metrics.items())]
    console = Console(soft_wrap=True, highlight=False, emoji=False)
    console.print("[bold]fewstep run[/]")
    for label, text, command in rows:
        if command:
            console.print(f"[bold]{escape(label)}[/]:")
            console.print(f"  {escape(text)}")
        else:
            console.print(f"[bold]{escape(label)}[/]: {escape(text)}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # The value a Hydra sweeper optimises (hparams_search=*_optuna): the metric named by optimized_metric, e.g.
    # val/loss or SamplerBenchmark's last benchmark/<metric>/<setting>_nfe<N>.
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        hydra_cfg = HydraConfig.get()
        basic = hydra_cfg.sweeper.get("_target_", "").endswith("BasicSweeper")  # it ignores what jobs return
        if hydra_cfg.mode != RunMode.MULTIRUN or basic or int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))):
            return None  # nothing optimises it (or a rank other than zero, which neither scores nor decides)
        raise ConfigError(
            f"optimized_metric={name} was not logged by this run; available: {', '.join(sorted(metrics)) or 'none'} "
            "(benchmark/* needs callbacks=benchmark)"
        )
    return metrics[name]


def preflight(argv: list[str]) -> None:
    """Before Hydra writes anything into an explicit ``hydra.run.dir=DIR`` (it replaces DIR/.hydra/config.yaml as
    it starts a run), refuse what ``train`` would refuse there: a directory another run holds, or one whose
    checkpoints this run would replace. Anything this cannot tell is left to the checks in ``train`` and ``fit``."""
    if any(arg.startswith("-") for arg in argv) or not rundir.is_rank_zero():  # --multirun, --cfg job, ...
        return
    directories = [arg.split("=", 1)[1].strip("\"'") for arg in argv if arg.startswith("hydra.run.dir=")]
    directory = directories[-1] if directories else None  # the last one counts, as in Hydra
    if not directory or "${" in directory or not Path(directory).is_dir():
        return
    try:
        rundir.check_not_held(directory)
        from hydra import compose, initialize_config_dir

        overrides = [arg for arg in argv if not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
        with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"paths.output_dir={directory}"])
        rundir.check_checkpoints(cfg, stages=distills(cfg))
    except FewstepError as error:
        fail(str(error))
    except Exception:  # a config Hydra will reject in its own words, or one this cannot compose: train decides
        return


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    preflight(sys.argv[1:])
    main()
