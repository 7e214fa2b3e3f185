"""What a file may ask fewstep to build, checked: the exact constructor names, and the type of every argument.

Checkpoints, EDM network files, diffusers folders and saved run configurations record how to rebuild a network, an
optimiser or a data set. What they record is data. A recorded node names its constructor by one of the exact strings
in the tables of ``fewstep.constructors`` (never a prefix: Hydra's ``_locate`` walks on through module attributes, so
``fewstep.networks.unet.torch.load`` starts with ``fewstep.networks.``). Each argument is checked against the
constructor's signature: numbers (finite), strings, booleans, lists of those, a mapping only where the constructor
takes one and then of plain values with no Hydra key (``_target_``, ``_args_``, ...) anywhere inside.
``fewstep.constructors.build`` then imports the constructor from its table, never from the file, and calls it
with those values: nothing a file says reaches ``hydra.utils.instantiate``. A node from the user's own Hydra config
that names a class of their own (not in the table) is built by Hydra as before; files never get that far, because
every reader checks its nodes here first.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewstep.constructors import GROUPS, HYDRA_KEYS, plain, resolve
from fewstep.errors import CheckpointError, one_line

# torch's optimisers and schedulers, by hand: their annotations (Tensor | float, ...) say more than a file may hold
_FLOAT, _INT, _BOOL = float, int, bool
EXPLICIT_SIGNATURES: dict[str, dict[str, Any]] = {
    **{f"torch.optim.{name}": {"lr": _FLOAT, "betas": list[float], "eps": _FLOAT, "weight_decay": _FLOAT,
                               "amsgrad": _BOOL} for name in ("Adam", "AdamW")},
    "torch.optim.SGD": {"lr": _FLOAT, "momentum": _FLOAT, "dampening": _FLOAT, "weight_decay": _FLOAT, "nesterov": _BOOL},
    "torch.optim.lr_scheduler.LinearLR": {"start_factor": _FLOAT, "end_factor": _FLOAT, "total_iters": _INT},
    "torch.optim.lr_scheduler.ConstantLR": {"factor": _FLOAT, "total_iters": _INT},
    "torch.optim.lr_scheduler.CosineAnnealingLR": {"T_max": _INT, "eta_min": _FLOAT},
    "torch.optim.lr_scheduler.OneCycleLR": {
        "max_lr": _FLOAT, "total_steps": _INT | None, "pct_start": _FLOAT, "anneal_strategy": str,
        "cycle_momentum": _BOOL, "div_factor": _FLOAT, "final_div_factor": _FLOAT, "three_phase": _BOOL,
    },
    "torch.optim.lr_scheduler.StepLR": {"step_size": _INT, "gamma": _FLOAT},
    "torch.optim.lr_scheduler.ExponentialLR": {"gamma": _FLOAT},
}
PARTIAL = {"optimizer": True, "scheduler": True}  # groups whose nodes are factories (``_partial_: true``)

# the method arguments that are themselves nodes, and the group each must name
NODE_ARGUMENTS = {
    "net": "network", "optimizer": "optimizer", "optimizer_g": "optimizer", "optimizer_d": "optimizer",
    "optimizer_critic": "optimizer", "scheduler": "scheduler",
}
# what fewstep passes to a constructor itself: a file may not set it inside a node
CONTEXT = {"network": ("data_shape", "num_classes"), "discriminator": ("net", "data_shape", "num_classes", "sigma_data")}

MAX_ITEMS = 4096      # entries of a recorded list or mapping (a real config's longest, channel_mult, has a few)
MAX_DEPTH = 16        # nesting of a recorded value (diffusers' configs nest two levels)
MAX_STRING = 4096     # characters of a recorded string (paths, names)
MAX_CLASSES = 100_000  # labels of a conditional model (ImageNet-21k has 21,841)
MAX_ELEMENTS = 1 << 26  # values in one sample (3 x 4096 x 4096 is 50M)


class UntrustedConfig(CheckpointError):
    """A recorded configuration that fewstep does not build from a file; the message names the value and the rule."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def check_plain_data(value: Any, where: str, depth: int = 0) -> None:
    """``value`` is numbers, strings, booleans and None, in lists and string-keyed mappings, with no Hydra key."""
    if depth > MAX_DEPTH:
        raise UntrustedConfig(f"{where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        if len(value) > MAX_ITEMS:
            raise UntrustedConfig(f"{where} has {len(value)} entries (at most {MAX_ITEMS})")
        for key, item in value.items():
            if not isinstance(key, str):
                raise UntrustedConfig(f"{where} has the key {_short(key)}, which is not a string")
            if key in HYDRA_KEYS:
                raise UntrustedConfig(f"{where}.{key} is a Hydra key inside a value, which fewstep never builds from a file")
            check_plain_data(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise UntrustedConfig(f"{where} has {len(value)} items (at most {MAX_ITEMS})")
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float):
        if math.isnan(value):
            raise UntrustedConfig(f"{where} is NaN")
    elif isinstance(value, str):
        _check_string(value, where)
    elif not isinstance(value, (bool, int, type(None))):
        raise UntrustedConfig(f"{where} is a {type(value).__name__}, not a number, string, boolean, list or mapping")


def _check_string(value: str, where: str) -> None:
    if len(value) > MAX_STRING:
        raise UntrustedConfig(f"{where} is a string of {len(value)} characters (at most {MAX_STRING})")
    if "${" in value:  # an OmegaConf interpolation would be resolved (resolvers read the environment) if it were resolved
        raise UntrustedConfig(f"{where} = {_short(value)} holds an interpolation, which a recorded value never does")


def check_value(value: Any, hint: Any, where: str, default: Any = inspect.Parameter.empty) -> None:
    """``value`` is of the annotated type ``hint`` (unannotated: of ``default``'s kind, else plain data)."""
    if hint is inspect.Parameter.empty or hint is Any:
        if default is inspect.Parameter.empty or default is None:
            return check_plain_data(value, where)
        hint = type(default) if not isinstance(default, (list, tuple)) else list
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return check_value(value, arm, where, default)
            except UntrustedConfig:
                continue
        raise UntrustedConfig(f"{where} = {_short(value)} is not {' or '.join(_type_name(a) for a in args)}")
    if hint is type(None) or hint is None:
        if value is not None:
            raise UntrustedConfig(f"{where} = {_short(value)} is not None")
    elif hint is bool:
        if not isinstance(value, bool):
            raise UntrustedConfig(f"{where} = {_short(value)} is not a boolean")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise UntrustedConfig(f"{where} = {_short(value)} is not an integer")
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UntrustedConfig(f"{where} = {_short(value)} is not a number")
        infinite_default = isinstance(default, float) and math.isinf(default)  # EDM's sigma_max = inf
        if math.isnan(value) or (math.isinf(value) and not infinite_default):
            raise UntrustedConfig(f"{where} = {value} is not finite")
    elif hint is str:
        if not isinstance(value, str):
            raise UntrustedConfig(f"{where} = {_short(value)} is not a string")
        _check_string(value, where)
    elif hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise UntrustedConfig(f"{where} = {_short(value)} is not a list")
        if len(value) > MAX_ITEMS:
            raise UntrustedConfig(f"{where} has {len(value)} items (at most {MAX_ITEMS})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UntrustedConfig(f"{where} = {_short(value)} has {len(value)} items, not {len(args)}")
            item_hints = list(args)
        else:
            item_hints = [args[0] if args else Any] * len(value)
        for i, (item, item_hint) in enumerate(zip(value, item_hints)):
            check_value(item, item_hint, f"{where}[{i}]")
    elif hint in (dict, Mapping) or origin in (dict, collections.abc.Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise UntrustedConfig(f"{where} = {_short(value)} is not a mapping")
        check_plain_data(value, where)
    else:  # an annotation this checker does not know: refuse rather than guess
        raise UntrustedConfig(f"{where} is a {_type_name(hint)}, which fewstep does not read from a file")


def parameters(constructor: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) of what ``constructor`` takes by keyword, following ``**kwargs`` up the classes."""
    functions = []
    if isinstance(constructor, type):
        for klass in constructor.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            functions.append(init)
            if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
                break
    else:
        functions.append(constructor)
    found: dict[str, tuple[Any, Any]] = {}
    for function in functions:
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # an annotation that does not evaluate: the defaults decide
            hints = {}
        for name, parameter in inspect.signature(function).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or name in found:
                continue
            found[name] = (hints.get(name, parameter.annotation), parameter.default)
    return found


def node_parameters(target: str, node: Mapping) -> dict[str, tuple[Any, Any]]:
    """The arguments the node's constructor takes (edm_denoiser: also its preconditioning's and architecture's)."""
    if target in EXPLICIT_SIGNATURES:
        return {name: (hint, inspect.Parameter.empty) for name, hint in EXPLICIT_SIGNATURES[target].items()}
    constructor = resolve(target)
    found = parameters(constructor)
    if target == "fewstep.networks.edm.edm_denoiser":
        found.update(edm_parameters(node.get("precond", "EDMPrecond"), node.get("model_type"), "model"))
    return found


def edm_parameters(precond: Any, model_type: Any, where: str) -> dict[str, tuple[Any, Any]]:
    """The keyword arguments of EDM preconditioning ``precond`` around architecture ``model_type`` (as edm_denoiser
    and EDM's constructors take them), less the image shape and label count, which fewstep sets."""
    from fewstep.networks.edm import ARCHITECTURES, PRECONDITIONINGS

    if precond not in PRECONDITIONINGS:
        raise UntrustedConfig(f"{where}.precond = {_short(precond)} is not one of {', '.join(PRECONDITIONINGS)}")
    cls = PRECONDITIONINGS[precond]
    found = parameters(cls)
    if model_type is None:
        model_type = found["model_type"][1]
    if model_type not in ARCHITECTURES:
        raise UntrustedConfig(f"{where}.model_type = {_short(model_type)} is not one of {', '.join(ARCHITECTURES)}")
    found.update({k: v for k, v in parameters(ARCHITECTURES[model_type]).items() if k not in found})
    for fixed in ("img_resolution", "img_channels", "in_channels", "out_channels", "label_dim", "model_kwargs"):
        found.pop(fixed, None)
    return found


def check_node(node: Any, group: str, where: str) -> dict:
    """``node`` as a plain dict, if it names one of ``group``'s constructors exactly and gives it typed arguments."""
    node = plain(node, resolve=False)
    table = GROUPS[group]
    if not isinstance(node, Mapping):
        raise UntrustedConfig(f"{where} = {_short(node)} is not a {group} config (a mapping with _target_)")
    target = node.get("_target_")
    if target not in table:
        names = sorted({name.rpartition(".")[2] for name in table})
        raise UntrustedConfig(
            f"{where}._target_ = {_short(target)} is not one of the {group}s fewstep builds from a file "
            f"({', '.join(names)}), named exactly"
        )
    partial = node.get("_partial_", False)
    if partial is not PARTIAL.get(group, False):
        raise UntrustedConfig(f"{where}._partial_ = {_short(partial)}: a recorded {group} config has _partial_: "
                              f"{str(PARTIAL.get(group, False)).lower()}")
    known = node_parameters(target, node)
    for key, value in node.items():
        if key in ("_target_", "_partial_"):
            continue
        if key in HYDRA_KEYS or key in CONTEXT.get(group, ()):
            raise UntrustedConfig(f"{where}.{key} is set by fewstep, never by a file")
        if key not in known:
            raise UntrustedConfig(f"{where}.{key} is not an argument of {target}")
        hint, default = known[key]
        check_value(value, hint, f"{where}.{key}", default)
    return dict(node)


def check_discriminator(config: Any, where: str) -> None:
    """A GDD discriminator: ``{kind: teacher_encoder|timm|conv, **options}`` or one of DISCRIMINATORS by exact name."""
    from fewstep.networks.discriminators import DISCRIMINATORS as KINDS

    config = plain(config, resolve=False)
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise UntrustedConfig(f"{where} = {_short(config)} is not a mapping")
    if "_target_" in config:
        check_node(config, "discriminator", where)
        return
    kind = config.get("kind", "teacher_encoder")
    if kind not in KINDS:
        raise UntrustedConfig(f"{where}.kind = {_short(kind)} is not one of {', '.join(KINDS)}")
    known = parameters(KINDS[kind])
    for key, value in config.items():
        if key == "kind":
            continue
        if key in HYDRA_KEYS or key in CONTEXT["discriminator"] or key not in known:
            raise UntrustedConfig(f"{where}.{key} is not an option of the {kind} discriminator")
        hint, default = known[key]
        check_value(value, hint, f"{where}.{key}", default)


def check_shape(data_shape: Any, num_classes: Any, where: str) -> None:
    """A data shape of 1-3 positive sizes with at most MAX_ELEMENTS values, and a label count in [0, MAX_CLASSES]."""
    check_value(data_shape, list[int], f"{where}.data_shape")
    elements = math.prod(data_shape) if data_shape else 0
    if not 1 <= len(data_shape) <= 3 or min(data_shape) < 1 or elements > MAX_ELEMENTS:
        raise UntrustedConfig(
            f"{where}.data_shape = {_short(data_shape)} is not 1-3 positive sizes of at most {MAX_ELEMENTS} values"
        )
    check_value(num_classes, int, f"{where}.num_classes")
    if not 0 <= num_classes <= MAX_CLASSES:
        raise UntrustedConfig(f"{where}.num_classes = {num_classes} is not in [0, {MAX_CLASSES}]")


def check_hyperparameters(cls: type, hyperparameters: Any, where: str = "hyper_parameters") -> dict:
    """A method's recorded constructor arguments, each checked against ``cls``'s signature; returned as plain dicts."""
    hyperparameters = plain(hyperparameters, resolve=False)
    if not isinstance(hyperparameters, Mapping):
        raise UntrustedConfig(f"{where} is a {type(hyperparameters).__name__}, not a mapping")
    known = parameters(cls)
    for key, value in hyperparameters.items():
        if not isinstance(key, str) or key not in known:
            raise UntrustedConfig(f"{where}.{key} is not an argument of {cls.__name__}")
        hint, default = known[key]
        if key in NODE_ARGUMENTS:
            if value is not None or key == "net":
                check_node(value, NODE_ARGUMENTS[key], f"{where}.{key}")
        elif key == "discriminator":
            check_discriminator(value, f"{where}.{key}")
        else:
            check_value(value, hint, f"{where}.{key}", default)
    for required in ("net", "data_shape"):
        if required not in hyperparameters:
            raise UntrustedConfig(f"{where} has no '{required}'")
    check_shape(hyperparameters["data_shape"], hyperparameters.get("num_classes", 0), where)
    return dict(hyperparameters)


def check_edm_arguments(path: str | Path, class_name: str, init_args: Any, init_kwargs: Any) -> dict:
    """The constructor arguments an EDM file records for ``class_name``, by name, each checked: the network is then
    built by fewstep's class with these plain values (a tuple becomes a list, a numpy number a Python one)."""
    edm = importlib.import_module("fewstep.networks.edm")  # (tests put a registry of their own in its place)

    EDM_CLASSES, PRECONDITIONINGS = edm.EDM_CLASSES, getattr(edm, "PRECONDITIONINGS", {})
    try:
        cls = EDM_CLASSES[class_name]
        bound = recorded_arguments(cls, class_name, init_args, init_kwargs)
        bound = {**{k: v for k, v in bound.items() if k != "model_kwargs"}, **bound.get("model_kwargs", {})}
        if class_name in PRECONDITIONINGS:
            known = edm_parameters(class_name, bound.get("model_type"), class_name)
            fixed = {"img_resolution": int, "img_channels": int, "label_dim": int}
        else:
            known = {k: v for k, v in parameters(cls).items()}
            fixed = {"img_resolution": int, "in_channels": int, "out_channels": int, "label_dim": int}
        check_arguments(class_name, bound, known, fixed)
        return bound
    except UntrustedConfig as error:
        raise UntrustedConfig(one_line(f"refusing '{path}': {error}; fewstep builds EDM's networks only from plain, "
                                       "typed constructor arguments")) from None


def recorded_arguments(cls, class_name: str, init_args: Any, init_kwargs: Any) -> dict:
    """A constructor call recorded in an EDM or EDM2 file, bound by name to ``cls``'s signature, as plain values."""
    if not isinstance(init_args, (list, tuple)) or not isinstance(init_kwargs, Mapping):
        raise UntrustedConfig("its recorded arguments are not a list and a mapping")
    args = [_edm_plain(v) for v in init_args]
    kwargs = {str(k): _edm_plain(v) for k, v in init_kwargs.items()}
    try:
        return dict(inspect.signature(cls).bind(*args, **kwargs).arguments)
    except TypeError as error:
        raise UntrustedConfig(f"its arguments do not fit {class_name} ({error})") from None


def check_arguments(class_name: str, arguments: dict, known: dict, fixed: dict) -> None:
    """Each recorded argument of ``class_name`` is a dimension named in ``fixed`` (an int in [0, 65536]) or a parameter
    of ``known`` ({name: (type hint, default)}) of its type."""
    for key, value in arguments.items():
        if key in fixed:
            check_value(value, fixed[key], f"{class_name}.{key}")
            if not 0 <= value <= 65536:
                raise UntrustedConfig(f"{class_name}.{key} = {value} is out of range")
        elif key not in known:
            raise UntrustedConfig(f"{class_name}.{key} is not an argument of fewstep's {class_name}")
        else:
            check_value(value, known[key][0], f"{class_name}.{key}", known[key][1])


def _edm_plain(value: Any, depth: int = 0) -> Any:
    """A recorded EDM argument as plain Python: tuples as lists, numpy numbers as numbers, the rest unchanged."""
    if depth > MAX_DEPTH:  # also a list that contains itself
        raise UntrustedConfig(f"its arguments nest deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        return [_edm_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _edm_plain(v, depth + 1) for k, v in value.items()}
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # a numpy scalar (the unpickler allows no arrays)
        return value.item()
    return value


