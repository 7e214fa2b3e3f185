"""NVlabs/edm network pickles, read without running code from the file.

EDM pickles each of its classes as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where
``meta`` carries the class's module source code; EDM's own loader executes that source. Here every global
the stream names is looked up in an allow-list of what these pickles need (checked with pickletools on
pickles written by EDM's code) and anything else is refused before it is called; persistent objects become
inert ``PersistentRecord``s, and the network is rebuilt from fewstep's own classes (fewstep.networks.edm).

NVlabs/edm2 snapshots are pickled by the same persistence code and read the same way: their ``ema`` entry (an EDM2
``Precond``, float16 as EDM2's training loop writes it) becomes fewstep.networks.edm2's network in float32; their
``encoder`` entry must be the pixel encoder (a latent model's Stability VAE encoder is refused in one line).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.errors import CheckpointError, one_line

_NOT_EDM = "the file is not an EDM network pickle, and fewstep does not run code from pickles"

# EDM2's encoder records (training.encoders): pixel models scale images to [-1, 1]; latent models run a VAE
PIXEL_ENCODERS = ("StandardRGBEncoder",)
LATENT_ENCODERS = ("StabilityVAEEncoder",)
EDM2_CLASS_NAMES = ("Precond", "UNet")  # training.networks_edm2's networks (fewstep.networks.edm2.EDM2_CLASSES)

# Bounds on what a file may make the reader do. EDM's biggest networks (ADM at ImageNet-64, ~300M parameters) have
# a few thousand modules nested fewer than 20 deep, so each bound is far above a real snapshot and far below harm.
MAX_RECORD_DEPTH = 64  # nesting of module records (EDM's networks: fewer than 20 levels)
MAX_MODULE_RECORDS = 100_000  # module records, a shared one counted at each place it appears (EDM: a few thousand)
MAX_STATE_ENTRIES = 100_000  # parameters and buffers in the state_dict (EDM's largest network: a few thousand)
MAX_TENSOR_ELEMENTS = 1 << 31  # elements of the network's tensors together (ADM ImageNet-64: ~3e8)
MAX_ARGUMENT_DEPTH = 16  # nesting of the recorded constructor arguments (EDM's: a list of numbers inside a dict)
MAX_ARGUMENT_VALUES = 10_000  # values in them, a shared one counted each time it appears (EDM's: a few dozen)


class _SealedClass(type):
    """A class the unpickler may instantiate but never change: a stream's BUILD or attribute writes on the class
    object itself would otherwise persist in fewstep for the rest of the process."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise _refuse(f"a change to the class {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise _refuse(f"a change to the class {cls.__name__}")


class _InstanceSetstate:
    """``__setstate__`` for instances only: pickle's BUILD on the class object itself finds a refusal here."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            def refuse(*args: Any) -> None:
                raise _refuse(f"a change to the class {owner.__name__}")

            return refuse
        return self.function.__get__(instance, owner)


@dataclass
class PersistentRecord:
    """What EDM's ``_reconstruct_persistent_obj`` would have built, kept as data: nothing here is executed."""

    class_name: str
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # its __dict__ (a torch module's: _parameters, _buffers, _modules)
    module_src: str = ""  # EDM's source of the class, kept as text only
    version: Any = None

    def __setstate__(self, state: Any) -> None:
        # EDM's records are complete when reconstructed; a later BUILD could only swap in other fields
        raise _refuse("a persistent object changed after it was reconstructed")


class TorchModuleRecord(metaclass=_SealedClass):
    """A plain torch module inside a persistent one (EDM: ``torch.nn.ModuleDict``), kept as its state only.

    Pickle builds it with ``cls.__new__(cls)`` and ``__setstate__(state)``; the torch class is never constructed.
    """

    class_name = "Module"

    @_InstanceSetstate
    def __setstate__(self, state: dict) -> None:
        self.state = state if isinstance(state, dict) else {}


class _ModuleDictRecord(TorchModuleRecord):
    class_name = "ModuleDict"


class EasyDict(dict, metaclass=_SealedClass):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict with attribute access; attributes are not needed here)."""

    @_InstanceSetstate
    def __setstate__(self, state: Any) -> None:
        # EasyDict keeps its entries as items, so EDM's pickles carry no state for it; attributes could shadow methods
        parts = state if isinstance(state, tuple) else (state,)  # BUILD's state, or its (dict, slots) pair
        if not all(part is None or (isinstance(part, dict) and not part) for part in parts):
            raise _refuse("attributes on an EasyDict")


class _AllowedCallable:
    """An allowed global as the unpickler sees it: callable, but closed to BUILD and attribute writes, so nothing a
    stream does to it (its __defaults__, __dict__, ...) outlives the load or reaches the function itself."""

    __slots__ = ("_function", "_name")

    def __init__(self, function: Any, name: str) -> None:
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _refuse(f"a change to the global {self._name}")

    def __delattr__(self, name: str) -> None:
        raise _refuse(f"a change to the global {self._name}")

    def __setstate__(self, state: Any) -> None:
        raise _refuse(f"a change to the global {self._name}")


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(one_line(f"refusing {what}: {_NOT_EDM}"))


def _short(text: Any, limit: int = 100) -> str:
    """A name from the file, cut to fit in a one-line message."""
    text = text if isinstance(text, str) else type(text).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)):
        raise _refuse("a persistent object whose record is not an EDM class record")
    if not isinstance(meta.get("state") or {}, dict) or not isinstance(meta.get("module_src", ""), str):
        raise _refuse("an EDM class record whose state is not a dict or whose module source is not text")
    state = dict(meta.get("state") or {})
    init_args, init_kwargs = state.pop("_init_args", None) or (), state.pop("_init_kwargs", None) or {}
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise _refuse("an EDM class record whose constructor arguments are not a tuple and a dict")
    return PersistentRecord(
        class_name=meta["class_name"], init_args=tuple(init_args), init_kwargs=dict(init_kwargs), state=state,
        module_src=meta.get("module_src", ""), version=meta.get("version"),
    )


# torch's legacy serialization (what EDM's storages embed): its magic number and protocol version, the first two
# pickles of the bytes; then system info, the storage's record, the storage keys and the raw data
_TORCH_LEGACY_MAGIC, _TORCH_LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


class _StorageCensus(pickle.Unpickler):
    """Reads the record of an embedded legacy torch file for the storage sizes it declares, and builds nothing:
    torch allocates a declared size before it reads the data, so a 300-byte record could ask for gigabytes."""

    def __init__(self, file: Any, declared: dict) -> None:
        super().__init__(file)
        self.declared = declared  # root key -> bytes

    def find_class(self, module: str, name: str) -> Any:
        storage = getattr(torch, name, None) if module == "torch" and name.endswith("Storage") else None
        if not (isinstance(storage, type) and issubclass(storage, torch.storage.TypedStorage)):
            raise _refuse(f"the global {_short(module)}.{_short(name)} in an embedded tensor storage")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation: it is what these pickles hold
            return storage.dtype.itemsize  # all the census needs of the storage type

    def persistent_load(self, pid: Any) -> None:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise _refuse("an embedded tensor storage whose record is not torch's")
        _, itemsize, root_key, _location, numel, _view = pid
        if not (isinstance(itemsize, int) and isinstance(numel, int) and numel >= 0 and isinstance(root_key, str)):
            raise _refuse("an embedded tensor storage whose record is not torch's")
        self.declared[root_key] = max(self.declared.get(root_key, 0), itemsize * numel)


def _check_declared_storage(data: bytes) -> None:
    """Refuses embedded storage bytes that are not torch's legacy format or declare more bytes than they hold."""
    file, declared = io.BytesIO(data), {}
    try:
        magic, protocol = _StorageCensus(file, declared).load(), _StorageCensus(file, declared).load()
        if magic != _TORCH_LEGACY_MAGIC or protocol != _TORCH_LEGACY_PROTOCOL:
            raise _refuse("an embedded tensor storage that is not in torch's legacy format, which EDM's pickles use")
        _StorageCensus(file, declared).load()  # system info: plain values
        _StorageCensus(file, declared).load()  # the storage itself, as a persistent id
    except CheckpointError:
        raise
    except Exception as error:  # not a pickle, truncated
        raise _refuse(f"an embedded tensor storage that is not a torch file ({type(error).__name__})") from None
    if sum(declared.values()) > len(data):
        raise _refuse(f"an embedded tensor storage that declares {sum(declared.values())} bytes in {len(data)}")


