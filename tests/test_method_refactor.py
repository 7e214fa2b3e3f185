"""Every method, with and without DDIL, trains to the weights it trained to before its setup was shared: 3 steps of
each from fixed seeds and a fixed batch give the state_dicts stored in fixtures/method_weights_before.pt.

Rewrite the fixture (only when a change of training is meant), from the repository root:
PYTHONPATH=. python tests/test_method_refactor.py
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fewstep.checkpoints import method_class
from fewstep.data.rollout import RolloutStates
from fewstep.errors import CheckpointError
from fewstep.methods import METHODS, GenerativeMethod, register_method
from fewstep.methods.base import DenoiserMethod
from fewstep.methods.student import DistilledStudent

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "method_weights_before.pt"
NET = {"_target_": "fewstep.networks.UNet", "model_channels": 4, "channel_mult": [1], "num_res_blocks": 1, "attn_levels": []}
SHAPE = [1, 8, 8]
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
DDIL = {"b_fwd": 0.5, "b_teacher": 0.25, "b_student": 0.25, "reflect": False}  # ddil=default's weights
STUDENTS = ("progressive", "consistency", "dmd2")  # the methods that take DDIL
OPTIONS = {  # each method's settings beyond the network, small enough for 3 quick steps
    "edm_teacher": {"optimizer": ADAM},
    "flow_teacher": {"optimizer": ADAM},
    "kac_teacher": {"optimizer": ADAM},
    "gdd": {"discriminator": {"kind": "teacher_encoder", "head_channels": 4}, "r1_interval": 2},
    "kac_endpoint": {"optimizer": ADAM, "student_steps": 2, "teacher_steps": 4, "rollout_share": 0.5},
    "progressive": {"optimizer": ADAM, "student_steps": 2},
    "consistency": {"optimizer": ADAM, "teacher_steps": 4, "skip": 1, "sample_steps": 2},
    "dmd2": {"optimizer": ADAM, "student_steps": 2, "critic_steps": 2, "head_channels": 4},
}
CASES = [*OPTIONS, *(f"{name}+ddil" for name in STUDENTS)]


class TinyData(L.LightningDataModule):
    """12 fixed images in [-1, 1], in order, batches of 4: 3 steps are one epoch."""

    def __init__(self):
        super().__init__()
        x = torch.rand(12, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.dataset = TensorDataset(x, torch.zeros(12, dtype=torch.long))

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=4, shuffle=False)


@contextlib.contextmanager
def isolated():
    """Seeds, one thread and deterministic algorithms for one training run; the process's settings back afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    env = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")}
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def teacher_of(cls):
    """A fixed-seed, perturbed tiny teacher of the kind ``cls`` distils, or None."""
    kind = getattr(cls, "teacher_kind", None)
    if kind is None:
        return None
    teacher = (METHODS["kac_teacher"][0] if kind is METHODS["kac_teacher"][0] else METHODS["edm_teacher"][0])(
        net=NET, data_shape=SHAPE
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return teacher


def trained_weights(case: str) -> dict[str, torch.Tensor]:
    """The state_dict of ``case`` (a METHODS name, ``+ddil`` for DDIL on) after 3 training steps on TinyData."""
    name, _, ddil = case.partition("+")
    cls = METHODS[name][0]
    with isolated():
        L.seed_everything(0, verbose=False)
        options = {**OPTIONS[name], **({"ddil": DDIL} if ddil else {})}
        method = cls(net=NET, data_shape=SHAPE, **options)
        teacher = teacher_of(cls)
        if teacher is not None:
            method.attach_teacher(teacher)
        data = TinyData()
        if ddil:
            data = RolloutStates(data, size=16, refresh_every=2, refresh_size=2)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on workers, validation and eval-mode modules
            trainer.fit(method, datamodule=data)
    return {key: value.detach().clone() for key, value in method.state_dict().items()}


def write_fixture() -> None:
    weights = {f"{case}/{key}": value for case in CASES for key, value in trained_weights(case).items()}
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save(weights, FIXTURE)
    print(f"wrote {len(weights)} tensors to {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB)")


@pytest.fixture(scope="module")
def before() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_three_steps_give_the_weights_they_gave_before(case, before):
    weights = trained_weights(case)
    stored = {key.partition("/")[2]: value for key, value in before.items() if key.partition("/")[0] == case}
    assert weights.keys() == stored.keys()
    for key, value in weights.items():
        if case.startswith("dmd2"):  # DMD2 on the fake-score engine: bit for bit what it trained to before the engine
            assert torch.equal(value, stored[key]), f"{case} {key}: not bit-identical"
        else:
            torch.testing.assert_close(value, stored[key], atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{case} {key}: {m}")


# -- one registry ----------------------------------------------------------------------------------------------


@pytest.fixture
def registry():
    """METHODS, as it was again after the test."""
    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


def test_the_method_configs_are_the_methods_of_the_registry():
    configs = {path.stem for path in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml")}
    assert configs == set(METHODS)


def named(cls) -> dict:
    return {"fewstep": {"method_class": f"{cls.__module__}.{cls.__qualname__}"}}


def test_a_checkpoint_may_name_exactly_the_registered_methods(registry):
    for cls, paper in METHODS.values():
        assert method_class(named(cls)) is cls and paper
    for cls in (GenerativeMethod, DenoiserMethod, DistilledStudent):  # shared machinery, not methods
        with pytest.raises(CheckpointError, match="not a fewstep method"):
            method_class(named(cls))

    class Mine(DistilledStudent):
        pass

    with pytest.raises(CheckpointError, match="register_method"):
        method_class(named(Mine))
    register_method("mine", Mine, "a test's own student")
    assert method_class(named(Mine)) is Mine and METHODS["mine"] == (Mine, "a test's own student")
    with pytest.raises(ValueError, match="'mine' is"):
        register_method("mine", DistilledStudent, "another")
    with pytest.raises(ValueError, match="GenerativeMethod"):
        register_method("plain", torch.nn.Linear, "not a method")


if __name__ == "__main__":
    write_fixture()
