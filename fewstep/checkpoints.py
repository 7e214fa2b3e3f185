"""Reading fewstep checkpoints with clear errors, and rebuilding a method from one file."""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from fewstep.atomic import atomic_write
from fewstep.errors import CheckpointError, ConfigError, FewstepError, one_line
from fewstep.torch_files import check_torch_archive


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
    check_torch_archive(path)
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
    """The method class a checkpoint names, by its exact qualified name: one of ``fewstep.methods.METHODS``, fewstep's
    methods and those a program registered (``fewstep.methods.register_method``); a file never makes fewstep import
    anything."""
    from fewstep.methods import METHODS

    name = checkpoint["fewstep"].get("method_class", "") if isinstance(checkpoint.get("fewstep"), dict) else ""
    known = {f"{cls.__module__}.{cls.__qualname__}": cls for cls, _ in METHODS.values()}
    if not isinstance(name, str) or name not in known:
        raise CheckpointError(f"the checkpoint names the method class {str(name)[:80]!r}, which is not a fewstep method "
                              "(fewstep.methods.METHODS; a class of your own: call fewstep.methods.register_method first)")
    return known[name]


def method_from_checkpoint(checkpoint: dict, path: str | Path):
    """The method a checkpoint describes, built by fewstep from its checked hyperparameters (no weights loaded)."""
    from fewstep.schema import check_hyperparameters

    cls = method_class(checkpoint)
    try:
        hyperparameters = check_hyperparameters(cls, checkpoint.get("hyper_parameters"))
    except CheckpointError as error:
        raise CheckpointError(f"refusing checkpoint '{path}': {error}; fewstep builds a method from a file only "
                              "out of its own classes and plain, typed values") from None
    try:
        return cls(**hyperparameters)
    except FewstepError as error:
        raise CheckpointError(f"checkpoint '{path}': {error}") from None
    except (TypeError, ValueError) as error:  # values of the right types that the constructor refuses
        raise CheckpointError(f"cannot rebuild the method of checkpoint '{path}' ({type(error).__name__}: {error}); "
                              "it was not written by this fewstep") from None


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
        method = load_external(path)
        check_finite(method, path)
        return method.to(map_location).eval()
    checkpoint = read_checkpoint(path)
    method = method_from_checkpoint(checkpoint, path)
    ema = checkpoint.get("state_dict")
    state = checkpoint.get("current_model_state", ema) if weights == "raw" else ema
    misfit = state_misfit(method.state_dict(), state)
    if misfit:
        raise CheckpointError(f"checkpoint '{path}' does not fit the method it names: {misfit}; the file is corrupted "
                              "or was edited")
    method.load_state_dict(state)
    check_finite(method, path)
    return method.to(map_location).eval()


def state_misfit(expected: dict, found) -> str | None:
    """Why ``found`` would not load into a module whose state_dict is ``expected`` (one phrase), or None."""
    if not isinstance(found, dict):
        return f"its weights are a {type(found).__name__}, not a state_dict"
    for key, value in found.items():
        if key not in expected:
            return f"its tensor {str(key)[:80]!r} is not in the network"
        if not isinstance(value, torch.Tensor):
            return f"its {key!r} is a {type(value).__name__}, not a tensor"
        if value.shape != expected[key].shape:
            return f"its tensor {key!r} is {tuple(value.shape)}, the network's {tuple(expected[key].shape)}"
    missing = next((key for key in expected if key not in found), None)
    return f"its weights lack {missing!r}" if missing else None


@torch.no_grad()
def check_finite(method, path) -> None:
    """Refuse a model whose weights, or whose output on a fixed probe input, are not finite (NaN weights, a NaN
    sigma_data, a scheduler of NaN betas would otherwise give all-NaN or all-black samples and exit 0)."""
    for name, tensor in method.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"'{path}': its weight {name!r} holds NaN or infinite values; use another checkpoint "
                                  "of the run (an earlier step), or weights=ema / weights=raw for the other set")
    was_training = method.training
    method.eval()
    shape = tuple(method.hparams.data_shape)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(method.device)
    labels = torch.zeros(1, dtype=torch.long, device=method.device) if method.num_classes else None
    from fewstep.methods.kac_teacher import KacTeacher

    try:
        if isinstance(method, KacTeacher):  # a velocity field, no Gaussian denoiser
            out = method.velocity(x, torch.full((1,), 0.5 * float(method.hparams.get("T", 1.0)), device=method.device),
                                  labels)
        else:
            out = method.denoiser(x, torch.ones(1, device=method.device), labels)
    except (ArithmeticError, ValueError, RuntimeError) as error:  # settings whose arithmetic overflows, say
        raise CheckpointError(one_line(f"'{path}': the model cannot be evaluated on a probe input ({type(error).__name__}: "
                                       f"{str(error)[:120]}); a setting such as sigma_data is out of range: use another "
                                       "model file")) from None
    method.train(was_training)
    if not torch.isfinite(out).all():
        raise CheckpointError(f"'{path}': the model returns NaN or infinite values on a probe input (its weights are "
                              "finite: a setting such as sigma_data or the noise schedule is not); use another model file")


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
    from fewstep.schema import check_node, check_shape, check_value

    try:  # what the file says becomes fewstep's model config: checked like a checkpoint's
        config = check_node(config, "network", "model")
        check_shape(data_shape, num_classes, "model")
        check_value(net.sigma_data, float, "sigma_data")
    except CheckpointError as error:
        raise CheckpointError(f"refusing '{path}': {error}; fewstep builds a network from a file only out of its own "
                              "classes and plain, typed values") from None
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
        try:
            atomic_write(path, lambda file: torch.save(checkpoint, file), sync=True)
        except OSError as error:
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
    for path in [directory / "last.ckpt", *sorted(steps, key=checkpoint_step, reverse=True)]:
        try:  # a missing last.ckpt is skipped like an unreadable one; a file that would run code stops the run
            read_checkpoint(path)
        except UnsafeCheckpoint:
            raise
        except CheckpointError:
            continue
        return path
    return None


def checkpoint_step(path: Path) -> tuple[int, str]:
    """The training step in a checkpoint's name (fewstep's ``step_0004000.ckpt``, Lightning's ``...step=4000.ckpt``;
    -1 without one), then the name: the order in which a run wrote them, whatever their modification times say."""
    found = re.findall(r"step[=_](\d+)", path.name)
    return (int(found[-1]) if found else -1, path.name)


def _move(checkpoint: dict, map_location) -> dict:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return checkpoint if callable(map_location) else move_data_to_device(checkpoint, torch.device(map_location))


def upgrade(path: str | Path) -> None:
    """Rewrite a checkpoint of an earlier fewstep (OmegaConf hyperparameters, numpy RNG state) with plain containers.

    Loads the file with ``weights_only=False``, which runs whatever its pickle names: only for files you trust.
    """
    from fewstep.constructors import plain
    from fewstep.methods.base import plain_rng_states

    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"] = plain(checkpoint.get("hyper_parameters", {}))
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
