"""Builders and settings shared by the test modules: tiny configs, tiny randomised methods, and running an entry
point as a user would. Fixtures and hooks live in conftest.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Small settings that every training test adds, so one test takes seconds.
TINY = ["model=unet_tiny", "trainer=debug", "data.batch_size=8", "data.limit=64", "data.val_size=16"]

# A UNet of a few thousand parameters over 1 x 8 x 8 images.
UNET = {"_target_": "fewstep.networks.UNet", "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}
SHAPE = [1, 8, 8]
# DDIL with each source of training states weighted alike, reflection on.
DDIL = {"b_fwd": 1.0, "b_teacher": 1.0, "b_student": 1.0, "reflect": True}
# A tiny MLP for vector data, and a Kac method over it.
MLP = {"_target_": "fewstep.networks.MLP", "width": 16, "depth": 1}


def randomize(module, seed: int = 0, scale: float = 0.2):
    """Perturb every parameter, so that zero-initialised layers are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


def teacher(seed: int = 0, scale: float = 0.2, **kwargs):
    """A randomised EDM teacher over UNET and SHAPE."""
    from fewstep.methods import EDMTeacher  # here: conftest imports this module, and lightning takes seconds to import

    return randomize(EDMTeacher(net=UNET, data_shape=SHAPE, **kwargs), seed, scale)


def student(cls, teacher_=None, **kwargs):
    """A ``cls`` student over UNET and SHAPE with ``teacher_`` (a fresh ``teacher()`` if None) attached."""
    method = cls(net=UNET, data_shape=SHAPE, **kwargs)
    method.attach_teacher(teacher_ or teacher())
    return method


def kac_model(cls=None, dim: int = 2, **kwargs):
    """A ``cls`` (KacTeacher if None) over MLP and ``dim``-dimensional data."""
    from fewstep.methods import KacTeacher

    return (cls or KacTeacher)(net=MLP, data_shape=[dim], **kwargs)


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def kill_after_checkpoint(command: list[str], run_dir: Path, cwd: Path, env: dict, step: int = 4) -> None:
    """Run ``command`` (a training run into ``run_dir``) and SIGKILL it once its checkpoint of ``step`` exists."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / f"step_{step:07d}.ckpt").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def fit_to_mixture(method, law, steps: int, lr: float = 3e-3, batch: int = 256, betas=(0.9, 0.999)) -> None:
    """Train ``method`` on draws of the Gaussian mixture ``law`` for ``steps`` Adam steps (one-cycle schedule), then eval()."""
    from fewstep.methods import BatchNoise

    optimizer = torch.optim.Adam(method.parameters(), lr=lr, betas=betas)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        loss = method.loss(law.sample(batch, generator)[0].float(), None, BatchNoise.for_step(0, step, batch, "cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    method.eval()


def exact_flow_euler_samples(law, nfe: int, n: int) -> torch.Tensor:
    """Euler from t = 1 to 0 in ``nfe`` steps on the exact velocity of the linear interpolant x_t = (1 - t) x0 + t n
    of the mixture ``law`` (a perfect flow teacher), in float64."""
    x = torch.randn(n, law.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = torch.linspace(1, 0, nfe + 1, dtype=torch.float64).tolist()
    for t, r in zip(grid[:-1], grid[1:]):
        t = min(t, 1 - 1e-9)
        denoised = law.denoiser(x / (1 - t), torch.full((n,), t / (1 - t), dtype=torch.float64))
        x = x - (t - r) * (x - denoised) / t
    return x.float()
