"""A run's saved configuration (``.hydra/config.yaml``), read as data: the few fields fewstep needs, checked.

``fewstep.evaluate`` takes the data set a checkpoint was trained on from its run's saved config (``training_config``),
and a distillation run looks for a finished teacher among earlier runs' configs (``fewstep.layout`` says where).
Such a file may have been written by anyone: it is parsed as YAML without aliases and within a size limit, and
only its ``data`` node (checked like a checkpoint's nodes by ``fewstep.schema``), ``model``, ``method.conditional``,
``trainer.max_steps`` and ``debug`` are kept. The data set is built by ``build_data`` from fewstep's own table, never by
Hydra from the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from fewstep import layout
from fewstep.checkpoints import EDM_SUFFIXES
from fewstep.constructors import build
from fewstep.errors import CheckpointError, ConfigError, one_line
from fewstep.schema import UntrustedConfig, check_node, check_plain_data, check_value

MAX_BYTES = 1 << 20  # a saved run config is a few KB


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors and aliases: Hydra never writes them, and nested aliases expand exponentially."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.YAMLError("an alias (*name), which a saved run config never holds")
        return super().compose_node(parent, index)


def read_run_config(path: str | Path) -> DictConfig:
    """The checked fields of the run config at ``path``, or a one-line CheckpointError naming the file and the field."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UntrustedConfig(f"it is {size:,} bytes, more than a run config's {MAX_BYTES:,}")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliases)  # noqa: S506 (a SafeLoader)
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
            raise UntrustedConfig(f"it is not a YAML run config ({type(error).__name__}: {one_line(error)[:120]})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise UntrustedConfig("it has no 'data' section")
        fields = {"data": check_node(raw["data"], "data", "data")}
        model = raw.get("model")
        if model is not None:  # compared with the user's own model config, never built
            if not isinstance(model, dict):
                raise UntrustedConfig("its 'model' section is not a mapping")
            check_value(model.get("_target_"), str, "model._target_")
            check_plain_data({key: value for key, value in model.items() if key != "_target_"}, "model")
            fields["model"] = model
        method, trainer = raw.get("method") or {}, raw.get("trainer") or {}
        if not isinstance(method, dict) or not isinstance(trainer, dict):
            raise UntrustedConfig("its 'method' or 'trainer' section is not a mapping")
        fields["method"] = {"conditional": method.get("conditional", False)}
        check_value(fields["method"]["conditional"], bool, "method.conditional")
        fields["trainer"] = {"max_steps": trainer.get("max_steps", -1)}
        check_value(fields["trainer"]["max_steps"], int, "trainer.max_steps")
        fields["debug"] = raw.get("debug", False)
        check_value(fields["debug"], bool | None, "debug")
    except OSError as error:
        raise CheckpointError(f"cannot read run config '{path}' ({error.strerror or error})") from None
    except UntrustedConfig as error:
        raise CheckpointError(one_line(
            f"refusing run config '{path}': {error}; fewstep reads a saved config as data (a data set it knows, "
            "plain values): pass data_config=PATH to a config fewstep wrote, or ref=PATH.npz"
        )) from None
    return OmegaConf.create(fields)


def build_data(node):
    """The data module of a checked ``data`` node (``read_run_config``), built from fewstep's own table."""
    return build(node)


def training_config(ckpt: str | Path, data_config: str | Path | None = None, required: bool = True) -> DictConfig | None:
    """The checked config of the run that wrote ``ckpt``: ``data_config``, or its run's saved config.

    Not ``required`` (the real statistics come from ref=), a missing one is None.
    """
    run = layout.run_of_checkpoint(ckpt)
    path = Path(data_config) if data_config else layout.saved_config(run or Path(ckpt).resolve().parent.parent)
    if not path.is_file():
        if not required:
            return None
        if Path(ckpt).is_dir() or Path(ckpt).suffix in EDM_SUFFIXES:
            raise ConfigError(
                f"'{ckpt}' comes from outside fewstep and has no training config: pass ref=PATH.npz (reference "
                "statistics: EDM's fid-refs file, or python -m fewstep.fid_reference data=... out=PATH.npz) with "
                "metric=fid, or data_config=PATH to a fewstep run's .hydra/config.yaml naming the data"
            )
        raise ConfigError(
            f"no training config at '{path}': pass data_config=PATH to the .hydra/config.yaml of the run "
            "that wrote the checkpoint, so that the reference images come from its data set"
        )
    return read_run_config(path)
