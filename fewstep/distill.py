"""Distillation runs: find (or train) the teacher, then fit the student, one fit per stage if staged.

Every config with a ``teacher`` group (method=kac_endpoint, gdd, ...) comes here from
``fewstep.train``. The teacher is ``teacher.ckpt``, or the newest finished ``teacher.method`` run
for the same data and model under ``paths.root`` (``fewstep.layout``; the run says which it took), or else one
trained first (under ``trainer=debug`` a debug teacher of as many steps). A student gets it through ``attach_teacher`` and starts from its
network. A staged method (``fewstep.methods.teacher.Staged``: kac_endpoint's stages, progressive's
rounds) writes a complete run directory (checkpoints, TensorBoard, sample grids) per stage under
``<run>/stage<i>_<M>steps/``, and each stage's student teaches the next; at the end ``fewstep.stage_summary``
scores the teacher and every stage (summary.json, stages.png; ``summary=false`` skips it). ``ddil=default`` gives any
EDM-space student DDIL's training states and rollout buffers.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from fewstep import layout, stage_summary
from fewstep.checkpoints import load_method, read_checkpoint
from fewstep.cli import CONF_DIR
from fewstep.data.rollout import SOURCES, RolloutStates, check_weights
from fewstep.errors import CheckpointError, ConfigError
from fewstep.methods.base import DenoiserMethod
from fewstep.methods.student import DistilledStudent
from fewstep.methods.teacher import GuidedTeacher, Staged, check_kind
from fewstep.run_config import read_run_config

console = Console(soft_wrap=True)  # long paths and commands stay on one line, to be copied


def data_name(cfg: DictConfig) -> str:
    """The data config's name as Hydra chose it (mnist5k), for the teacher's run directory."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("data", "data")
    return cfg.data._target_.rpartition(".")[2].lower()


def same_setting(run: DictConfig, cfg: DictConfig) -> bool:
    """Whether a finished run was trained on the same data with the same network and conditioning."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=False)

    return (
        plain(run.data) == plain(cfg.data)
        and plain(run.model) == plain(cfg.model)
        and run.method.get("conditional", False) == cfg.method.get("conditional", False)
        and bool(run.get("debug", False)) == bool(cfg.get("debug", False))  # a debug teacher teaches debug runs only
    )


def finished_checkpoint(run_dir: Path, run: DictConfig) -> Path | None:
    last = layout.last_checkpoint(run_dir)
    if not last.is_file():
        return None
    try:
        return last if read_checkpoint(last)["global_step"] >= run.trainer.max_steps else None
    except Exception:  # an unreadable checkpoint is no teacher
        return None


def find_teacher(cfg: DictConfig, fit: Callable) -> Path:
    """``teacher.ckpt``, else the newest finished teacher run for this data and model, else a new one."""
    teacher = cfg.teacher
    if teacher.ckpt:
        return Path(teacher.ckpt).resolve()
    for run_dir in layout.runs_of(cfg.paths.root, teacher.method):
        try:  # anyone may have written a run under paths.root: its config is data, checked like a named file
            run = read_run_config(layout.saved_config(run_dir))
        except CheckpointError as error:
            raise CheckpointError(f"{error} (found looking for a {teacher.method} teacher: pass teacher.ckpt=PATH, "
                                  "or move that run out of the way)") from None
        if same_setting(run, cfg) and (last := finished_checkpoint(run_dir, run)):
            trained = datetime.fromtimestamp(last.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            console.print(f"[bold]teacher[/]: reusing {last} (trained {trained}; teacher.ckpt=PATH picks another)")
            return last.resolve()
    teacher_cfg = teacher_config(cfg)
    kind = "a debug teacher (trainer=debug: not one to distil from)" if cfg.get("debug") else "one"
    console.print(
        f"[bold]teacher[/]: none found under {cfg.paths.root}/{teacher.method} for this data and model; training {kind} "
        f"first ({teacher_cfg.trainer.max_steps} steps) in {teacher_cfg.paths.output_dir}"
    )
    if not later_rank():  # a DDP rank above 0 trains into rank 0's run, which saved it
        save_config(teacher_cfg)
    fit(teacher_cfg)
    return layout.last_checkpoint(teacher_cfg.paths.output_dir).resolve()


def composed_method(name: str) -> DictConfig:
    """``method=<name>`` as Hydra composes it (its defaults applied), inside a running app or outside one."""
    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=[f"method={name}"]).method
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        return compose("train", overrides=[f"method={name}"]).method


TEACHER_RUN = "FEWSTEP_TEACHER_RUN"  # rank 0's new teacher directory, in the environment its DDP ranks start with


def later_rank() -> bool:
    """Whether this process is a DDP rank above 0 that Lightning started as this command again."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


