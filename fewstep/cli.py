"""What the Hydra entry points share: config-group validation before Hydra starts, and
user errors printed as one line without a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from hydra.errors import InstantiationException

from fewstep.errors import FewstepError, one_line

CONF_DIR = Path(__file__).parent / "conf"


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def fail(message: str) -> None:
    print(f"fewstep: error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Refuse unknown config-group choices (``method=nope``) with the list of valid ones.

    Hydra would report them too, but over many lines; this says it in one.
    """
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or value in ("", "null"):
            continue
        choices = group_choices(key)
        for choice in value.split(","):
            if choice not in choices:
                fail(f"unknown {key} '{choice}': choose one of {', '.join(choices)}")


def user_errors(task):
    """Decorator for a Hydra task function: a FewstepError becomes one line on stderr and exit status 2."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
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
