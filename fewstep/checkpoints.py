"""Reading fewstep checkpoints with clear errors, and rebuilding a method from one file."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from fewstep.errors import CheckpointError, ConfigError


def read_checkpoint(path: str | Path, mmap: bool = True) -> dict:
    """A checkpoint written by fewstep, read without running code from the file, or a one-line CheckpointError.

    ``torch.load(weights_only=True)``: the pickle inside may name only tensors, storages and plain containers
    (fewstep writes nothing else), so a file that would call anything else when unpickled is refused before
    that call is made.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' not found: pass the path of a .ckpt written by fewstep.train "
            "(they are under outputs/<method>/<data>/<run>/checkpoints/)"
        )
    try:
        # mmap: tensors are read when used, so checking a checkpoint (resume=auto, check_compatible) costs no full read
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:  # weights_only refused a global: the file wants to run something
        raise UnsafeCheckpoint(
            f"refusing checkpoint '{path}': it names {refused_global(path, error)}, which a fewstep checkpoint never holds, "
            "and fewstep runs no code from files (an older fewstep checkpoint you trust: python -m "
            "fewstep.checkpoints upgrade PATH)"
        ) from None
    except Exception as error:  # truncated, corrupted, or not a torch file
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({type(error).__name__}): the file is truncated or corrupted; "
            "use another checkpoint of the run (e.g. an earlier step)"
        ) from None
    if not isinstance(checkpoint, dict) or "fewstep" not in checkpoint:
        raise CheckpointError(f"'{path}' is not a fewstep checkpoint: pass one written by fewstep.train")
    return checkpoint


class UnsafeCheckpoint(CheckpointError):
    """A file whose pickle names something other than tensors and plain containers: refused, never skipped."""


def refused_global(path: Path, error: Exception) -> str:
    """The globals outside torch's weights-only allow-list that the file names (read from its pickle, not run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # fall back on the first one torch's message names
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        names = [found.group(1)] if found else []
    if not names:
        return "a global that is not a tensor or a plain container"
    return "the global" + ("s " if len(names) > 1 else " ") + ", ".join(f"'{name}'" for name in names[:3])


def method_class(checkpoint: dict) -> type:
    """The method class a checkpoint names: one of METHODS, a GenerativeMethod in a module of fewstep.methods, or
    one in a module the program has already imported; anything else is refused (the name comes from the file, so
    nothing outside fewstep.methods is imported for it)."""
    from fewstep.methods import METHODS, GenerativeMethod

    name = str(checkpoint["fewstep"].get("method_class", ""))
    module, _, attribute = name.rpartition(".")
    known = {f"{cls.__module__}.{cls.__qualname__}": cls for cls, _ in METHODS.values()}
    cls = None
    if name in known:
        cls = known[name]
    elif module.startswith("fewstep.methods.") and attribute.isidentifier():  # a method added beside fewstep's own
        cls = getattr(importlib.import_module(module), attribute, None)
    elif module in sys.modules:  # a method of the user's own, already imported: a file never makes us import one
        cls = getattr(sys.modules[module], attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeMethod)):
        raise CheckpointError(f"the checkpoint names the method class '{name}', which is not a fewstep method")
    check_targets(checkpoint.get("hyper_parameters", {}))
    return cls


# What a checkpoint's hyperparameters may name as `_target_` (the method builds its network from them, and
# hydra's instantiate would call anything): fewstep's networks and torch's optimisers and schedulers.
ALLOWED_TARGETS = ("fewstep.networks.", "fewstep.external.", "torch.optim.")


def check_targets(tree, where: str = "hyper_parameters") -> None:
    """Refuse, in one line, a `_target_` anywhere in ``tree`` that is not one of ALLOWED_TARGETS."""
    if isinstance(tree, dict):
        target = tree.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(ALLOWED_TARGETS)):
            raise CheckpointError(
                f"the checkpoint's {where} name _target_ '{target}', which fewstep does not build from a file "
                f"(only {', '.join(p + '*' for p in ALLOWED_TARGETS)})"
            )
        for key, value in tree.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            check_targets(value, where)


def plain_tree(value):
    """``value`` with every OmegaConf node turned into plain dicts and lists (what a weights-only load accepts)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {key: plain_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_tree(item) for item in value)
    return value


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


WEIGHTS = ("ema", "raw")


