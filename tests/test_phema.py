"""Post-hoc EMA (EDM2, Karras et al. 2024): the power-function profiles and EDM2's least-squares reconstruction, the
callback that tracks the EMAs and writes their snapshots (atomically, resumed bit for bit), and
``python -m fewstep.phema``, whose checkpoints load like any other."""

from __future__ import annotations

import subprocess
import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from fewstep.callbacks import PowerFunctionEMA
from fewstep.checkpoints import AtomicCheckpointIO, load_method, read_checkpoint
from fewstep.errors import CheckpointError, ConfigError
from fewstep.methods import EDMTeacher
from fewstep.phema import (
    gamma_to_sigma_rel,
    main,
    posthoc_coefficients,
    profile,
    profile_error,
    profile_inner,
    read_snapshots,
    reconstruct,
    reconstruct_run,
    save_snapshot,
    sigma_rel_to_gamma,
)

from helpers import REPO, kill_after_checkpoint

NET = {"_target_": "fewstep.networks.UNet", "model_channels": 4, "channel_mult": [1], "num_res_blocks": 1, "attn_levels": []}
SHAPE = [1, 8, 8]
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}
TRACKED = [0.05, 0.10]


# -- the maths -----------------------------------------------------------------------------------------------------------
def test_sigma_rel_and_gamma_convert_both_ways_and_give_edm2s_exponents():
    sigma_rel = np.geomspace(1e-3, 0.2886, 40)
    np.testing.assert_allclose(gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)), sigma_rel, rtol=1e-12)
    gamma = np.array([0.0, 0.5, 1.0, 6.94, 16.97, 100.0, 1000.0])
    np.testing.assert_allclose(sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)), gamma, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=5e-3)  # the paper's values
    for bad in (0.0, -0.1, 0.29, 1.0):
        with pytest.raises(ConfigError, match="outside EDM2's range"):
            sigma_rel_to_gamma(bad)


def test_the_closed_form_inner_products_are_the_integrals_of_the_profiles():
    for (t_a, s_a), (t_b, s_b) in [((10, 0.05), (10, 0.1)), ((4, 0.2), (10, 0.05)), ((7, 0.1), (3, 0.02))]:
        g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
        tau = np.linspace(0, min(t_a, t_b), 2_000_001)  # the product is smooth up to the shorter profile's end, 0 after
        numeric = np.trapezoid(profile(tau, t_a, g_a) * profile(tau, t_b, g_b), tau)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-5)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(profile_inner(t_b, g_b, t_a, g_a), rel=1e-12)


