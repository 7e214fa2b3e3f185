"""Where a run's files live: the one module that knows the output layout (``fewstep.rundir`` guards the writing).

    <paths.root>/<method>/<data>/<YYYY-MM-DD_HH-MM-SS>/    a training run (conf/train.yaml's hydra.run.dir)
        .hydra/config.yaml                                 its saved config (read as data by fewstep.run_config)
        checkpoints/last.ckpt, checkpoints/step_*.ckpt     its checkpoints
        stage<i>_<M>steps/                                 stage i of a staged distillation (an M-step student), laid
                                                           out as a run of its own

A distillation run without ``teacher.ckpt`` looks for a teacher among the runs of its teacher method
(``runs_of(root, method)``, newest first) and trains a missing one into ``run_dir(root, method, data)``.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

SAVED_CONFIG = Path(".hydra") / "config.yaml"
STAMP = "%Y-%m-%d_%H-%M-%S"
STAGE = re.compile(r"^stage(\d+)_(\d+)steps$")


def run_dir(root: str | Path, method: str, data: str, when: datetime | None = None) -> Path:
    """A new run's directory, as Hydra names it for ``python -m fewstep.train``."""
    return Path(root) / method / data / (when or datetime.now()).strftime(STAMP)


def saved_config(run: str | Path) -> Path:
    return Path(run) / SAVED_CONFIG


def checkpoints(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def last_checkpoint(run: str | Path) -> Path:
    return checkpoints(run) / "last.ckpt"


def kept_checkpoints(run: str | Path) -> dict[int, Path]:
    """The checkpoints a run kept by training step (``step_NNNNNNN.ckpt``, one per validation)."""
    return {int(path.stem.split("_")[1]): path for path in sorted(checkpoints(run).glob("step_*.ckpt"))}


def stage_dir(run: str | Path, index: int, steps: int) -> Path:
    return Path(run) / f"stage{index}_{steps}steps"


def stages(run: str | Path) -> dict[int, Path]:
    """A staged run's stage directories by student steps, in stage order."""
    found = sorted((int(m[1]), int(m[2]), path) for path in Path(run).iterdir() if path.is_dir() and (m := STAGE.match(path.name)))
    return {steps: path for _, steps, path in found}


def run_of_checkpoint(ckpt: str | Path) -> Path | None:
    """The run a checkpoint belongs to: the nearest directory above it with a saved config (a stage's own first)."""
    return next((d for d in Path(ckpt).resolve().parents if saved_config(d).is_file()), None)


def runs_of(root: str | Path, method: str) -> list[Path]:
    """The runs of ``method`` under ``root`` that saved their config, newest first."""
    configs = Path(root).glob(f"{method}/*/*/{SAVED_CONFIG.as_posix()}")
    return [config.parent.parent for config in sorted(configs, reverse=True)]
