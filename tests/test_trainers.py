"""Trainer profiles: cpu, gpu, ddp, fsdp and debug compose, shard the data themselves, and fail in one line without a GPU."""

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

from fewstep.cli import CONF_DIR
from fewstep.errors import ConfigError
from fewstep.train import train

PROFILES = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_trainer_profile_leaves_the_data_order_to_the_resumable_sampler(compose_cfg, profile):
    cfg = compose_cfg("train", [f"trainer={profile}"])
    # Lightning's DistributedSampler would reshuffle per epoch and restart the order on resume
    assert cfg.trainer.use_distributed_sampler is False


def test_fsdp_profile_shards_every_gpu_keeps_full_checkpoints_and_turns_ema_off(compose_cfg):
    cfg = compose_cfg("train", ["trainer=fsdp"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert cfg.trainer.strategy.state_dict_type == "full"  # one file that fewstep.sample and resume=auto read
    assert cfg.callbacks.get("ema") is None  # Lightning's weight averaging cannot average sharded weights
    assert cfg.callbacks.model_checkpoint is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("profile", ["gpu", "ddp", "fsdp"])
def test_a_gpu_profile_without_cuda_fails_in_one_line_naming_the_cpu_choices(compose_cfg, profile):
    with pytest.raises(ConfigError, match="needs a CUDA GPU .* use trainer=cpu, or trainer.devices=2 trainer.strategy=ddp") as error:
        train(compose_cfg("train", [f"trainer={profile}", "data=digits"]))
    assert "\n" not in str(error.value)


def test_compile_true_compiles_the_network_in_place_and_its_checkpoint_loads_into_an_eager_one(compose_cfg, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    train(compose_cfg("train", ["data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64",
                                "data.val_size=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "trainer.limit_val_batches=1", "callbacks.sample_grid.nfe=2", "logger=csv",
                                "compile=true"]))
    assert compiled == ["UNet"]  # the method's network, once


@pytest.mark.slow
def test_a_compiled_run_trains_and_its_checkpoint_samples_without_compiling(compose_cfg, tmp_path):
    from fewstep.checkpoints import load_method
    from fewstep.generate import generate

    train(compose_cfg("train", ["data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64",
                                "data.val_size=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "trainer.limit_val_batches=1", "callbacks.sample_grid.nfe=2", "logger=csv",
                                "compile=true"]))
    method = load_method(tmp_path / "checkpoints" / "last.ckpt")
    samples, _, _ = generate(method, 2, "euler", 2)
    assert torch.isfinite(samples).all()
