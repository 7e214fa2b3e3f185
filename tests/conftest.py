"""Shared fixtures: composing the Hydra config tree the way the entry points do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fewstep.cli import CONF_DIR

# One intra-op thread: the test networks are tiny, and with 2 threads on 2 shared cores a busy machine
# makes them up to ~100x slower (OpenMP threads spinning against each other).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# Small settings that every training test adds, so one test takes seconds.
TINY = ["model=unet_tiny", "trainer=debug", "data.batch_size=8", "data.limit=64", "data.val_size=16"]


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(config_name, overrides) -> DictConfig with outputs in tmp_path."""

    def _compose(config_name: str = "train", overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=[f"paths.output_dir={tmp_path}", *overrides])

    yield _compose
    GlobalHydra.instance().clear()


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(run root, last.ckpt) of a 2-step unet_tiny EDM teacher on digits, trained once per test session as a user
    would (its run directory, .hydra/config.yaml included, lies under root/outputs)."""
    root = tmp_path_factory.mktemp("tiny_teacher")
    result = run_module(
        "fewstep.train", "data=digits", "model=unet_tiny", "trainer.max_steps=2", "trainer.limit_val_batches=0",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (last,) = root.glob("outputs/edm_teacher/digits/*/checkpoints/last.ckpt")
    return root, last
