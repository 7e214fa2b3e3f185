"""NVlabs/edm network pickles, read without running code from the file.

EDM pickles each of its classes as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where
``meta`` carries the class's module source code; EDM's own loader executes that source. Here every global
the stream names is looked up in an allow-list of what these pickles need (checked with pickletools on
pickles written by EDM's code) and anything else is refused before it is called; persistent objects become
inert ``PersistentRecord``s, and the network is rebuilt from fewstep's own classes (fewstep.networks.edm).
"""

from __future__ import annotations

import collections
import inspect
import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.errors import CheckpointError, one_line

_NOT_EDM = "the file is not an EDM network pickle, and fewstep does not run code from pickles"


@dataclass
class PersistentRecord:
    """What EDM's ``_reconstruct_persistent_obj`` would have built, kept as data: nothing here is executed."""

    class_name: str
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # its __dict__ (a torch module's: _parameters, _buffers, _modules)
    module_src: str = ""  # EDM's source of the class, kept as text only
    version: Any = None


class TorchModuleRecord:
    """A plain torch module inside a persistent one (EDM: ``torch.nn.ModuleDict``), kept as its state only.

    Pickle builds it with ``cls.__new__(cls)`` and ``__setstate__(state)``; the torch class is never constructed.
    """

    class_name = "Module"

    def __setstate__(self, state: dict) -> None:
        self.state = state if isinstance(state, dict) else {}


class _ModuleDictRecord(TorchModuleRecord):
    class_name = "ModuleDict"