def _load_storage_bytes(data: Any) -> torch.storage.TypedStorage:
    """Safe ``torch.storage._load_from_bytes``: the original calls ``torch.load(weights_only=False)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise _refuse("an embedded tensor storage that is not bytes")
    _check_declared_storage(bytes(data))
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
    size = args[1] if len(args) > 1 else ()
    # a view with zero strides can claim any size over a small storage
    if isinstance(size, (tuple, list)) and all(isinstance(n, int) for n in size) and math.prod(size) > MAX_TENSOR_ELEMENTS:
        raise _refuse(f"a tensor of {math.prod(size)} elements (at most {MAX_TENSOR_ELEMENTS})")
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
# The unpickler gets them sealed (_UNPICKLER_GLOBALS): classes it can instantiate but not change, functions wrapped.
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



_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: C types such as OrderedDict refuse attribute writes themselves


def _sealed(name: tuple[str, str], allowed: Any) -> Any:
    """What the unpickler gets for an allowed global: immutable types and sealed classes as they are (pickle's
    NEWOBJ needs a class), anything else behind a wrapper that a stream cannot change."""
    if isinstance(allowed, _SealedClass) or (isinstance(allowed, type) and allowed.__flags__ & _IMMUTABLE_TYPE):
        return allowed
    return _AllowedCallable(allowed, ".".join(name))


_UNPICKLER_GLOBALS = {name: _sealed(name, allowed) for name, allowed in ALLOWED_GLOBALS.items()}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what EDM network pickles need; any other global is refused in ``find_class``, before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _UNPICKLER_GLOBALS.get((module, name))
        if allowed is None:
            raise _refuse(f"the global {_short(module)}.{_short(name)}")
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
        if _names_latent_encoder(path):  # a latent EDM2 snapshot: its encoder's numpy arrays are refused first
            raise _latent_refusal(path, LATENT_ENCODERS[0]) from None
        raise CheckpointError(one_line(f"'{path}': {error}")) from None
    except Exception as error:  # not a pickle, truncated, or allowed callables given arguments they refuse
        raise CheckpointError(one_line(
            f"cannot read '{path}' as an EDM network pickle ({type(error).__name__}: {_short(str(error), 200)}): "
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
        _check_encoder(path, top)
        record = top.get("ema") if isinstance(top, dict) else top
        if not isinstance(record, PersistentRecord) or "_modules" not in record.state:
            keys = sorted(_short(key, 40) for key in list(top)[:20]) if isinstance(top, dict) else []
            held = f"a dict with keys {keys}" if isinstance(top, dict) else f"a {type(top).__name__}"
            if isinstance(record, PersistentRecord):
                held = f"a {record.class_name}, which is not a network"
            raise CheckpointError(
                f"'{path}' holds no EDM network ({held}): pass a snapshot with an 'ema' entry or a pickled network"
            )
        class_name, init_args, init_kwargs = record.class_name, record.init_args, record.init_kwargs
        state_dict = _state_dict(record, path)
    _check_arguments(path, init_args, init_kwargs)
    return _build(path, class_name, init_args, init_kwargs, state_dict)


def _latent_refusal(path: Path, encoder: str) -> CheckpointError:
    return CheckpointError(one_line(
        f"'{path}' is a latent EDM2 model (its encoder is {encoder}, a VAE): latent models are not supported; fewstep "
        "takes pixel-space EDM2 networks (e.g. edm2-img64-s)"))


def _names_latent_encoder(path: Path) -> bool:
    """Whether the first MiB of the pickle names a latent EDM2 encoder (EDM2's snapshots pickle their encoder first);
    read with pickletools, which builds nothing."""
    import pickletools

    try:
        with open(path, "rb") as file:
            head = io.BytesIO(file.read(1 << 20))
        for _, arg, _ in pickletools.genops(head):
            if isinstance(arg, str) and arg in LATENT_ENCODERS:
                return True
    except Exception:  # the head ends inside an opcode, or the stream is malformed: the reader's own refusal stands
        pass
    return False


def _check_encoder(path: Path, top: Any) -> None:
    """An EDM2 snapshot's ``encoder`` entry is the pixel encoder (or absent, as in EDM's snapshots)."""
    encoder = top.get("encoder") if isinstance(top, dict) else None
    if encoder is None:
        return
    name = encoder.class_name if isinstance(encoder, PersistentRecord) else type(encoder).__name__
    if name in LATENT_ENCODERS:
        raise _latent_refusal(path, name)
    if name not in PIXEL_ENCODERS:
        raise CheckpointError(one_line(
            f"'{path}': its encoder is a {_short(name)}, not EDM2's pixel encoder ({', '.join(PIXEL_ENCODERS)}): "
            "fewstep takes pixel-space EDM2 networks"))


def _check_arguments(path: Path, init_args: Any, init_kwargs: Any) -> None:
    """Refuses constructor arguments nested deeper, or holding more values, than an EDM network records, before
    anything walks them recursively: a list that contains itself, or lists shared over many levels, never end."""
    pending, count = [(init_args, 0), (init_kwargs, 0)], 0
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > MAX_ARGUMENT_VALUES:
            raise CheckpointError(one_line(
                f"'{path}': refusing constructor arguments of more than {MAX_ARGUMENT_VALUES} values (EDM's networks "
                f"record a few dozen): {_NOT_EDM}"
            ))
        if isinstance(value, (list, tuple, dict)):
            if depth >= MAX_ARGUMENT_DEPTH:
                raise CheckpointError(one_line(
                    f"'{path}': refusing constructor arguments nested deeper than {MAX_ARGUMENT_DEPTH} levels: {_NOT_EDM}"
                ))
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(len(magic)) == magic
    except OSError:
        return False


def _read_torch_file(path: Path) -> tuple[str, tuple, dict, dict]:
    from fewstep.torch_files import check_torch_archive

    if not path.is_file():
        raise CheckpointError(f"EDM network file '{path}' not found")
    check_torch_archive(path)
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


def _module_parts(record: Any, path: Path, where: str) -> tuple[list, list]:
    """A module record's own tensors (parameters, then persistent buffers) and its submodules, as (name, value)
    pairs in torch's order; anything that is not what torch pickles for a module is a one-line refusal."""
    state = getattr(record, "state", None)
    if not isinstance(record, (PersistentRecord, TorchModuleRecord)) or not isinstance(state, dict):
        raise CheckpointError(one_line(
            f"'{path}': submodule '{_short(where.rstrip('.'))}' is a {type(record).__name__}, not a module record"
        ))
    parts = {}
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        value = state.get(key) or ({} if key != "_non_persistent_buffers_set" else set())
        kind = (set, frozenset) if key == "_non_persistent_buffers_set" else dict
        if not isinstance(value, kind) or not all(isinstance(name, str) for name in value):
            raise CheckpointError(one_line(
                f"'{path}': {key} of the module '{_short(where.rstrip('.'))}' is not what torch pickles ({_NOT_EDM})"
            ))
        parts[key] = value
    buffers = [(n, t) for n, t in parts["_buffers"].items() if n not in parts["_non_persistent_buffers_set"]]
    tensors = []
    for name, tensor in [*parts["_parameters"].items(), *buffers]:
        if tensor is not None:
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(one_line(f"'{path}': '{_short(where + name)}' is a {type(tensor).__name__}, not a tensor"))
            tensors.append((name, tensor))
    return tensors, [(name, child) for name, child in parts["_modules"].items() if child is not None]


