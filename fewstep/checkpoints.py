"""Reading fewstep checkpoints with clear errors, and rebuilding a method from one file."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from fewstep.errors import CheckpointError


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a Lightning checkpoint written by fewstep, or raise a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' not found: pass the path of a .ckpt written by fewstep.train "
            "(they are under outputs/<method>/<data>/<run>/checkpoints/)"
        )
    try:
        # mmap: tensors are read when used, so checking a checkpoint (resume=auto, check_compatible) costs no full read
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # truncated, corrupted, or not a torch file
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({type(error).__name__}): the file is truncated or corrupted; "
            "use another checkpoint of the run (e.g. an earlier step)"
        ) from None
    if not isinstance(checkpoint, dict) or "fewstep" not in checkpoint:
        raise CheckpointError(f"'{path}' is not a fewstep checkpoint: pass one written by fewstep.train")
    return checkpoint


def method_class(checkpoint: dict) -> type:
    module, _, name = checkpoint["fewstep"]["method_class"].rpartition(".")
    return getattr(importlib.import_module(module), name)


ARCHITECTURE = ("net", "data_shape", "num_classes", "conditional")  # what a network's weights depend on


def first_difference(ours, theirs, keys) -> str | None:
    """The first of ``keys`` whose value differs between two hyperparameter mappings, or None."""
    return next((key for key in keys if ours.get(key) != theirs.get(key)), None)


def describe_mismatch(checkpoint: dict, method) -> str | None:
    """Why ``checkpoint`` cannot be loaded into ``method``, or None if it fits."""
    stored_class = checkpoint["fewstep"]["method_class"]
    if not isinstance(method, method_class(checkpoint)):
        return f"it holds a {stored_class.rpartition('.')[2]}, this run builds a {type(method).__name__}"
    stored, current = checkpoint["hyper_parameters"], method.hparams
    key = first_difference(stored, current, ARCHITECTURE)
    if key:
        return f"its {key} is {stored.get(key)}, this run's is {current.get(key)}"
    ours = method.state_dict()
    for name, value in checkpoint["state_dict"].items():
        if name not in ours or ours[name].shape != value.shape:
            return f"its tensor '{name}' does not fit this run's network"
    return None


def check_compatible(checkpoint: dict, method, path: str | Path) -> None:
    """Raise a one-line CheckpointError naming the first difference between checkpoint and method."""
    reason = describe_mismatch(checkpoint, method)
    if reason:
        raise CheckpointError(
            f"checkpoint '{path}' does not match this run: {reason}; use the checkpoint's model/data/method "
            "settings (see .hydra/config.yaml in its run directory) or another checkpoint"
        )


def load_method(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the method stored in ``path`` (with its EMA weights, which Lightning saves as state_dict)."""
    checkpoint = read_checkpoint(path)
    cls = method_class(checkpoint)
    method = cls(**checkpoint["hyper_parameters"])
    method.load_state_dict(checkpoint["state_dict"])
    return method.to(map_location).eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, fsyncs it, then renames it into place.

    A crash or a full disk mid-write leaves the previous checkpoints (and ``last.ckpt``) as they were,
    never a half-written file under a checkpoint's name (a rename within one directory is atomic on
    POSIX file systems, unlike a move from /tmp onto a mounted volume). A failed write says so in one line.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            previous = latest_checkpoint(path.parent)
            kept = f"the previous checkpoint {previous.resolve()} is intact" if previous else "no earlier checkpoint was written"
            raise CheckpointError(
                f"could not write checkpoint '{path}' ({error.strerror or error}); {kept}: free space (or fix the "
                "directory) and continue with resume=auto"
            ) from None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint a run continues from: ``last.ckpt`` if readable, else the readable ``*.ckpt`` of the highest step."""
    directory = Path(directory)
    steps = [path for path in directory.glob("*.ckpt") if path.name != "last.ckpt"]
    for path in [directory / "last.ckpt", *sorted(steps, key=lambda p: p.stat().st_mtime, reverse=True)]:
        try:  # a missing last.ckpt is skipped like an unreadable one
            read_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None
