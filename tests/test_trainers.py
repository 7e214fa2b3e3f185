"""Trainer profiles: they compose, shard the data themselves and fail in one line without a GPU; FSDP on CPU processes
matches one process, resumes and samples; compile=true."""

import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

from fewstep.checkpoints import load_method, read_checkpoint
from fewstep.cli import CONF_DIR
from fewstep.errors import ConfigError
from fewstep.generate import generate
from fewstep.train import train

from helpers import REPO

PROFILES = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
TINY_RUN = [
    "data=digits", "model=unet_tiny", "data.limit=64", "data.val_size=16", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "callbacks.sample_grid.n=4", "callbacks.sample_grid.nfe=2", "logger=csv", "seed=3",
]


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
    train(compose_cfg("train", ["data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64",
                                "data.val_size=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "trainer.limit_val_batches=1", "callbacks.sample_grid.nfe=2", "logger=csv",
                                "compile=true"]))
    method = load_method(tmp_path / "checkpoints" / "last.ckpt")
    samples, _, _ = generate(method, 2, "euler", 2)
    assert torch.isfinite(samples).all()


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process_resumes_and_samples(tmp_path):
    def run(name, *extra):
        result = subprocess.run(
            [sys.executable, "-m", "fewstep.train", *TINY_RUN, f"hydra.run.dir={tmp_path / name}", *extra],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")

    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "data.batch_size=4"]
    one = ["callbacks.ema=null", "data.batch_size=8"]  # the fsdp profile has no EMA
    for steps in (4, 6):  # then resume=auto for two more steps: the sharded optimiser state comes back
        a = run("one", *one, f"trainer.max_steps={steps}", "resume=auto")
        b = run("fsdp", *fsdp, f"trainer.max_steps={steps}", "resume=auto")
        assert a["global_step"] == b["global_step"] == steps
        assert a["state_dict"].keys() == b["state_dict"].keys()  # one full file, under the usual names
        for key, value in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert list((tmp_path / "fsdp").rglob("samples/step_0000006.png"))  # sampling with the sharded weights gathered
    samples, _, _ = generate(load_method(tmp_path / "fsdp" / "checkpoints" / "last.ckpt"), 2, "euler", 2)
    assert torch.isfinite(samples).all()


def test_fsdp_refuses_frozen_parameters_beside_trainable_ones_in_one_line():
    from fewstep.strategies import FSDPStrategy

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ConfigError, match="frozen parameters beside trainable ones .* use trainer=ddp") as error:
        FSDPStrategy(use_orig_params=False)._setup_model(model)
    assert "\n" not in str(error.value)