def load_method(path: str | Path, map_location: str | torch.device = "cpu", weights: str = "ema"):
    """The model stored at ``path``, whose ``denoiser(x, sigma, class_labels=None)`` is the file's D.

    A fewstep checkpoint rebuilds its method: with ``weights`` ema, the EMA weights (which Lightning saves as
    state_dict); with raw, the trained weights themselves (its ``current_model_state``; a run without EMA has only
    those). An EDM network pickle (``.pkl``, or its ``.pt``/``.pth`` state-dict file) or a diffusers folder becomes
    an EDMTeacher around fewstep's implementation of that network, so that it samples, evaluates and teaches like a
    fewstep run.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights}: choose ema (the EMA average, the default) or raw (the trained weights)")
    path = Path(path)
    if path.is_dir() or path.suffix in EDM_SUFFIXES:
        return load_external(path).to(map_location).eval()
    checkpoint = read_checkpoint(path)
    cls = method_class(checkpoint)
    method = cls(**checkpoint["hyper_parameters"])
    ema = checkpoint["state_dict"]
    method.load_state_dict(checkpoint.get("current_model_state", ema) if weights == "raw" else ema)
    return method.to(map_location).eval()


EDM_SUFFIXES = (".pkl", ".pt", ".pth")  # EDM network pickles and their state-dict files; a folder is diffusers'


def load_external(path: Path):
    """An EDMTeacher whose network is the EDM pickle's or the diffusers folder's at ``path``, with its weights."""
    from fewstep.methods.edm_teacher import EDMTeacher

    if path.is_dir():
        from fewstep.external.diffusers import load_diffusers

        net = load_diffusers(path)
        config = {"_target_": "fewstep.external.diffusers.DiffusersDenoiser", "unet_config": plain_json(net.unet_config),
                  "scheduler_config": plain_json(net.scheduler_config)}
        size = net.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        data_shape, num_classes = [net.unet.config.in_channels, height, width], net.num_class_embeds or 0
    elif path.is_file():
        from fewstep.external.edm_pickle import edm_network_config, load_edm_network

        net = load_edm_network(path)
        config, data_shape, num_classes = edm_network_config(net)
    else:
        raise CheckpointError(
            f"'{path}' not found: pass a fewstep .ckpt, an EDM network pickle (.pkl), or a diffusers model folder"
        )
    # the method builds a network from the config (checking that it fits), which the file's network then replaces
    method = EDMTeacher(net=config, data_shape=data_shape, num_classes=num_classes, conditional=num_classes > 0,
                        sigma_data=float(net.sigma_data))
    method.net = net
    return method


def plain_json(config) -> dict:
    """A model's config as plain JSON-like values (diffusers' FrozenDict and tuples become dicts and lists)."""
    import json

    return json.loads(json.dumps(dict(config), default=list))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Reads checkpoints with ``read_checkpoint`` (weights only: no code from the file runs, whatever Lightning's
    own default), and writes each checkpoint to a temporary file beside its target, fsyncs it, then renames it into place.

    A crash or a full disk mid-write leaves the previous checkpoints (and ``last.ckpt``) as they were,
    never a half-written file under a checkpoint's name (a rename within one directory is atomic on
    POSIX file systems, unlike a move from /tmp onto a mounted volume). A failed write says so in one line.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        checkpoint = read_checkpoint(path, mmap=False)  # a resumed optimiser's state must not live in a mapped file
        return checkpoint if map_location is None else _move(checkpoint, map_location)

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
        try:  # a missing last.ckpt is skipped like an unreadable one; a file that would run code stops the run
            read_checkpoint(path)
        except UnsafeCheckpoint:
            raise
        except CheckpointError:
            continue
        return path
    return None


def _move(checkpoint: dict, map_location) -> dict:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return checkpoint if callable(map_location) else move_data_to_device(checkpoint, torch.device(map_location))


def upgrade(path: str | Path) -> None:
    """Rewrite a checkpoint of an earlier fewstep (OmegaConf hyperparameters, numpy RNG state) with plain containers.

    Loads the file with ``weights_only=False``, which runs whatever its pickle names: only for files you trust.
    """
    from fewstep.methods.base import plain_rng_states

    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"] = plain_tree(checkpoint.get("hyper_parameters", {}))
    checkpoint.pop("hparams_type", None)
    if "fewstep" in checkpoint and "rng" in checkpoint["fewstep"]:
        checkpoint["fewstep"]["rng"] = plain_rng_states(checkpoint["fewstep"]["rng"])
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    read_checkpoint(path)
    print(f"upgraded {path}: it now loads with weights_only=True")


if __name__ == "__main__":  # python -m fewstep.checkpoints upgrade PATH [PATH ...]
    if len(sys.argv) < 3 or sys.argv[1] != "upgrade":
        sys.exit("usage: python -m fewstep.checkpoints upgrade PATH [PATH ...]  (only for checkpoints you trust)")
    for name in sys.argv[2:]:
        upgrade(name)