def new_teacher_dir(root, method: str, data: str) -> Path:
    """A new teacher run's directory. Under DDP Lightning starts the other ranks as this command again once rank 0
    fits the teacher: they take rank 0's directory from their environment rather than stamp one of their own."""
    if later_rank() and os.environ.get(TEACHER_RUN):
        return Path(os.environ[TEACHER_RUN])
    out = layout.run_dir(root, method, data)
    os.environ[TEACHER_RUN] = str(out)
    return out


def teacher_config(cfg: DictConfig) -> DictConfig:
    """This run's config with the teacher method (``method=<teacher.method>``) and its own run directory; under
    trainer=debug as many steps as the debug run takes."""
    teacher = cfg.teacher
    method = composed_method(teacher.method)
    for key in ("conditional", "label_dropout"):  # the student's conditioning, where its config sets it
        if key in cfg.method:
            method[key] = cfg.method[key]
    out = new_teacher_dir(cfg.paths.root, teacher.method, data_name(cfg))
    stages = staged(cfg)
    # the teacher's sample grid: its own sampler (teacher.sampler), at the staged teacher's steps or teacher.nfe
    nfe = stages[0] if stages else teacher.get("nfe", 35)
    if cfg.get("debug") and (cfg.get("callbacks") or {}).get("sample_grid"):
        nfe = int(cfg.callbacks.sample_grid.nfe)  # the debug profile's few evaluations
    sampler = {"name": teacher.get("sampler", "heun")}
    max_steps = int(cfg.trainer.max_steps) if cfg.get("debug") else int(teacher.max_steps)
    return derived(cfg, out, method=method, max_steps=max_steps, nfe=nfe, sampler=sampler)


def derived(
    cfg: DictConfig, out: Path, method: DictConfig, max_steps: int, nfe: int, ema_decay: float | None = None,
    sampler: dict | None = None,
):
    """A copy of ``cfg`` for one fit: its own output directory, method, step count and sample grid, and a
    checkpoint (a teacher or a stage teaches from its ``last.ckpt``, also under trainer=debug)."""
    new = copy.deepcopy(cfg)
    with open_dict(new):
        new.paths.output_dir = str(out)
        new.method = method
        new.trainer.max_steps = max_steps
        new.trainer.val_check_interval = min(int(cfg.trainer.val_check_interval), max_steps)
        new.ckpt_path = None
        if not (new.get("callbacks") or {}).get("model_checkpoint"):
            new.trainer.enable_checkpointing = True
            new.callbacks = new.get("callbacks") or {}
            new.callbacks.model_checkpoint = {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "dirpath": str(layout.checkpoints(out)),
                "save_last": True, "enable_version_counter": False,
            }
        if new.get("callbacks") and new.callbacks.get("sample_grid"):
            new.callbacks.sample_grid.nfe = nfe
            if sampler is not None:
                new.sampler = sampler
                new.callbacks.sample_grid.sampler = sampler
        if ema_decay is not None and new.get("callbacks") and new.callbacks.get("ema"):
            new.callbacks.ema.decay = ema_decay
    return new