def _check_module_tree(root: Any, path: Path) -> None:
    """Refuses a module tree that contains itself, nests too deep, or holds more records, state entries or tensor
    elements than the limits above, before anything is collected. Each record is visited once (a shared one's
    counts are remembered), so records shared across many levels cost their number, not the number of paths."""
    counts: dict[int, tuple[int, int, int]] = {}  # id(record) -> (module records, state entries, elements) below it
    open_records: set[int] = set()  # the records on the way down to the current one

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(one_line(f"'{path}': refusing {what}: {_NOT_EDM}"))

    def visit(record: Any, where: str, depth: int) -> tuple[int, int, int]:
        key = id(record)
        if key in counts:
            return counts[key]
        if key in open_records:
            return_to = _short(where.rstrip(".")) or "the top"
            raise refuse(f"a module record that contains itself (at '{return_to}')")
        if depth > MAX_RECORD_DEPTH:
            raise refuse(f"module records nested deeper than {MAX_RECORD_DEPTH} levels (EDM's nest fewer than 20)")
        tensors, children = _module_parts(record, path, where)
        open_records.add(key)
        records, entries, elements = 1, len(tensors), sum(tensor.numel() for _, tensor in tensors)
        for name, child in children:
            below = visit(child, f"{where}{name}.", depth + 1)
            records, entries, elements = records + below[0], entries + below[1], elements + below[2]
            if records > MAX_MODULE_RECORDS:
                raise refuse(f"more than {MAX_MODULE_RECORDS} module records, counting a shared one at each place "
                             "it appears (EDM's largest networks have a few thousand)")
            if entries > MAX_STATE_ENTRIES:
                raise refuse(f"more than {MAX_STATE_ENTRIES} parameters and buffers (EDM's largest networks have "
                             "a few thousand)")
        open_records.discard(key)
        if elements > MAX_TENSOR_ELEMENTS:
            raise refuse(f"tensors of more than {MAX_TENSOR_ELEMENTS} elements together (EDM's largest network "
                         "has about 3e8)")
        counts[key] = (records, entries, elements)
        return counts[key]

    visit(root, "", 0)