class EasyDict(dict):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict with attribute access; attributes are not needed here)."""


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(one_line(f"refusing {what}: {_NOT_EDM}"))


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)):
        raise _refuse("a persistent object whose record is not an EDM class record")
    state = dict(meta.get("state") or {})
    init_args, init_kwargs = state.pop("_init_args", None) or (), state.pop("_init_kwargs", None) or {}
    return PersistentRecord(
        class_name=meta["class_name"], init_args=tuple(init_args), init_kwargs=dict(init_kwargs), state=state,
        module_src=str(meta.get("module_src", "")), version=meta.get("version"),
    )


def _load_storage_bytes(data: Any) -> torch.storage.TypedStorage:
    """Safe ``torch.storage._load_from_bytes``: the original calls ``torch.load(weights_only=False)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise _refuse("an embedded tensor storage that is not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation: it is what these pickles hold
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refused a global, or the bytes are not a torch file
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise _refuse(f"an embedded tensor storage ({type(error).__name__}: {first})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _refuse(f"an embedded tensor storage that holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor_v2(storage, *args):
    if not isinstance(storage, torch.storage.TypedStorage):  # torch would read attributes of whatever it is given
        raise _refuse(f"a tensor built on a {type(storage).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._utils._rebuild_tensor_v2(storage, *args)


def _rebuild_parameter(data, *args):
    if not isinstance(data, torch.Tensor):
        raise _refuse(f"a parameter built on a {type(data).__name__}")
    return torch._utils._rebuild_parameter(data, *args)


def _numpy_dtype(spec, align=False, copy=False):
    """``numpy.dtype`` for numeric types only (numpy scalars such as ``np.sqrt(0.5)`` in layer attributes)."""
    dtype = np.dtype(spec) if isinstance(spec, str) and spec.isalnum() else None
    if dtype is None or dtype.kind not in "biufc":  # no object or structured dtypes
        raise _refuse(f"the numpy dtype {repr(spec)[:50]}")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biufc" and isinstance(data, bytes) and len(data) == dtype.itemsize):
        raise _refuse("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype)[0]


# Every global a snapshot written by EDM's code names (pickletools on EDMPrecond/VPPrecond/VEPrecond/
# iDDPMPrecond over SongUNet and DhariwalUNet, EDMLoss, AugmentPipe), each mapped to an inert or checked stand-in.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy < 2
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy >= 2
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what EDM network pickles need; any other global is refused in ``find_class``, before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _refuse(f"the global {module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a persistent id (EDM pickles use none)")


def read_edm_pickle(path: str | Path) -> dict | PersistentRecord:
    """The top-level object of an EDM pickle (a snapshot dict, or a bare network record), or a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"EDM network pickle '{path}' not found")
    try:
        with open(path, "rb") as file:
            return RestrictedUnpickler(file).load()
    except CheckpointError as error:
        raise CheckpointError(one_line(f"'{path}': {error}")) from None
    except Exception as error:  # not a pickle, truncated, or allowed callables given arguments they refuse
        raise CheckpointError(one_line(
            f"cannot read '{path}' as an EDM network pickle ({type(error).__name__}: {error}): "
            "the file is truncated, corrupted or not a pickle"
        )) from None


def load_edm_network(path: str | Path) -> torch.nn.Module:
    """EDM's network in fewstep's implementation (fewstep.networks.edm), in eval mode, with the file's weights.

    Takes an EDM snapshot pickle (its ``ema`` entry; loss_fn, augment_pipe and dataset_kwargs are not built),
    a pickle of one network, or a torch file {"class_name", "init_kwargs", "state_dict"} (read weights-only).
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth") or _starts_with(path, b"PK\x03\x04"):  # not is_zipfile: a pickle may embed a zip
        class_name, init_args, init_kwargs, state_dict = _read_torch_file(path)
    else:
        top = read_edm_pickle(path)
        record = top.get("ema") if isinstance(top, dict) else top
        if not isinstance(record, PersistentRecord) or "_modules" not in record.state:
            held = f"a dict with keys {sorted(map(str, top))}" if isinstance(top, dict) else f"a {type(top).__name__}"
            if isinstance(record, PersistentRecord):
                held = f"a {record.class_name}, which is not a network"
            raise CheckpointError(
                f"'{path}' holds no EDM network ({held}): pass a snapshot with an 'ema' entry or a pickled network"
            )
        class_name, init_args, init_kwargs = record.class_name, record.init_args, record.init_kwargs
        state_dict = _state_dict(record, path)
    return _build(path, class_name, init_args, init_kwargs, state_dict)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(len(magic)) == magic
    except OSError:
        return False


def _read_torch_file(path: Path) -> tuple[str, tuple, dict, dict]:
    if not path.is_file():
        raise CheckpointError(f"EDM network file '{path}' not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refused a global, or the file is not a torch file
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(one_line(f"cannot read '{path}' as a torch file ({type(error).__name__}: {first})")) from None
    if not (isinstance(data, dict) and isinstance(data.get("class_name"), str) and isinstance(data.get("state_dict"), dict)):
        raise CheckpointError(
            f"'{path}' holds no EDM network: expected a dict with 'class_name', 'init_kwargs' and 'state_dict'"
        )
    init_args, init_kwargs = tuple(data.get("init_args", ())), dict(data.get("init_kwargs") or {})
    return data["class_name"], init_args, init_kwargs, data["state_dict"]


def _state_dict(record: PersistentRecord | TorchModuleRecord, path: Path, prefix: str = "", out: dict | None = None
                ) -> dict:
    """The state_dict the module would have: parameters, persistent buffers, then submodules, as torch orders them."""
    out = {} if out is None else out
    state = record.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in [*(state.get("_parameters") or {}).items(),
                         *((n, t) for n, t in (state.get("_buffers") or {}).items() if n not in non_persistent)]:
        if tensor is not None:
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"'{path}': '{prefix}{name}' is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, TorchModuleRecord)) or not hasattr(child, "state"):
            raise CheckpointError(
                f"'{path}': submodule '{prefix}{name}' is a {type(child).__name__}, not a module record"
            )
        _state_dict(child, path, f"{prefix}{name}.", out)
    return out


def _build(path: Path, class_name: str, init_args: tuple, init_kwargs: dict, state_dict: dict) -> torch.nn.Module:
    from fewstep.networks.edm import EDM_CLASSES  # lazily: reading a file needs no network code

    if class_name not in EDM_CLASSES:
        raise CheckpointError(
            f"'{path}' holds an EDM {class_name}, which fewstep does not implement (it does: {', '.join(EDM_CLASSES)})"
        )
    try:
        module = EDM_CLASSES[class_name](*init_args, **init_kwargs)
    except Exception as error:  # arguments from the file that this implementation does not take
        raise CheckpointError(one_line(
            f"'{path}': cannot build {class_name} from the recorded arguments ({type(error).__name__}: {error})"
        )) from None
    misfit = _first_misfit(module.state_dict(), state_dict, class_name)
    if misfit:
        raise CheckpointError(f"'{path}': the weights do not fit fewstep's {class_name}: {misfit}")
    module.load_state_dict(state_dict, strict=True)
    signature = inspect.signature(EDM_CLASSES[class_name]).bind(*init_args, **init_kwargs).arguments
    module.edm_arguments = {  # what rebuilds it: fewstep's model config (edm_network_config)
        **{k: v for k, v in signature.items() if k != "model_kwargs"}, **signature.get("model_kwargs", {})
    }
    return module.eval()


def edm_network_config(net: torch.nn.Module) -> tuple[dict, list[int], int]:
    """(model config, data shape [C, H, H], label count) of a network from ``load_edm_network``: the config is
    fewstep's ``edm_denoiser`` with the file's constructor arguments, so a student of it builds the same network."""
    from fewstep.networks.edm import PRECONDITIONINGS

    name = type(net).__name__
    if name not in PRECONDITIONINGS:
        raise CheckpointError(
            f"the file holds a bare {name} without EDM's preconditioning: pass the preconditioned network "
            f"({', '.join(PRECONDITIONINGS)}), the 'ema' entry of an EDM snapshot"
        )
    kwargs = {key: _plain_value(value) for key, value in net.edm_arguments.items()}
    resolution, channels = int(kwargs.pop("img_resolution")), int(kwargs.pop("img_channels"))
    labels = int(kwargs.pop("label_dim", 0) or 0)
    config = {"_target_": "fewstep.networks.edm.edm_denoiser", "precond": name, **kwargs}
    return config, [channels, resolution, resolution], labels


def _plain_value(value):
    """A recorded constructor argument as plain Python (tuples as lists, numpy scalars as numbers)."""
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


def _first_misfit(expected: dict, found: dict, class_name: str) -> str | None:
    """The first key that would make ``load_state_dict(strict=True)`` fail, said in words (torch's message is long)."""
    for key, value in found.items():
        if not isinstance(value, torch.Tensor):
            return f"'{key}' is a {type(value).__name__}, not a tensor"
    for key in expected:
        if key not in found:
            return f"'{key}' is missing from the file"
    for key in found:
        if key not in expected:
            return f"'{key}' is not in fewstep's {class_name}"
    for key, value in expected.items():
        if found[key].shape != value.shape:
            return f"'{key}' is shape {tuple(found[key].shape)} in the file, {tuple(value.shape)} in fewstep"
    return None
