"""Losing nothing: resume after SIGKILL, atomic checkpoints, a full disk, a NaN loss, determinism."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from fewstep.checkpoints import latest_checkpoint, read_checkpoint
from fewstep.errors import CheckpointError, TrainingDiverged
from fewstep.generate import generate
from fewstep.methods import EDMTeacher
from fewstep.train import train

from helpers import REPO, kill_after_checkpoint

# A tiny run with a checkpoint every 2 steps (what a real run does every val_check_interval steps).
RUN = [
    "data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64", "data.val_size=16", "trainer.max_steps=12",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "callbacks.sample_grid.n=4", "callbacks.sample_grid.nfe=2", "logger=csv", "seed=3",
]


def command(run_dir, *extra):
    return [sys.executable, "-m", "fewstep.train", *RUN, f"hydra.run.dir={run_dir}", *extra]


def environment():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):  # a GAN's two optimisers
        for sa, sb in zip(oa["state"].values(), ob["state"].values()):
            for key in sa:
                torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    [], ["method=meanflow", "trainer.max_steps=8"],
    ["method=scm", "method.tangent_warmup=4"],  # sCT: the tangent's warm-up r = step / 4 continues across the resume
    ["method=sida", "teacher.max_steps=2", "trainer.max_steps=30"],  # generator, fake score, GAN head, two optimisers
], ids=["edm_teacher", "meanflow", "sct", "sida"])
def test_a_run_killed_mid_way_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, method):
    steps = int(next((o.split("=")[1] for o in method if o.startswith("trainer.max_steps=")), 12))
    whole = subprocess.run(command(tmp_path / "whole", *method), cwd=tmp_path, env=environment(), capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # the same run (a student: with the teacher the first run trained), killed with SIGKILL once its first checkpoints
    # exist; slow validations (a 400-NFE sample grid, or a student's many steps) leave time to kill it before the end
    killed_dir = tmp_path / "killed"
    kill_after_checkpoint(command(killed_dir, *method, "callbacks.sample_grid.nfe=400"), killed_dir, tmp_path, environment())
    reached = read_checkpoint(latest_checkpoint(killed_dir / "checkpoints"))["global_step"]
    # killed mid-run; on a loaded machine the kill can land while step 4's file is still being written, and
    # last.ckpt, which the run continues from, still holds step 2
    assert 2 <= reached < steps

    resumed = subprocess.run(
        command(killed_dir, *method, "resume=auto"), cwd=tmp_path, env=environment(), capture_output=True, text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stdout
    assert_same_training_state(
        read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt"),
        read_checkpoint(killed_dir / "checkpoints" / "last.ckpt"),
    )


def test_resume_auto_without_a_checkpoint_starts_and_rejects_other_values(compose_cfg, tmp_path):
    from fewstep.errors import ConfigError
    from fewstep.train import resume_from

    cfg = compose_cfg("train", ["resume=auto"])
    assert resume_from(cfg) is None
    with pytest.raises(ConfigError, match="resume=auto"):
        resume_from(compose_cfg("train", ["resume=yes"]))


def test_two_runs_with_one_seed_give_identical_weights_and_samples(compose_cfg, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_cfg("train", [*RUN, "trainer.max_steps=4", f"paths.output_dir={tmp_path / name}"])
        train(cfg)
        runs.append(read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt"))
    assert_same_training_state(*runs)
    from fewstep.checkpoints import load_method

    model = load_method(tmp_path / "a" / "checkpoints" / "last.ckpt")
    # sample i depends on seed i only: not on the batch it was drawn in
    together, _, _ = generate(model, 6, "heun", 5, seed=10, batch_size=6)
    apart, _, _ = generate(model, 6, "heun", 5, seed=10, batch_size=4)
    alone, _, _ = generate(model, 1, "heun", 5, seed=13)
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-6)
    torch.testing.assert_close(together[3:4], alone, rtol=0, atol=1e-6)


def test_a_nan_loss_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path, monkeypatch):
    loss = EDMTeacher.loss

    def diverging(self, x0, class_labels, rng):
        value = loss(self, x0, class_labels, rng)
        return value * float("nan") if self.training and self.global_step >= 5 else value

    monkeypatch.setattr(EDMTeacher, "loss", diverging)
    cfg = compose_cfg("train", [*RUN, f"paths.output_dir={tmp_path}"])
    diverged = r"loss is nan at step 5: training diverged.*last good checkpoint is .*step_0000004"
    with pytest.raises(TrainingDiverged, match=diverged) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not list((tmp_path / "checkpoints").glob("step_0000006*"))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(compose_cfg, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\x80\x02half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = compose_cfg("train", [*RUN, f"paths.output_dir={tmp_path}"])
    full = r"step_0000004.ckpt' \(No space left on device\); the previous checkpoint .*step_0000002.ckpt is intact"
    with pytest.raises(CheckpointError, match=full) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    monkeypatch.setattr(torch, "save", save)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.ckpt", "step_0000002.ckpt"]  # no half-written file under any name
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_truncated_checkpoint_is_skipped_by_resume_auto_and_named_by_ckpt_path(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [*RUN, "trainer.max_steps=4", f"paths.output_dir={tmp_path}"])
    train(cfg)
    directory = tmp_path / "checkpoints"
    newest = directory / "step_0000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (last.ckpt links to it)
    assert latest_checkpoint(directory) == directory / "step_0000002.ckpt"
    bad = compose_cfg("train", [*RUN, "trainer.max_steps=6", f"paths.output_dir={tmp_path}", f"ckpt_path={newest}"])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as error:
        train(bad)
    assert "\n" not in str(error.value)
    auto = compose_cfg("train", [*RUN, "trainer.max_steps=6", f"paths.output_dir={tmp_path}", "resume=auto"])
    train(auto)
    assert read_checkpoint(directory / "last.ckpt")["global_step"] == 6


def test_resume_auto_continues_a_staged_pipeline_at_its_unfinished_stage(compose_cfg, tmp_path):
    overrides = [
        "method=progressive", "summary=false", "method.start_steps=4", "method.steps_per_round=4", *RUN, "trainer.val_check_interval=2",
        f"paths.root={tmp_path}/outputs", "teacher.max_steps=2", f"paths.output_dir={tmp_path / 'run'}",
    ]
    train(compose_cfg("train", overrides))
    stage1, stage2 = (tmp_path / "run" / name / "checkpoints" for name in ("stage1_2steps", "stage2_1steps"))
    finished = {path: read_checkpoint(path / "last.ckpt") for path in (stage1, stage2)}
    # as if the run had died in its second round, after that round's first checkpoint
    (stage2 / "step_0000004.ckpt").unlink()
    (stage2 / "last.ckpt").unlink()
    (stage2 / "last.ckpt").symlink_to("step_0000002.ckpt")
    stage1_mtime = (stage1 / "step_0000004.ckpt").stat().st_mtime
    train(compose_cfg("train", [*overrides, "resume=auto"]))
    assert (stage1 / "step_0000004.ckpt").stat().st_mtime == stage1_mtime  # the finished round is not trained again
    for path, before in finished.items():
        assert_same_training_state(before, read_checkpoint(path / "last.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("method", [  # scm: its tangent's warm-up inside the 4 steps, so that the whole loss is compared
    ["method=edm_teacher"], ["method=flow_teacher"], ["method=kac_teacher"], ["method=meanflow"],
    ["method=scm", "method.tangent_warmup=2"],
    # global batch means: SiDA's adversarial weights, f-distill's density-ratio weights
    ["method=sida", "teacher.max_steps=2"], ["method=fdistill", "method.critic_steps=2", "teacher.max_steps=2"],
    # SiDA's schedule: the generator held for the first step's 8 images, its GAN term from the third step, clipping
    ["method=sida", "teacher.max_steps=2", "method.hold_images=8", "method.gan_start_images=16", "method.critic_clip=1e-3"],
], ids=lambda overrides: overrides[0].split("=")[1] + ("_schedule" if len(overrides) > 2 and "hold" in overrides[2] else ""))
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, method):
    def run(name, *extra):
        result = subprocess.run(
            command(tmp_path / name, *method, "trainer.max_steps=4", "trainer.val_check_interval=4", *extra),
            cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")

    one = run("one", "data.batch_size=8")
    # a student takes the teacher "one" trained (another batch size is other data to the teacher search)
    taught = one["hyper_parameters"].get("teacher_ckpt")  # None: a teacher or a method trained from data (sCT)
    teacher = [f"teacher.ckpt={taught}"] if taught else []
    two = run("two", "data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp", *teacher)  # gloo on CPU
    assert one["global_step"] == two["global_step"] == 4
    for weights in ("state_dict", "current_model_state"):  # the EMA weights and the trained ones
        for key, value in one[weights].items():  # the same data and noise; only the gradient sum's order differs
            torch.testing.assert_close(two[weights][key], value, rtol=1e-4, atol=1e-5, msg=f"{weights} {key}")


@pytest.mark.slow
def test_a_ddp_student_that_trains_its_own_teacher_trains_one_teacher_on_both_ranks(tmp_path):
    # Lightning starts rank 1 as this command again once rank 0 fits the teacher: it must join rank 0's teacher run
    # rather than stamp a directory of its own
    result = subprocess.run(
        command(tmp_path / "student", "method=consistency", "teacher.max_steps=2", "trainer.max_steps=2",
                "trainer.val_check_interval=2", "data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp",
                f"paths.root={tmp_path / 'outputs'}"),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    teachers = sorted((tmp_path / "outputs" / "edm_teacher").glob("*/*"))
    assert len(teachers) == 1, teachers
    student = read_checkpoint(tmp_path / "student" / "checkpoints" / "last.ckpt")
    assert student["global_step"] == 2
    assert student["hyper_parameters"]["teacher_ckpt"] == str((teachers[0] / "checkpoints" / "last.ckpt").resolve())
    assert read_checkpoint(teachers[0] / "checkpoints" / "last.ckpt")["global_step"] == 2