def _state_dict(record: PersistentRecord | TorchModuleRecord, path: Path) -> dict:
    """The state_dict the module would have: parameters, persistent buffers, then submodules, as torch orders them
    (a shared submodule under each of its names, as torch's state_dict does)."""
    _check_module_tree(record, path)  # bounds the walk below
    out: dict = {}

    def collect(record: Any, prefix: str) -> None:
        tensors, children = _module_parts(record, path, prefix)
        for name, tensor in tensors:
            out[prefix + name] = tensor.detach()
        for name, child in children:
            collect(child, f"{prefix}{name}.")

    collect(record, "")
    return out


def _build(path: Path, class_name: str, init_args: tuple, init_kwargs: dict, state_dict: dict) -> torch.nn.Module:
    if class_name in EDM2_CLASS_NAMES:
        return _build_edm2(path, class_name, init_args, init_kwargs, state_dict)
    from fewstep.networks.edm import EDM_CLASSES  # lazily: reading a file needs no network code

    if class_name not in EDM_CLASSES:
        raise CheckpointError(
            f"'{path}' holds an EDM {class_name}, which fewstep does not implement (it does: {', '.join(EDM_CLASSES)})"
        )
    from fewstep.schema import check_edm_arguments

    # the file's arguments are data: checked by name and type, then passed as plain values (model_kwargs flattened,
    # which EDM's preconditionings take as **model_kwargs)
    arguments = check_edm_arguments(path, class_name, init_args, init_kwargs)
    return _instantiate(path, EDM_CLASSES[class_name], class_name, arguments, state_dict)


