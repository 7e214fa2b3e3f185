"""Distillation runs: find (or train) the teacher, then fit the student, one fit per stage if staged.

Every config with a ``teacher`` group (method=kac_endpoint, gdd, ...) comes here from
``fewstep.train``. The teacher is ``teacher.ckpt``, or the newest finished ``teacher.method`` run
for the same data and model under ``paths.root``, or else one trained first. A student gets it
through ``attach_teacher``. A staged method (``method.stages``: kac_endpoint) writes a complete
run directory (checkpoints, TensorBoard, sample grids) per stage under ``<run>/stage<i>_<M>steps/``,
and each stage's student teaches the next.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from fewstep.checkpoints import load_method, read_checkpoint
from fewstep.cli import CONF_DIR
from fewstep.errors import ConfigError
from fewstep.data.rollout import SOURCES, RolloutStates, check_weights
from fewstep.methods.base import DenoiserMethod
from fewstep.methods.kac_endpoint import KacEndpoint, check_stages, require_kac
from fewstep.methods.kac_teacher import KAC_HPARAMS
from fewstep.methods.progressive import Progressive, halving_stages

DDIL_BASES = ("progressive", "consistency", "dmd2")
PIPELINE_KEYS = ("stages", "start_steps", "end_steps", "steps_per_stage", "steps_per_round", "ema_decay")

console = Console()


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
    )


def finished_checkpoint(run_dir: Path, run: DictConfig) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
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
    runs = sorted(Path(cfg.paths.root).glob(f"{teacher.method}/*/*/.hydra/config.yaml"), reverse=True)
    for config_path in runs:
        run = OmegaConf.load(config_path)
        run_dir = config_path.parent.parent
        if same_setting(run, cfg) and (last := finished_checkpoint(run_dir, run)):
            last = last.resolve()
            console.print(f"[bold]teacher[/]: reusing {last} (a {teacher.method} run for this data and model)")
            return last
    teacher_cfg = teacher_config(cfg)
    console.print(
        f"[bold]teacher[/]: none found under {cfg.paths.root}/{teacher.method} for this data and model; training one "
        f"first ({teacher.max_steps} steps) in {teacher_cfg.paths.output_dir}"
    )
    save_config(teacher_cfg)
    fit(teacher_cfg)
    return (Path(teacher_cfg.paths.output_dir) / "checkpoints" / "last.ckpt").resolve()


def teacher_config(cfg: DictConfig) -> DictConfig:
    """This run's config with the teacher method (conf/method/<teacher.method>.yaml) and its own run directory."""
    teacher = cfg.teacher
    method = OmegaConf.load(CONF_DIR / "method" / f"{teacher.method}.yaml")
    method.pop("defaults", None)
    for key in ("conditional", "label_dropout"):
        method[key] = cfg.method[key]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(cfg.paths.root) / teacher.method / data_name(cfg) / stamp
    stages = cfg.method.get("stages")
    # the teacher's sample grid: its own sampler (teacher.sampler), at the staged teacher's steps or teacher.nfe
    nfe = stages[0] if stages else teacher.get("nfe", 35)
    sampler = {"name": teacher.get("sampler", "heun")}
    return derived(cfg, out, method=method, max_steps=teacher.max_steps, nfe=nfe, sampler=sampler)


def derived(
    cfg: DictConfig, out: Path, method: DictConfig, max_steps: int, nfe: int, ema_decay: float | None = None,
    sampler: dict | None = None,
):
    """A copy of ``cfg`` for one fit: its own output directory, method, step count and sample grid."""
    new = copy.deepcopy(cfg)
    with open_dict(new):
        new.paths.output_dir = str(out)
        new.method = method
        new.trainer.max_steps = max_steps
        new.trainer.val_check_interval = min(int(cfg.trainer.val_check_interval), max_steps)
        new.ckpt_path = None
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
    path = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def resolve_ddil(cfg: DictConfig) -> DictConfig:
    """method=ddil: the base method's options (``method.<ddil.base>``) with the ``ddil`` block, as one method."""
    if cfg.get("ddil") is None:
        return cfg
    base = cfg.ddil.get("base")
    if base not in DDIL_BASES or base not in cfg.method:
        raise ConfigError(f"unknown DDIL base method '{base}': set ddil.base to one of {', '.join(DDIL_BASES)}")
    # bad weights or buffer settings fail now, before any teacher is trained
    check_weights([cfg.ddil.get(f"b_{source}", 0.0) for source in SOURCES])
    RolloutStates(None, **OmegaConf.to_container(cfg.ddil.get("buffer") or {}, resolve=True))
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        method = cfg.method[base]
        method.ddil = cfg.ddil
        cfg.method = method
        sampler = {"name": get_class(method._target_).student_sampler}  # the solver the student's grid is made for
        cfg.sampler = sampler
        if cfg.get("callbacks") and cfg.callbacks.get("sample_grid"):
            cfg.callbacks.sample_grid.sampler = sampler
    return cfg