def test_the_least_squares_profile_of_a_general_target_is_close_to_the_exact_one(record_property):
    # EDM2's setting in miniature: both tracked widths snapshotted every 8 units of a run of 256
    t_in = np.repeat(np.arange(8, 257, 8), 2)
    sigma_in = np.tile(TRACKED, len(t_in) // 2)
    targets = [0.03, 0.07, 0.15, 0.2]
    x = posthoc_coefficients(t_in, sigma_in, 256, targets)
    np.testing.assert_allclose(x.sum(axis=0), 1.0, rtol=1e-12)
    errors = profile_error(t_in, sigma_in, x, 256, targets)
    tau = np.linspace(0, 256, 1_000_001)  # the same error from the profiles themselves
    for j, sigma in enumerate(targets):
        exact = profile(tau, 256, sigma_rel_to_gamma(sigma))
        combined = sum(x[i, j] * profile(tau, t_in[i], sigma_rel_to_gamma(sigma_in[i])) for i in range(len(t_in)))
        numeric = np.sqrt(np.trapezoid((exact - combined) ** 2, tau) / np.trapezoid(exact ** 2, tau))
        assert errors[j] == pytest.approx(numeric, rel=1e-2, abs=1e-5)
    print("relative L2 error of the reconstructed profile:", {s: round(float(e), 5) for s, e in zip(targets, errors)})
    for sigma, error in zip(targets, errors):
        record_property(f"profile_error_sigma_rel_{sigma}", float(error))
    assert errors.max() < 0.015  # 0.03: about 1 %, 0.07 to 0.2: under 0.7 %
    exact = profile_error(t_in, sigma_in, posthoc_coefficients(t_in, sigma_in, 256, TRACKED), 256, TRACKED)
    assert exact.max() < 1e-6  # a tracked profile is one of the snapshots


# -- a tiny run ----------------------------------------------------------------------------------------------------------
class TinyData(L.LightningDataModule):
    """12 fixed images in [-1, 1], in order, batches of 4: 3 steps are one epoch."""

    def train_dataloader(self):
        x = torch.rand(12, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return DataLoader(TensorDataset(x, torch.zeros(12, dtype=torch.long)), batch_size=4, shuffle=False)


class Trajectory(L.Callback):
    """The trained weights of ``net`` after every optimiser step."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({f"net.{n}": p.detach().clone() for n, p in pl_module.net.named_parameters()})


def fit(tmp_path, steps: int, *callbacks, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    method = EDMTeacher(net=NET, data_shape=SHAPE, optimizer=ADAM)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), plugins=[AtomicCheckpointIO()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and validation
        trainer.fit(method, datamodule=TinyData(), ckpt_path=ckpt_path, weights_only=True)
    return method


def tracked_ema(callback: PowerFunctionEMA, sigma_rel: float) -> dict[str, torch.Tensor]:
    return callback.averages[callback.sigma_rel.index(sigma_rel)]


def exact_ema(trajectory: list[dict], sigma_rel: float) -> dict[str, torch.Tensor]:
    """sum_s w_s theta_s with the profile's mass over each step, w_s = (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1)."""
    t, power = len(trajectory), float(sigma_rel_to_gamma(sigma_rel)) + 1
    w = [((s / t) ** power - ((s - 1) / t) ** power) for s in range(1, t + 1)]
    return {n: sum(w_s * theta[n].double() for w_s, theta in zip(w, trajectory)).float() for n in trajectory[0]}


@pytest.fixture(scope="module")
def every_step_run(tmp_path_factory):
    """Six steps with snapshots of both tracked widths at every step: (callback, trajectory, snapshot directory)."""
    directory = tmp_path_factory.mktemp("phema_every_step")
    callback, trajectory = PowerFunctionEMA(TRACKED, snapshot_every=1, dirpath=str(directory / "phema")), Trajectory()
    fit(directory, 6, trajectory, callback)
    return callback, trajectory.weights, directory / "phema"


def test_the_tracked_emas_weigh_each_step_by_the_profiles_mass_over_it(every_step_run):
    callback, trajectory, _ = every_step_run
    assert callback.t == 6
    for sigma in TRACKED:
        ours, exact = tracked_ema(callback, sigma), exact_ema(trajectory, sigma)
        for name, value in exact.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)
    ema = tracked_ema(callback, 0.05)
    assert all(not torch.equal(ema[name], value) for name, value in trajectory[-1].items())  # it averages, not copies


def test_reconstructing_a_tracked_profile_from_every_step_snapshots_gives_that_ema(every_step_run):
    callback, _, directory = every_step_run
    snapshots = read_snapshots(directory)
    assert [(s.t, s.sigma_rel) for s in snapshots] == [(t, s) for t in range(1, 7) for s in TRACKED]
    weights, x, errors, used = reconstruct(snapshots, TRACKED)
    assert len(used) == 12 and errors.max() < 1e-6
    for sigma in TRACKED:
        for name, value in tracked_ema(callback, sigma).items():
            torch.testing.assert_close(weights[sigma][name], value, msg=name)


def test_a_general_target_reconstructed_from_the_snapshots_is_near_its_exact_ema(every_step_run, record_property):
    _, trajectory, directory = every_step_run
    weights, _, errors, _ = reconstruct(read_snapshots(directory), [0.07])
    exact, near, far = exact_ema(trajectory, 0.07), exact_ema(trajectory, 0.05), exact_ema(trajectory, 0.10)
    gap = sum(((exact[n] - weights[0.07][n]).double() ** 2).sum() for n in exact).sqrt()
    spread = sum(((near[n] - far[n]).double() ** 2).sum() for n in exact).sqrt()  # how far the tracked EMAs lie apart
    print(f"sigma_rel 0.07 from 6 steps: profile error {errors[0]:.4f}, weight error {float(gap / spread):.4f} of the "
          "distance between the tracked EMAs")
    record_property("weight_error_sigma_rel_0.07", float(gap / spread))
    assert gap / spread < 0.01  # about 0.15 %


def test_snapshots_hold_only_tensors_and_plain_values_and_a_failed_write_leaves_no_file(every_step_run, tmp_path,
                                                                                        monkeypatch):
    callback, _, directory = every_step_run
    payload = torch.load(directory / "phema-0000006-0.05.pt", weights_only=True)
    assert payload["t"] == 6 and payload["sigma_rel"] == 0.05 and payload["method_class"].endswith("EDMTeacher")
    for name, value in tracked_ema(callback, 0.05).items():
        assert torch.equal(payload["weights"][name], value), name
    assert not list(directory.glob(".*tmp"))

    save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"\x80\x02half a snapshot")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="could not write the post-hoc EMA snapshot of step 2 .*No space") as error:
        fit(tmp_path, 2, PowerFunctionEMA(TRACKED, snapshot_every=2))
    assert "\n" not in str(error.value)
    monkeypatch.setattr(torch, "save", save)
    assert list((tmp_path / "phema").iterdir()) == []  # no half-written file under any name