def _instantiate(path: Path, cls: type, name: str, arguments: dict, state_dict: dict) -> torch.nn.Module:
    """``cls(**arguments)`` (checked arguments) with the file's weights, in float32, in eval mode; one line otherwise."""
    try:
        module = cls(**arguments)
    except Exception as error:  # arguments from the file that this implementation does not take
        raise CheckpointError(one_line(
            f"'{path}': cannot build {name} from the recorded arguments ({type(error).__name__}: {error})"
        )) from None
    misfit = _first_misfit(module.state_dict(), state_dict, name)
    if misfit:
        raise CheckpointError(f"'{path}': the weights do not fit fewstep's {name}: {misfit}")
    # EDM2 stores its EMA in float16: fewstep's networks compute in float32 (EDM2's use_fp16 casts on CUDA)
    module.load_state_dict({key: value.float() if value.is_floating_point() else value
                            for key, value in state_dict.items()}, strict=True)
    module.edm_arguments = arguments  # what rebuilds it: fewstep's model config (edm_network_config)
    return module.eval()


def _build_edm2(path: Path, class_name: str, init_args: tuple, init_kwargs: dict, state_dict: dict) -> torch.nn.Module:
    """EDM2's network in fewstep.networks.edm2, from its checked arguments, with the weights in float32."""
    from fewstep.networks.edm2 import EDM2_CLASSES

    arguments = _edm2_arguments(path, class_name, init_args, init_kwargs)
    return _instantiate(path, EDM2_CLASSES[class_name], f"EDM2 {class_name}", arguments, state_dict)


