"""What the Hydra entry points share: config-group validation before Hydra starts, and
user errors printed as one line without a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from hydra.errors import InstantiationException

from fewstep.errors import FewstepError, one_line

CONF_DIR = Path(__file__).parent / "conf"
OUTPUT_DIRS = ("hydra.run.dir", "hydra.sweep.dir", "paths.output_dir", "paths.root")  # where a run writes


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def fail(message: str) -> None:
    print(f"fewstep: error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def line_buffered_output() -> None:
    """Make stdout and stderr line-buffered, so each line reaches a log file at once.

    Under nohup, Docker or a job scheduler stdout is a file, which Python buffers in blocks of kilobytes:
    the line announcing a long job would sit in the buffer, and a killed run would leave nothing.
    Every entry point calls this first (through ``check_overrides`` and ``user_errors``).
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent on a replaced stream (pytest's capture, None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except (ValueError, OSError):  # a closed or detached stream: leave it as it is
                pass


def check_overrides(argv: list[str]) -> None:
    """Refuse unknown config-group choices (``method=nope``) with the list of valid ones.

    Hydra would report them too, but over many lines; this says it in one.
    """
    line_buffered_output()
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in OUTPUT_DIRS and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            fail(f"{key}={value} is a file, not a directory: name a directory for the run's outputs")
        if (key == "method" and "ddil" in value.split(",")) or key == "ddil.base":
            base = value if key == "ddil.base" else "consistency"
            fail(f"DDIL is now a switch on any student: python -m fewstep.train method={base} ddil=default "
                 "(its options: ddil.*; the student's: method.*)")
        if key not in groups or value in ("", "null"):
            continue
        choices = group_choices(key)
        listed = value.startswith("[") and value.endswith("]")  # callbacks=[benchmark,phema]: several of the group
        for choice in (value[1:-1] if listed else value).split(","):
            if choice not in choices:
                fail(f"unknown {key} '{choice}': choose one of {', '.join(choices)}")


def user_errors(task):
    """Decorator for a Hydra task function: a FewstepError becomes one line on stderr and exit status 2."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        line_buffered_output()
        try:
            return task(*args, **kwargs)
        except FewstepError as error:
            fail(str(error))
        except InstantiationException as error:  # hydra's instantiate wraps what a constructor raised
            cause = error.__cause__
            while cause is not None and not isinstance(cause, FewstepError):
                cause = cause.__cause__
            if cause is None:
                raise
            fail(str(cause))

    return wrapper