def test_resuming_from_a_mid_run_checkpoint_continues_every_tracked_ema_bit_for_bit(tmp_path):
    def checkpoints():
        return ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1,
                               filename="step_{step:07d}", auto_insert_metric_name=False)

    whole = PowerFunctionEMA(TRACKED, snapshot_every=2)
    fit(tmp_path, 6, checkpoints(), whole)
    written = {p.name: torch.load(p, weights_only=True) for p in (tmp_path / "phema").glob("*.pt")}
    assert sorted(written) == [f"phema-{t:07d}-{s}.pt" for t in (2, 4, 6) for s in TRACKED]
    state = read_checkpoint(tmp_path / "checkpoints" / "step_0000003.ckpt")["callbacks"]["PowerFunctionEMA"]
    assert state["t"] == 3

    resumed = PowerFunctionEMA(TRACKED, snapshot_every=2)  # in the same directory: it writes steps 4 and 6 again
    (tmp_path / "phema" / "phema-0000006-0.1.pt").write_bytes(b"from the run it resumes")
    fit(tmp_path, 6, resumed, ckpt_path=tmp_path / "checkpoints" / "step_0000003.ckpt")
    assert resumed.t == whole.t == 6
    for ours, theirs in zip(resumed.averages, whole.averages):
        for name, value in theirs.items():
            assert torch.equal(ours[name], value), name
    for name, payload in written.items():
        again = torch.load(tmp_path / "phema" / name, weights_only=True)
        assert all(torch.equal(again["weights"][n], w) for n, w in payload["weights"].items()), name

    with pytest.raises(CheckpointError, match=r"tracks sigma_rel=\[0.05, 0.1\].*sigma_rel=\[0.05, 0.2\]"):
        fit(tmp_path, 6, PowerFunctionEMA([0.05, 0.2]), ckpt_path=tmp_path / "checkpoints" / "step_0000003.ckpt")


def test_the_callback_refuses_bad_settings_in_one_line():
    for kwargs, message in [({"sigma_rel": [0.05, 0.3]}, "outside EDM2's range"),
                            ({"sigma_rel": [0.1, 0.10]}, "names a value twice"),
                            ({"snapshot_every": 0}, "whole number of steps")]:
        with pytest.raises(ConfigError, match=message):
            PowerFunctionEMA(**kwargs)


# -- the configs and the command line ------------------------------------------------------------------------------------
def test_callbacks_phema_sits_beside_the_fixed_ema_and_joins_any_other_choice(compose_cfg):
    from hydra.utils import instantiate

    from fewstep.cli import check_overrides

    cfg = compose_cfg("train", ["callbacks=phema"])
    assert cfg.callbacks.ema is not None and cfg.callbacks.model_checkpoint is not None
    callback = instantiate(cfg.callbacks.phema)
    assert isinstance(callback, PowerFunctionEMA) and callback.sigma_rel == TRACKED
    assert compose_cfg("train", ["callbacks=phema", "callbacks.ema=null"]).callbacks.ema is None
    beside = compose_cfg("train", ["callbacks=benchmark", "+callbacks.phema._target_=fewstep.callbacks.PowerFunctionEMA"])
    assert beside.callbacks.sampler_benchmark is not None
    assert instantiate(beside.callbacks.phema).dirpath is None  # then <trainer.default_root_dir>/phema
    check_overrides(["callbacks=[benchmark,phema]"])  # the entry point lets a list of the group's choices through
    both = compose_cfg("train", ["callbacks=[benchmark,phema]"])
    assert both.callbacks.sampler_benchmark is not None and both.callbacks.phema.dirpath is not None
    with pytest.raises(SystemExit):
        check_overrides(["callbacks=[benchmark,nope]"])


RUN = [
    "data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64", "data.val_size=16", "trainer.max_steps=4",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.sample_grid.n=4",
    "callbacks.sample_grid.nfe=2", "logger=csv", "seed=3", "callbacks=phema", "callbacks.phema.snapshot_every=1",
]


@pytest.fixture
def tiny_run(compose_cfg, tmp_path):
    from fewstep.train import train

    train(compose_cfg("train", [*RUN, f"paths.output_dir={tmp_path}"]))
    return tmp_path