def save_config(cfg: DictConfig) -> None:
    """.hydra/config.yaml in the run directory, as Hydra writes it, so evaluate and later runs can read it."""
    path = layout.saved_config(cfg.paths.output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def with_ddil(cfg: DictConfig) -> DictConfig:
    """``ddil=default``: DDIL's block joins the student's options; any EDM-space student (DistilledStudent) takes it."""
    if cfg.get("ddil") is None:
        return cfg
    cls = get_class(cfg.method._target_)
    if not issubclass(cls, DistilledStudent):
        raise ConfigError(
            f"ddil=default works on EDM-space students (progressive, consistency, dmd2, or your own DistilledStudent), "
            f"not {cls.__name__}: use ddil=none"
        )
    # bad weights or buffer settings fail now, before any teacher is trained
    check_weights([cfg.ddil.get(f"b_{source}", 0.0) for source in SOURCES])
    RolloutStates(None, **OmegaConf.to_container(cfg.ddil.get("buffer") or {}, resolve=True))
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.method.ddil = cfg.ddil
    return cfg


def staged(cfg: DictConfig) -> list[int] | None:
    """The step counts of a staged method (fewstep.methods.teacher.Staged), the first teacher's first; else None."""
    cls = get_class(cfg.method._target_)
    if not issubclass(cls, Staged):
        return None
    if not cfg.get("debug"):  # trainer=debug gives every stage its few steps
        cls.stage_lengths(options(cfg))  # a bad steps_per_stage fails now, not after the teacher
    return cls.stage_steps(options(cfg))


def options(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.method, resolve=True)


def with_rollouts(cfg: DictConfig, datamodule):
    """The data, wrapped with DDIL's rollout buffers when the method has a ``ddil`` block."""
    ddil = cfg.method.get("ddil")
    if ddil is None:
        return datamodule
    buffer = OmegaConf.to_container(ddil.get("buffer") or {}, resolve=True)
    rank = int(os.environ.get("RANK", 0))  # each rank its own buffers and draws
    data = datamodule.data if isinstance(datamodule, RolloutStates) else datamodule
    sources = [source for source in SOURCES[1:] if float(ddil.get(f"b_{source}", 0.0)) > 0]  # no rollouts for weight 0
    return RolloutStates(data, **buffer, sources=sources, seed=int(cfg.get("seed") or 0) + rank)


def train_student(cfg: DictConfig, fit: Callable, datamodule) -> dict:
    """Find or train the teacher, then fit the student (or each stage); returns the last fit's metrics."""
    cfg = with_ddil(cfg)
    stages = staged(cfg)
    if stages:
        stage_summary.settings(cfg)  # a bad summary.n fails now, not after the teacher and the stages
    start, trained = time.perf_counter(), []
    teacher_path = find_teacher(cfg, lambda teacher_cfg: trained.append(fit(teacher_cfg)))
    teacher_seconds = time.perf_counter() - start if trained else None  # None: reused, not trained in this run
    teacher = load_method(teacher_path)
    cfg = with_teacher_network(cfg, teacher)
    if stages:
        return train_stages(cfg, fit, datamodule, teacher, teacher_path, stages, teacher_seconds)
    seed_initialisation(cfg)
    student = instantiate(cfg.method, net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes)
    student.attach_teacher(teacher, path=teacher_path)
    start = student.generator_start()  # e.g. SiDA from a SiD run (a resumed run's checkpoint then replaces it)
    if start:
        student.start_generator(load_method(start), start)
    attach_guide(student)
    grid_nfe = getattr(student, "sample_grid_nfe", None)  # e.g. a one-step generator
    if grid_nfe is not None and (cfg.get("callbacks") or {}).get("sample_grid"):
        cfg = copy.deepcopy(cfg)
        cfg.callbacks.sample_grid.nfe = grid_nfe
    return fit(cfg, method=student, datamodule=with_rollouts(cfg, datamodule))


def attach_guide(student) -> None:
    """The teacher's autoguidance model (``method.guide``), read and attached to a student of a guided teacher."""
    path = student.hparams.get("guide")
    if path and isinstance(student, GuidedTeacher):
        try:
            guide = load_method(path)
        except CheckpointError as error:
            raise CheckpointError(f"method.guide={path}: {error}") from None
        student.attach_guide(guide, path)


def seed_initialisation(cfg: DictConfig) -> None:
    """Seed the student's initial weights (a GAN head, a fake score's): the same whether or not this process
    trained the teacher first, so that a resumed run (which finds the teacher) starts as the first run did."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)


def with_teacher_network(cfg: DictConfig, teacher) -> DictConfig:
    """``cfg`` with the teacher's network (and, for EDM-space students, its sigma_data): students start from it,
    whatever its architecture (a fewstep model, EDM's SongUNet or ADM, a diffusers UNet)."""
    net = OmegaConf.to_container(OmegaConf.create(teacher.hparams.net), resolve=True)
    if OmegaConf.to_container(cfg.model, resolve=True) != net:
        console.print(f"[bold]student network[/]: the teacher's ({net.get('_target_')}), in place of this run's model")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model = net
        if isinstance(teacher, DenoiserMethod) and "sigma_data" in teacher.hparams:
            cfg.method.sigma_data = float(teacher.hparams.sigma_data)
    return cfg


def train_stages(
    cfg: DictConfig, fit: Callable, datamodule, teacher, teacher_path: Path, stages: list[int],
    teacher_seconds: float | None = None,
) -> dict:
    """Each student stage in turn, the first taught by ``teacher`` (trained in ``teacher_seconds`` in this run, None:
    reused); then the end-of-run summary (``fewstep.stage_summary``). Returns the last stage's metrics."""
    cls, method = get_class(cfg.method._target_), options(cfg)
    check_kind(teacher, cls, teacher_path)  # before its settings are read for the first stage
    lengths = [int(cfg.trainer.max_steps)] * (len(stages) - 1) if cfg.get("debug") else cls.stage_lengths(method)
    losses, metrics = {}, {}  # each stage's val/loss, by name
    # the teacher with its own sampler (as its sample grid), each student with the run's
    student_sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    models = [stage_summary.Model("teacher", stages[0], {"name": cfg.teacher.get("sampler", "heun")}, teacher_path, teacher_seconds)]
    for i, (teacher_steps, steps) in enumerate(zip(stages, stages[1:]), start=1):
        out = layout.stage_dir(cfg.paths.output_dir, i, steps)
        first_sampler = cfg.teacher.get("sampler") if i == 1 else None
        arguments = cls.stage_options(method, teacher, teacher_path, teacher_steps, steps, first_sampler)
        stage_method = OmegaConf.create({"_target_": method["_target_"], "_recursive_": False, **arguments})
        stage_cfg = derived(cfg, out, stage_method, lengths[i - 1], steps, method.get("ema_decay"))
        seed_initialisation(cfg)
        student = cls(net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes, **arguments)
        student.attach_teacher(teacher, path=teacher_path)
        attach_guide(student)
        console.print(f"[bold]stage {i}[/]: {steps}-step student of the {teacher_steps}-step teacher -> {out}")
        save_config(stage_cfg)
        start = time.perf_counter()
        metrics = fit(stage_cfg, method=student, datamodule=with_rollouts(stage_cfg, datamodule))
        teacher_path = layout.last_checkpoint(out)
        teacher = load_method(teacher_path)
        losses[f"stage {i}"] = f"{metrics.get('val/loss', float('nan')):.4g}"
        models.append(stage_summary.Model(f"stage {i}", steps, student_sampler, teacher_path, time.perf_counter() - start))
    console.print(f"[bold]{type(teacher).__name__} stages[/] (steps, val/loss, checkpoint):")
    for model in models:  # plain lines: the paths stay whole, to be copied
        console.print(f"  {model.name}: {model.steps} steps, val/loss {losses.get(model.name, '-')}: {model.ckpt}")
    stage_summary.summarise(cfg, models, list(datamodule.shape), datamodule.num_classes)
    return metrics
