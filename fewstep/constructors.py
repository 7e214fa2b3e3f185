"""The constructors a config may name by string, by exact name, and ``build``, which calls them.

fewstep's networks, data modules and discriminators, and torch's optimisers and schedulers: the only classes a
file may ask for (``fewstep.schema`` checks a file's nodes against these tables and the constructors'
signatures). ``build`` makes the object a node describes: an entry of the tables from fewstep's own import of it,
anything else (a class of the user's own config) through Hydra.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# recorded name (exact) -> (module, attribute) that fewstep imports for it
NETWORKS = {
    "fewstep.networks.UNet": ("fewstep.networks.unet", "UNet"),
    "fewstep.networks.unet.UNet": ("fewstep.networks.unet", "UNet"),
    "fewstep.networks.MLP": ("fewstep.networks.mlp", "MLP"),
    "fewstep.networks.mlp.MLP": ("fewstep.networks.mlp", "MLP"),
    "fewstep.networks.edm.edm_denoiser": ("fewstep.networks.edm", "edm_denoiser"),
    "fewstep.networks.edm2.edm2_denoiser": ("fewstep.networks.edm2", "edm2_denoiser"),
    "fewstep.external.diffusers.DiffusersDenoiser": ("fewstep.external.diffusers", "DiffusersDenoiser"),
}
OPTIMIZERS = {f"torch.optim.{name}": ("torch.optim", name) for name in ("Adam", "AdamW", "SGD")}
SCHEDULERS = {
    f"torch.optim.lr_scheduler.{name}": ("torch.optim.lr_scheduler", name)
    for name in ("LinearLR", "ConstantLR", "CosineAnnealingLR", "OneCycleLR", "StepLR", "ExponentialLR")
}
SCHEDULERS["fewstep.lr_schedules.InverseSqrtLR"] = ("fewstep.lr_schedules", "InverseSqrtLR")  # EDM2's decay
DATA = {
    **{f"fewstep.data.{name}": ("fewstep.data", name)
       for name in ("MNIST5k", "Digits", "FashionMNIST", "CIFAR10", "ImageFolder", "EDMZip", "GMMDataModule")},
    **{f"fewstep.data.images.{name}": ("fewstep.data.images", name)
       for name in ("MNIST5k", "Digits", "FashionMNIST", "CIFAR10", "ImageFolder")},
    "fewstep.data.edm_zip.EDMZip": ("fewstep.data.edm_zip", "EDMZip"),
    "fewstep.data.gmm.GMMDataModule": ("fewstep.data.gmm", "GMMDataModule"),
}
DISCRIMINATORS = {
    f"fewstep.networks.discriminators.{name}": ("fewstep.networks.discriminators", name)
    for name in ("TeacherEncoderDiscriminator", "TimmDiscriminator", "ConvDiscriminator")
}
GROUPS = {"network": NETWORKS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "data": DATA,
          "discriminator": DISCRIMINATORS}


def buildable(target: Any) -> tuple[str, str] | None:
    """The (module, attribute) that the exact name ``target`` stands for in any group, or None."""
    return next((table[target] for table in GROUPS.values() if isinstance(target, str) and target in table), None)


def register(group: str, constructor: Any) -> None:
    """Let files name ``constructor`` (a network, data module, ... of your own) in ``group`` by its exact qualified name;
    its arguments are then checked against its signature's annotations like fewstep's own."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}: one of {', '.join(GROUPS)}")
    GROUPS[group][f"{constructor.__module__}.{constructor.__qualname__}"] = (constructor.__module__, constructor.__qualname__)


HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def plain(value: Any, resolve: bool = True) -> Any:
    """``value`` with every OmegaConf node, at any depth, as plain dicts and lists: what checkpoints hold (a weights-only
    load accepts nothing else). ``resolve=False`` keeps interpolations as strings, for checking what a file says."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=resolve)
    if isinstance(value, dict):
        return {key: plain(item, resolve) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item, resolve) for item in value)
    return value


def resolve(target: str) -> Any:
    """The constructor ``target`` names: from the tables by exact name, else (a user's own config) through Hydra."""
    entry = buildable(target)
    if entry is not None:
        module, attribute = entry
        return functools.reduce(getattr, attribute.split("."), importlib.import_module(module))
    from hydra.utils import get_object

    return get_object(target)


def build(node: Any, **context: Any) -> Any:
    """The object ``node`` describes, with ``context`` (data shape, label count, ...) added to its arguments.

    A node that names an entry of the tables is built here from its plain values; any other comes from the user's own
    config (files are checked with ``check_node`` before they get here) and is built by Hydra.
    """
    node = plain(node)  # the user's config: its interpolations resolve
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if buildable(target) is None:
        from hydra.utils import instantiate

        return instantiate(node, **context)
    arguments = {key: value for key, value in node.items() if key not in HYDRA_KEYS}
    constructor = resolve(target)
    if node.get("_partial_", False):
        return functools.partial(constructor, **arguments, **context)
    return constructor(**arguments, **context)