def test_the_command_writes_checkpoints_that_load_method_and_evaluate_read(tiny_run, compose_cfg, capsys):
    main([str(tiny_run), "sigma_rel=0.05,0.07"])
    table = capsys.readouterr().out
    assert "sigma_rel_0.05.ckpt" in table and "sigma_rel_0.07.ckpt" in table
    out = tiny_run / "phema" / "reconstructed"
    last = read_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    snapshot = torch.load(tiny_run / "phema" / "phema-0000004-0.05.pt", weights_only=True)
    model, raw = load_method(out / "sigma_rel_0.05.ckpt"), load_method(out / "sigma_rel_0.05.ckpt", weights="raw")
    for name, value in snapshot["weights"].items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    for name, value in last["current_model_state"].items():
        assert torch.equal(raw.state_dict()[name], value), name
    stored = read_checkpoint(out / "sigma_rel_0.07.ckpt")
    assert stored["fewstep"]["phema"]["sigma_rel"] == 0.07 and stored["fewstep"]["phema"]["t"] == 4
    assert "PowerFunctionEMA" not in stored["callbacks"]
    # a Hydra sweep over sigma_rel at evaluation names the files it wrote
    cfg = compose_cfg("evaluate", ["+sigma_rel=0.07", f"ckpt={out}/sigma_rel_${{sigma_rel}}.ckpt"])
    assert cfg.ckpt == str(out / "sigma_rel_0.07.ckpt")


def test_bad_input_is_refused_in_one_line(tiny_run, tmp_path_factory, capsys):
    empty = tmp_path_factory.mktemp("empty")
    other = tmp_path_factory.mktemp("other")
    payload = torch.load(tiny_run / "phema" / "phema-0000004-0.05.pt", weights_only=True)
    save_snapshot(other / "phema", 1, 1, 0.05, payload["method_class"], {"net.w": torch.zeros(3)})
    cases = [
        ([str(empty), "sigma_rel=0.1"], "no post-hoc EMA snapshots"),
        ([str(tiny_run), "sigma_rel=0.05,0.3"], "sigma_rel=0.3 is outside EDM2's range"),
        ([str(tiny_run), "sigma_rel=fast"], "give numbers separated by commas"),
        ([str(tiny_run)], "usage: python -m fewstep.phema"),
        ([str(other), "sigma_rel=0.1", f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}"], "another network"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and err.count("\n") == 1, err
    # a snapshot of another network among the run's own
    save_snapshot(tiny_run / "phema", 5, 5, 0.1, payload["method_class"], {"net.w": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="snapshot of another network"):
        reconstruct_run(tiny_run, [0.1])


class Payload:
    def __reduce__(self):
        return (exec, ("open('ran', 'w').write('payload')",))


def test_a_snapshot_that_would_run_code_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "phema"
    directory.mkdir()
    torch.save({"format": "fewstep.phema.snapshot", "t": 1, "weights": Payload()}, directory / "phema-0000001-0.1.pt")
    with pytest.raises(CheckpointError, match="cannot read post-hoc EMA snapshot"):
        read_snapshots(tmp_path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_run_killed_mid_way_and_resumed_keeps_every_tracked_ema_bit_for_bit(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = [*RUN, "trainer.max_steps=10", "callbacks.phema.snapshot_every=2"]

    def command(directory, *extra):
        return [sys.executable, "-m", "fewstep.train", *run, f"hydra.run.dir={directory}", *extra]

    whole = subprocess.run(command(tmp_path / "whole"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"  # slow validations (a 400-NFE sample grid) leave time to kill it after step 4
    kill_after_checkpoint(command(killed, "callbacks.sample_grid.nfe=400"), killed, tmp_path, env)
    resumed = subprocess.run(command(killed, "resume=auto"), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, theirs = (read_checkpoint(d / "checkpoints" / "last.ckpt")["callbacks"]["PowerFunctionEMA"]
                    for d in (killed, tmp_path / "whole"))
    assert ours["t"] == theirs["t"] == 10
    for a, b in zip(ours["averages"], theirs["averages"]):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    names = sorted(p.name for p in (tmp_path / "whole" / "phema").glob("*.pt"))
    assert names == sorted(p.name for p in (killed / "phema").glob("*.pt")) and len(names) == 10
    for name in names:
        a, b = (torch.load(d / "phema" / name, weights_only=True)["weights"] for d in (killed, tmp_path / "whole"))
        assert all(torch.equal(a[n], b[n]) for n in a), name
