"""Reading fewstep checkpoints with clear errors, and rebuilding a method from one file."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

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
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
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
