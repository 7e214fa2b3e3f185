"""User-facing errors: one line that names the fix, printed without a traceback."""

from __future__ import annotations


class FewstepError(Exception):
    """An error caused by the user's input or environment, not by a bug in fewstep.

    The entry points catch it and print its message as one line, then exit with status 2.
    """


class ConfigError(FewstepError):
    """A config value is invalid (unknown name, out of range)."""


class DatasetNotFound(FewstepError):
    """A dataset's files are absent; the message says how to get them."""


class CheckpointError(FewstepError):
    """A checkpoint is missing, unreadable, or does not fit the current config."""


class TrainingDiverged(FewstepError):
    """A loss became NaN or infinite; the run stops without saving the diverged state."""


def one_line(message: str) -> str:
    """Collapse a message to a single line."""
    return " ".join(str(message).split())
