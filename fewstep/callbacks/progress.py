"""Progress where there is no terminal: one plain line every few seconds instead of a rich bar.

Under Docker, nohup or a job scheduler stdout is a file or a pipe, where a rich progress bar writes
nothing useful until the run ends. ``auto_progress_bar`` (what ``conf/callbacks/default.yaml``
instantiates) keeps Lightning's ``RichProgressBar`` on a terminal and returns a ``TextProgress``
otherwise, which prints, flushed at once, lines such as::

    step 1/4000 (0%) | train/loss 1.912 | 2.41 it/s | ETA 0:27:40 | elapsed 0:00:00
    step 120/4000 (3%) | train/loss 0.843 | 9.87 it/s | ETA 0:06:33 | elapsed 0:00:12
    validating at step 1000/4000 ...
    validation at step 1000/4000 | val/loss 0.512 | 14.2 s

at the first step, then every ``interval`` seconds, at every validation and at the end of training.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

from fewstep.progress import ProgressLine, count_text, duration, use_rich

__all__ = ["TextProgress", "auto_progress_bar", "duration"]


class TextProgress(ProgressBar):
    """Lightning's progress bar as plain lines: step / max steps, the ``prog_bar`` metrics (train/loss),
    steps per second and the time left, every ``interval`` seconds (0: every step). Rank zero prints.

    The rate is that of the training steps since the previous line (validation time left out); the time
    left is the remaining steps at the rate of the whole run so far, validations and checkpoints included
    (``fewstep.progress.ProgressLine``, which the sampling entry points' lines share).
    """

    def __init__(self, interval: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.interval = float(interval)
        self._stream = stream  # None: sys.stdout as it is when a line is written
        self._enabled = True
        # the steps of this fit (a resumed run starts past 0), the previous line, the validation time since it
        self._line = ProgressLine(time.perf_counter)
        self._validation_start = 0.0

    # ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("file", self._stream or sys.stdout)
        kwargs.setdefault("flush", True)  # a line reaches a log file at once, not when a buffer fills
        print(*args, **kwargs)

    # what a line says
    @property
    def total_steps(self) -> int | None:
        """The global step at which training stops (None: not known)."""
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and batches != float("inf"):
            return int(trainer.max_epochs * batches)
        return None

    def _step_text(self, step: int) -> str:
        return count_text(step, self.total_steps)

    def _metrics_text(self, validation: bool) -> list[str]:
        parts = []
        for name, value in self.trainer.progress_bar_metrics.items():
            if name.startswith("val") != validation:
                continue
            parts.append(f"{name} {value:.4g}" if isinstance(value, (int, float)) else f"{name} {value}")
        return parts

    def _write(self, line: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            self.print(line)

    def _train_line(self, now: float) -> None:
        step = self.trainer.global_step
        self._write(self._line.line("step", step, self.total_steps, self._metrics_text(validation=False), "it", now))

    # Lightning's hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line.start(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._line.due(self.interval, now) and trainer.global_step != self._line.printed:
            self._train_line(now)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._line.printed:
            self._train_line(time.perf_counter())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()
        if not trainer.sanity_checking:
            self._write(f"validating at step {self._step_text(trainer.global_step)} ...")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._validation_start
        self._line.pause(seconds)
        if not trainer.sanity_checking:
            parts = [f"validation at step {self._step_text(trainer.global_step)}", *self._metrics_text(validation=True)]
            self._write(" | ".join([*parts, f"{seconds:.1f} s"]))


def auto_progress_bar(interval: float = 30.0, mode: str = "auto", **rich_options: Any) -> ProgressBar:
    """The trainer's progress bar: ``RichProgressBar`` when stdout is a terminal, else ``TextProgress``.

    ``mode``: auto (decide by ``sys.stdout.isatty()``), rich or text. ``interval``: seconds between the
    text lines. ``rich_options`` go to ``RichProgressBar`` (refresh_rate, leave, theme, ...).
    """
    return RichProgressBar(**rich_options) if use_rich(mode) else TextProgress(interval=interval)
