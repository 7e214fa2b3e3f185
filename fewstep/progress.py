"""Progress of long work: a rich bar on a terminal, plain lines (flushed) everywhere else.

Training (``fewstep.callbacks.progress.TextProgress``) and the sampling entry points (``fewstep.sample``,
``fewstep.evaluate``, ``fewstep.fid_reference``) write the same plain lines, from the same code::

    step 120/4000 (3%) | train/loss 0.843 | 9.87 it/s | ETA 0:06:33 | elapsed 0:00:12
    sampling 2560/10000 (25%) | 85.3 images/s | ETA 0:01:27 | elapsed 0:00:30

``ProgressLine`` does the arithmetic and the text of one such line; ``Progress`` gives the entry points a task
per phase (sampling, features), shown as a rich bar when stdout is a terminal and otherwise as a line at the
first update, every ``interval`` seconds (0: at every update) and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

MODES = ("auto", "rich", "text")

Clock = Callable[[], float]


def duration(seconds: float) -> str:
    """H:MM:SS (days too when there are any)."""
    return str(timedelta(seconds=round(seconds)))


def count_text(done: int, total: int | None) -> str:
    """"done/total (p%)", or "done" when the total is not known."""
    if total:
        return f"{done}/{total} ({100 * done // total}%)"
    return str(done)


def use_rich(mode: str, stream: TextIO | None = None) -> bool:
    """Whether ``mode`` (auto, rich or text) means a rich bar: auto decides by ``isatty()`` of stdout."""
    if mode not in MODES:
        raise ValueError(f"progress mode '{mode}': choose auto, rich or text")
    if mode != "auto":
        return mode == "rich"
    isatty = getattr(stream if stream is not None else sys.stdout, "isatty", None)
    return bool(isatty is not None and isatty())


class ProgressLine:
    """The rate, time left and text of plain progress lines about a count of work (steps, images).

    The rate is that of the work since the previous line, less the time ``pause``d since (training's
    validations); the time left is the remaining work at the rate since ``start``, pauses included.
    """

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.start()

    def start(self, done: int = 0, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.started = self.last_time = now  # when the work (re)started; when the previous line was written
        self.start_done = self.last_done = done  # how much was done then (a resumed run starts past 0)
        self.paused = 0.0  # seconds spent on other things since the previous line
        self.printed: int | None = None  # the count the previous line reported (None: no line yet)

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` spent on something else out of the next line's rate."""
        self.paused += seconds

    def due(self, interval: float, now: float | None = None) -> bool:
        """Whether a line is due: none written yet, or ``interval`` seconds since the previous one."""
        now = self.clock() if now is None else now
        return self.printed is None or now - self.last_time >= interval

    def line(
        self, label: str, done: int, total: int | None, extra: Sequence[str] = (), unit: str = "it",
        now: float | None = None,
    ) -> str:
        """``label done/total (p%) | extra... | rate unit/s | ETA H:MM:SS | elapsed H:MM:SS``; it counts as written."""
        now = self.clock() if now is None else now
        seconds = now - self.last_time - self.paused
        rate = (done - self.last_done) / seconds if seconds > 0 else float("nan")
        parts = [f"{label} {count_text(done, total)}", *extra, f"{rate:.3g} {unit}/s"]
        elapsed, finished = now - self.started, done - self.start_done
        if total and finished > 0 and elapsed > 0:
            parts.append(f"ETA {duration(max(total - done, 0) * elapsed / finished)}")
        parts.append(f"elapsed {duration(elapsed)}")
        self.last_time, self.last_done, self.paused, self.printed = now, done, 0.0, done
        return " | ".join(parts)


class TextTask:
    """One phase as plain lines: at the first update, then every ``interval`` seconds (0: every update), and
    at the end (``close``) unless the last line already said it."""

    def __init__(
        self, label: str, total: int | None, unit: str, interval: float, write: Callable[[str], None],
        clock: Clock = time.perf_counter,
    ) -> None:
        self.label, self.total, self.unit, self.interval, self.write = label, total, unit, interval, write
        self.done = 0
        self.rate = ProgressLine(clock)

    def update(self, done: int) -> None:
        """``done`` of ``total`` are finished."""
        self.done = min(done, self.total) if self.total else done
        if self.rate.due(self.interval) and self.done != self.rate.printed:
            self.write(self.rate.line(self.label, self.done, self.total, unit=self.unit))

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def close(self) -> None:
        if self.done and self.done != self.rate.printed:
            self.write(self.rate.line(self.label, self.done, self.total, unit=self.unit))

    def __enter__(self) -> TextTask:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:  # a phase that failed says so itself
            self.close()


class RateColumn(ProgressColumn):
    """Rich's speed of a task in ``unit``/s ("?" before there is one)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed:.3g} {self.unit}/s", no_wrap=True)


class RichTask:
    """One phase as a rich progress bar: description, bar, done/total, rate, time left and elapsed."""

    def __init__(self, label: str, total: int | None, unit: str, console: Console | None = None) -> None:
        self.total, self.done = total, 0
        self.bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), RateColumn(unit),
            TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(), console=console, transient=False,
        )
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def update(self, done: int) -> None:
        self.done = done
        self.bar.update(self.task, completed=done)

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def close(self) -> None:
        self.bar.stop()

    def __enter__(self) -> RichTask:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """The progress of an entry point's phases: ``with progress.task("sampling", n, "images") as task: ...
    task.update(done)``. ``interval``: seconds between plain lines (0: every update); ``mode``: auto (a rich bar
    when stdout is a terminal, else plain lines), rich or text. ``enabled`` False shows nothing (a quiet caller)."""

    def __init__(
        self, interval: float = 30.0, mode: str = "auto", stream: TextIO | None = None, clock: Clock = time.perf_counter,
        enabled: bool = True,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.interval, self.clock, self.enabled = float(interval), clock, enabled
        self._stream = stream  # None: sys.stdout as it is when a line is written
        self.rich = use_rich(mode, stream)

    @classmethod
    def from_config(cls, node, **kwargs) -> Progress:
        """From an entry point's ``progress:`` block (interval, mode); defaults where it is absent."""
        node = node or {}
        return cls(interval=node.get("interval", 30.0), mode=node.get("mode", "auto"), **kwargs)

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def write(self, line: str) -> None:
        """A plain line, flushed at once (a log file gets it now, not when a buffer fills)."""
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line about what comes next (both modes)."""
        self.write(text)

    def task(self, label: str, total: int | None, unit: str = "it") -> TextTask | RichTask | NoTask:
        if not self.enabled:
            return NoTask()
        if self.rich:
            return RichTask(label, total, unit, Console(file=self._stream) if self._stream else None)
        return TextTask(label, total, unit, self.interval, self.write, self.clock)

    def track(self, items: Iterable, label: str, total: int | None, unit: str = "it",
              size: Callable[[object], int] = len) -> Iterator:
        """``items`` as they are, the task advanced by ``size(item)`` after each has been used."""
        with self.task(label, total, unit) as task:
            for item in items:
                yield item
                task.advance(size(item))


class NoTask:
    """A task that shows nothing."""

    done = 0

    def update(self, done: int) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoTask:
        return self

    def __exit__(self, *exc) -> None:
        pass