def staged(cfg: DictConfig) -> list[int] | None:
    """The step counts of a staged method, teacher first (kac_endpoint's stages, progressive's halving rounds)."""
    method = cfg.method
    if method.get("stages"):
        stages = [int(s) for s in method.stages]
        check_stages(stages)
        return stages
    if method.get("start_steps") is not None:
        return halving_stages(method.start_steps, method.end_steps)
    return None


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
    cfg = resolve_ddil(cfg)
    stages = staged(cfg)
    if stages and not (cfg.get("callbacks") or {}).get("model_checkpoint"):
        raise ConfigError(
            "a staged run keeps every stage's checkpoint: enable callbacks.model_checkpoint "
            "(trainer=debug removes it; use trainer=cpu or add it back)"
        )
    teacher_path = find_teacher(cfg, fit)
    teacher = load_method(teacher_path)
    cfg = with_teacher_network(cfg, teacher)
    if stages:
        return train_stages(cfg, fit, datamodule, teacher, teacher_path, stages)
    student = instantiate(cfg.method, net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes)
    student.attach_teacher(teacher, path=teacher_path)
    grid_nfe = getattr(student, "sample_grid_nfe", None)  # e.g. a one-step generator
    if grid_nfe is not None and (cfg.get("callbacks") or {}).get("sample_grid"):
        cfg = copy.deepcopy(cfg)
        cfg.callbacks.sample_grid.nfe = grid_nfe
    return fit(cfg, method=student, datamodule=with_rollouts(cfg, datamodule))


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


def train_stages(cfg: DictConfig, fit: Callable, datamodule, teacher, teacher_path: Path, stages: list[int]) -> dict:
    """Each student stage in turn, the first taught by ``teacher``; returns the last stage's metrics."""
    method = cfg.method
    progressive = get_class(method._target_) is Progressive
    if not progressive:
        require_kac(teacher, teacher_path)
    steps_per_stage = method.steps_per_round if progressive else method.steps_per_stage
    rows, metrics = [("teacher", stages[0], str(teacher_path), "")], {}
    for i, (teacher_steps, steps) in enumerate(zip(stages, stages[1:]), start=1):
        out = Path(cfg.paths.output_dir) / f"stage{i}_{steps}steps"
        if progressive:
            stage_method = progressive_config(cfg, teacher_path, steps)
        else:
            stage_method = student_config(cfg, teacher, teacher_path, teacher_steps, steps, first=i == 1)
        stage_cfg = derived(cfg, out, stage_method, steps_per_stage, steps, method.get("ema_decay"))
        arguments = {k: v for k, v in OmegaConf.to_container(stage_method, resolve=True).items() if k not in ("_target_", "_recursive_")}
        cls = Progressive if progressive else KacEndpoint
        student = cls(net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes, **arguments)
        student.attach_teacher(teacher, path=teacher_path)
        console.print(f"[bold]stage {i}[/]: {steps}-step student of the {teacher_steps}-step teacher -> {out}")
        save_config(stage_cfg)
        metrics = fit(stage_cfg, method=student, datamodule=with_rollouts(stage_cfg, datamodule))
        teacher_path = out / "checkpoints" / "last.ckpt"
        teacher = load_method(teacher_path)
        rows.append((f"stage {i}", steps, str(teacher_path), f"{metrics.get('val/loss', float('nan')):.4g}"))
    table = Table(title=f"{type(teacher).__name__} stages")
    for column in ("", "steps", "checkpoint", "val/loss"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row[0], str(row[1]), row[2], row[3])
    console.print(table)
    return metrics


def progressive_config(cfg: DictConfig, teacher_path: Path, steps: int) -> DictConfig:
    """The Progressive arguments of one round: the method's options, this round's steps, the teacher's path."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    for key in PIPELINE_KEYS:
        method.pop(key, None)
    return OmegaConf.create({**method, "student_steps": steps, "teacher_ckpt": str(teacher_path)})


def student_config(cfg, teacher, teacher_path: Path, teacher_steps: int, steps: int, first: bool) -> DictConfig:
    """The KacEndpoint arguments of one stage: the teacher's process, this stage's steps, the shared options."""
    method = cfg.method
    return OmegaConf.create({
        "_target_": "fewstep.methods.KacEndpoint",
        **{key: teacher.hparams[key] for key in KAC_HPARAMS},
        "t_min": float(teacher.hparams.get("t_min", 1e-3)),
        "conditional": method.conditional,
        "label_dropout": method.label_dropout,
        "optimizer": OmegaConf.to_container(method.optimizer),
        "scheduler": OmegaConf.to_container(method.scheduler) if method.scheduler else None,
        "student_steps": steps,
        "teacher_steps": teacher_steps,
        # the first teacher is a Kac-flow model integrated with any solver; later ones are students, made for Euler
        "teacher_sampler": cfg.teacher.sampler if first else "kac_euler",
        "teacher_ckpt": str(teacher_path),
    })
