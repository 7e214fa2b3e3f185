"""Lightning's FSDP strategy, on GPUs and also on CPU processes (gloo), so that sharded runs can be tested anywhere."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from lightning.pytorch import strategies
from lightning.pytorch.strategies.fsdp import _get_full_state_dict_context
from torch.distributed.fsdp import FullyShardedDataParallel

from fewstep.checkpoints import read_checkpoint
from fewstep.errors import ConfigError


class FSDPStrategy(strategies.FSDPStrategy):
    """``lightning.pytorch.strategies.FSDPStrategy`` that also runs with ``accelerator=cpu``.

    Lightning refuses FSDP without a GPU, and passes FSDP a device index that a CPU lacks; torch's FSDP
    itself shards over gloo on CPU processes once given ``device_id=cpu``. So here the CPU case is
    wrapped with that device, and the rest is Lightning's, except the optimiser state of a full
    checkpoint, which stays keyed by parameter name so that a resumed run gets it back.

    With ``use_orig_params=false`` (the profile's) every parameter must be trainable; torch 2.14's FSDP
    with ``use_orig_params=true`` trains correctly but restored Adam's moments wrongly on resume in our
    CPU test, so methods with frozen parameters are refused here rather than resumed wrongly.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        trainable = {p.requires_grad for p in model.parameters()}
        if len(trainable) > 1 and not self.kwargs.get("use_orig_params"):
            raise ConfigError(
                "trainer=fsdp: this method has frozen parameters beside trainable ones (a target network, frozen "
                "layers), which FSDP shards only with trainer.strategy.use_orig_params=true, and with that torch's "
                "FSDP does not restore the optimiser state exactly on resume: use trainer=ddp for this method"
            )
        if self.root_device.type == "cpu" and not isinstance(model, FullyShardedDataParallel):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
            )
        return super()._setup_model(model)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        # Lightning reads a full FSDP checkpoint with its own lazy unpickler, which would run whatever the file
        # names: the weights-only read first refuses such a file, in one line.
        path = Path(checkpoint_path)
        if path.is_file():
            read_checkpoint(path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)

    def optimizer_state(self, optimizer) -> dict:
        # Lightning re-keys a full optimiser state by parameter index for the checkpoint, and by name again on load,
        # which fails for FSDP's flattened parameters; keyed by name, FSDP loads it straight back (bit for bit:
        # tests/test_trainers.py resumes a sharded run).
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        with _get_full_state_dict_context(self.model, world_size=self.world_size):
            return FullyShardedDataParallel.optim_state_dict(self.model, optimizer)


def full_weights(trainer) -> contextlib.AbstractContextManager:
    """Every parameter whole on every rank, for code that calls the network outside FSDP's forward (sampling).

    FSDP keeps only a shard of each parameter between forward passes; elsewhere (DDP, one device) nothing to do.
    """
    model = getattr(trainer.strategy, "model", None)
    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()