def _edm2_arguments(path: Path, class_name: str, init_args: Any, init_kwargs: Any) -> dict:
    """EDM2's recorded constructor arguments by name (Precond's, and the UNet's and Block's it passes on), each checked
    against the types of fewstep's ``edm2_denoiser``; returned as plain values."""
    from fewstep.networks.edm2 import EDM2_CLASSES, edm2_denoiser
    from fewstep.schema import UntrustedConfig, check_arguments, parameters, recorded_arguments

    known = {k: v for k, v in parameters(edm2_denoiser).items() if k not in ("data_shape", "num_classes")}
    try:
        arguments = recorded_arguments(EDM2_CLASSES[class_name], f"EDM2's {class_name}", init_args, init_kwargs)
        arguments.update(arguments.pop("unet_kwargs", None) or arguments.pop("block_kwargs", None) or {})
        check_arguments(f"EDM2 {class_name}", arguments, known, {"img_resolution": int, "img_channels": int, "label_dim": int})
        return arguments
    except UntrustedConfig as error:
        raise UntrustedConfig(one_line(f"refusing '{path}': {error}; fewstep builds EDM2's networks only from plain, "
                                       "typed constructor arguments")) from None


def edm_network_config(net: torch.nn.Module) -> tuple[dict, list[int], int]:
    """(model config, data shape [C, H, H], label count) of a network from ``load_edm_network``: the config is
    fewstep's ``edm_denoiser`` (``edm2_denoiser`` for EDM2) with the file's constructor arguments, so a student of it
    builds the same network."""
    from fewstep.networks.edm import PRECONDITIONINGS

    name = type(net).__name__
    if name not in PRECONDITIONINGS:
        from fewstep.networks.edm2 import EDM2Precond, EDM2UNet

        if isinstance(net, EDM2Precond):
            kwargs = {key: _plain_value(value) for key, value in net.edm_arguments.items()}
            resolution, channels = int(kwargs.pop("img_resolution")), int(kwargs.pop("img_channels"))
            labels = int(kwargs.pop("label_dim", 0) or 0)
            return {"_target_": "fewstep.networks.edm2.edm2_denoiser", **kwargs}, [channels, resolution, resolution], labels
        if isinstance(net, EDM2UNet):
            raise CheckpointError("the file holds a bare EDM2 UNet without EDM2's Precond: pass the 'ema' entry of an "
                                  "EDM2 snapshot")
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
