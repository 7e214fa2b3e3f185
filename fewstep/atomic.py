"""Files written whole or not at all: into a temporary file beside the target, then renamed onto it (a rename within
one directory is atomic on POSIX file systems, unlike a move from /tmp onto a mounted volume)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write_to: Callable[[BinaryIO], object], sync: bool = False) -> Path:
    """``write_to(file)`` into ``.<name>.<pid>.tmp`` beside ``path``, then renamed to ``path``; on any failure the
    temporary file is removed and the error raised, and ``path`` keeps what it held. ``sync``: fsync before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write_to(file)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
    return path


__all__ = ["atomic_write"]
