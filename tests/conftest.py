"""Shared fixtures (the Hydra config tree composed as the entry points do it, a tiny trained teacher) and hooks.
Shared builders and settings are in helpers.py."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fewstep.cli import CONF_DIR

from helpers import run_module


def pytest_configure(config):
    # One intra-op thread: the test networks are tiny, and with 2 threads on 2 shared cores a busy machine
    # makes them up to ~100x slower (OpenMP threads spinning against each other).
    torch.set_num_threads(1)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(config_name, overrides) -> DictConfig with outputs in tmp_path."""

    def _compose(config_name: str = "train", overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=[f"paths.output_dir={tmp_path}", *overrides])

    yield _compose
    GlobalHydra.instance().clear()


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


def pytest_terminal_summary(terminalreporter):
    """After a run that left the slow tests out, say how to run them."""
    slow = [item for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow")]
    if slow:
        terminalreporter.write_line(f"{len(slow)} slow tests deselected: python -m pytest -q -m slow runs them (CI runs both sets)")
