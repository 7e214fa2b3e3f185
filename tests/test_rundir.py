"""No lost work: one run per run directory (a lock file), existing checkpoints continued or replaced only when asked,
leftovers of crashed checkpoint writes removed, and a full disk on a sample grid or a TensorBoard event one line."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fewstep import rundir
from fewstep.checkpoints import read_checkpoint
from fewstep.errors import ConfigError
from fewstep.images import ImageWriteError, save_grid
from fewstep.train import train

from helpers import REPO

# A tiny run with a checkpoint (and a sample grid) every 2 steps.
RUN = [
    "data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64", "data.val_size=16", "trainer.max_steps=4",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.sample_grid.n=4",
    "callbacks.sample_grid.nfe=2", "logger=csv", "seed=3",
]


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(directory, pid, host=None, **extra):
    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), **extra}
    (directory / rundir.LOCK_NAME).write_text(json.dumps(record))


# -- the lock, in one process -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_forked_second_holder_is_refused_in_one_line_naming_the_first_pid(tmp_path):
    run = tmp_path / "run"
    with rundir.hold(run):
        holder = json.loads((run / rundir.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # another process, which inherits the parent's table but not its lock
            os.close(read)
            try:
                with rundir.hold(run):
                    message = "acquired"
            except ConfigError as error:
                message = str(error)
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read) as pipe:
            message = pipe.read()
        assert f"is in use by another fewstep run (PID {os.getpid()} on {socket.gethostname()}" in message
        assert "\n" not in message
        assert (run / rundir.LOCK_NAME).exists()  # the refused child did not remove it
    assert not (run / rundir.LOCK_NAME).exists()


def test_a_lock_file_naming_a_live_process_is_refused(tmp_path):
    write_lock(tmp_path, os.getppid())  # pytest's parent: alive, and not this process
    with pytest.raises(ConfigError, match=f"in use by another fewstep run \\(PID {os.getppid()} on ") as error:
        with rundir.hold(tmp_path):
            pass
    assert "\n" not in str(error.value)
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getppid()  # left as it was
    with pytest.raises(ConfigError, match="in use by another fewstep run"):
        rundir.check_not_held(tmp_path)


def test_a_lock_of_another_machine_is_refused_with_how_to_remove_it(tmp_path):
    write_lock(tmp_path, 4242, host="another-machine", boot_id="not-this-kernel")
    with pytest.raises(ConfigError, match=f"PID 4242 on another-machine.*delete {tmp_path / rundir.LOCK_NAME}"):
        with rundir.hold(tmp_path):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("where", ["this host", "a container on this machine"])
def test_a_stale_lock_is_taken_over_with_a_line(tmp_path, capsys, where):
    pid = dead_pid()
    if where == "this host":
        write_lock(tmp_path, pid)
    else:  # another host name, the same kernel (Docker): the flock says its holder is gone
        write_lock(tmp_path, 1, host="0123456789ab", boot_id=rundir.boot_id())
        pid = 1
    with rundir.hold(tmp_path):
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert f"taking over the lock of PID {pid} on " in out and "which is no longer running" in out
    assert not (tmp_path / rundir.LOCK_NAME).exists()


def test_the_lock_is_released_on_an_exception_and_on_ctrl_c_and_is_reentrant(tmp_path):
    lock = tmp_path / rundir.LOCK_NAME
    for interrupt in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(interrupt)):
            with rundir.hold(tmp_path):
                with rundir.hold(tmp_path):  # fit inside train: the same process holds it once
                    assert lock.exists()
                assert lock.exists()
                raise interrupt
        assert not lock.exists()


def test_ranks_above_zero_take_no_lock_and_are_not_refused(tmp_path, monkeypatch):
    write_lock(tmp_path, os.getppid())
    before = (tmp_path / rundir.LOCK_NAME).read_text()
    monkeypatch.setenv("LOCAL_RANK", "1")  # how Lightning starts rank 1 of trainer.strategy=ddp
    with rundir.hold(tmp_path):
        rundir.check_not_held(tmp_path)
    assert (tmp_path / rundir.LOCK_NAME).read_text() == before
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "3")
    assert not rundir.is_rank_zero()
    monkeypatch.setenv("RANK", "0")
    assert rundir.is_rank_zero()


@pytest.mark.slow
def test_processes_racing_for_a_fresh_directory_get_the_lock_once(tmp_path):
    run, results, start = tmp_path / "run", tmp_path / "results", time.time() + 0.5
    results.mkdir()
    children = []
    for i in range(6):
        child = os.fork()
        if child == 0:
            time.sleep(max(0.0, start - time.time()))
            try:
                with rundir.hold(run):
                    outcome = "acquired"
                    time.sleep(0.5)
            except ConfigError:
                outcome = "refused"
            (results / str(i)).write_text(outcome)
            os._exit(0)
        children.append(child)
    for child in children:
        os.waitpid(child, 0)
    outcomes = sorted(path.read_text() for path in results.iterdir())
    assert outcomes == ["acquired"] + ["refused"] * 5
    assert not (run / rundir.LOCK_NAME).exists()


# -- the overwrite rule and stale temporaries, in process ------------------------------------------------------


def test_a_rerun_needs_resume_auto_or_overwrite_true(compose_cfg, tmp_path, capsys):
    train(compose_cfg("train", RUN))
    checkpoints = tmp_path / "checkpoints"
    before = {path.name: path.read_bytes() for path in checkpoints.glob("step_*.ckpt")}
    assert sorted(before) == ["step_0000002.ckpt", "step_0000004.ckpt"]

    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run .*: add resume=auto to continue "
                                          "that run, or overwrite=true to start again and replace them") as error:
        train(compose_cfg("train", [*RUN, "seed=4"]))
    assert "\n" not in str(error.value) and str(checkpoints) in str(error.value)
    assert {path.name: path.read_bytes() for path in checkpoints.glob("step_*.ckpt")} == before
    assert not (tmp_path / rundir.LOCK_NAME).exists()
    with pytest.raises(ConfigError, match="resume=auto continues .* overwrite=true replaces them: choose one"):
        train(compose_cfg("train", [*RUN, "resume=auto", "overwrite=true"]))

    capsys.readouterr()
    train(compose_cfg("train", [*RUN, "trainer.max_steps=6", "resume=auto"]))  # continues: steps 5 and 6
    assert "continuing from" in capsys.readouterr().out
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 6
    assert (checkpoints / "step_0000002.ckpt").read_bytes() == before["step_0000002.ckpt"]

    train(compose_cfg("train", [*RUN, "trainer.max_steps=2", "seed=4", "overwrite=true"]))  # starts again
    assert "overwrite=true: removed 4 checkpoints of an earlier run from" in capsys.readouterr().out
    assert sorted(path.name for path in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step_0000002.ckpt"]
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    assert (checkpoints / "step_0000002.ckpt").read_bytes() != before["step_0000002.ckpt"]


def test_ckpt_path_in_the_run_directory_continues_it_and_one_elsewhere_does_not_replace_it(compose_cfg, tmp_path):
    train(compose_cfg("train", [*RUN, "trainer.max_steps=2"]))
    own = tmp_path / "checkpoints" / "step_0000002.ckpt"
    train(compose_cfg("train", [*RUN, f"ckpt_path={own}"]))  # continue this run from its own checkpoint
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4
    other = tmp_path / "other"
    train(compose_cfg("train", [*RUN, "trainer.max_steps=2", f"paths.output_dir={other}"]))
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # a checkpoint of another run
        train(compose_cfg("train", [*RUN, f"ckpt_path={other / 'checkpoints' / 'last.ckpt'}"]))


@pytest.mark.slow
def test_stale_temporary_files_are_removed_at_the_next_start_and_live_ones_kept(compose_cfg, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    dead, live = dead_pid(), os.getppid()
    stale = [checkpoints / f".step_0000004.ckpt.{dead}.tmp", checkpoints / f".last.ckpt.{dead}.tmp"]
    writing = checkpoints / f".step_0000006.ckpt.{live}.tmp"
    other = checkpoints / ".notes.tmp"  # not a checkpoint write's name: not ours to remove
    for path in [*stale, writing, other]:
        path.write_bytes(b"\x80\x02half a checkpoint")
    train(compose_cfg("train", ["data=digits", "model=unet_tiny", "trainer=debug", "data.limit=64",
                                "data.val_size=16", "data.batch_size=8", "logger=csv", "resume=auto"]))
    assert f"removed 2 temporary files of interrupted checkpoint writes from {checkpoints}" in capsys.readouterr().out
    assert not any(path.exists() for path in stale) and writing.exists() and other.exists()


# -- a full disk on a sample grid or a TensorBoard event -----------------------------------------------------


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_save_grid_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_written(tensor, fp, format=None):
        fp.write(b"\x89PNG half")
        full_disk()

    monkeypatch.setattr("fewstep.images.save_image", half_written)
    with pytest.raises(ImageWriteError, match=r"could not write the image grid '.*grid.png' \(No space left on device\)") as error:
        save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def assert_intact_checkpoints(directory, step):
    assert sorted(path.name for path in directory.glob("*.ckpt")) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    assert read_checkpoint(directory / "last.ckpt")["global_step"] == step
    assert not list(directory.glob(".*.tmp"))


def test_a_full_disk_on_the_sample_grid_is_one_warning_and_training_goes_on(compose_cfg, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr("fewstep.images.save_image", full_disk)
    metrics = train(compose_cfg("train", RUN))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert_intact_checkpoints(tmp_path / "checkpoints", 4)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("fewstep: warning:")]
    assert len(warnings) == 1, err  # two grids failed, one line
    assert "could not write the sample grid" in warnings[0] and "(No space left on device)" in warnings[0]
    assert "Traceback" not in err
    assert not [path for path in tmp_path.rglob("*") if path.suffix in (".png", ".tmp")]


@pytest.mark.parametrize("after", [3, 0], ids=["mid-run", "as-the-event-file-is-created"])
def test_a_full_disk_on_tensorboard_events_is_one_warning_and_training_goes_on(compose_cfg, tmp_path, monkeypatch,
                                                                                  capfd, after):
    from tensorboard.summary.writer.record_writer import RecordWriter

    write, calls = RecordWriter.write, []

    def filling_up(self, data):
        calls.append(1)
        if len(calls) > after:
            full_disk()
        return write(self, data)

    monkeypatch.setattr(RecordWriter, "write", filling_up)
    metrics = train(compose_cfg("train", [*RUN, "logger=tensorboard"]))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert_intact_checkpoints(tmp_path / "checkpoints", 4)
    assert list((tmp_path / "tensorboard" / "samples").glob("step_*.png"))  # the grids themselves were written
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("fewstep: warning:")]
    assert len(warnings) == 1, err
    assert "could not write TensorBoard logs to" in warnings[0] and "(No space left on device)" in warnings[0]
    assert "Traceback" not in err and "Exception in thread" not in err


# -- as a user runs it: subprocesses -------------------------------------------------------------------------


def command(run_dir, *extra):
    return [sys.executable, "-m", "fewstep.train", *RUN, f"hydra.run.dir={run_dir}", *extra]


def environment():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(run_dir, *extra, cwd):
    return subprocess.run(command(run_dir, *extra), cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=600)


def start(run_dir, *extra, cwd):
    # Ctrl-C as at a terminal: a shell's background job (CI started with &) ignores SIGINT, and children inherit that
    return subprocess.Popen(command(run_dir, *extra), cwd=cwd, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path, process, seconds=240):
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("fewstep: error: ")
    return lines[0]


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_keeps_its_work(tmp_path):
    run_dir = tmp_path / "run"
    # slow validations (a 400-NFE grid at each of 30) keep the first run busy while the second starts
    first = start(run_dir, "trainer.max_steps=60", "callbacks.sample_grid.nfe=400", cwd=tmp_path)
    wait_for(run_dir / rundir.LOCK_NAME, first)
    config = (run_dir / ".hydra" / "config.yaml").read_bytes()
    second = run(run_dir, "seed=4", "trainer.max_steps=2", cwd=tmp_path)
    assert first.poll() is None, "the first run ended before the second started: make it longer"
    line = error_line(second)
    assert f"run directory {run_dir} is in use by another fewstep run (PID {first.pid} on " in line
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config  # refused before Hydra rewrote it
    assert first.wait(timeout=600) == 0
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 60
    assert not (run_dir / rundir.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_rerun_is_refused_then_overwrites_or_continues_when_told(tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, cwd=tmp_path).returncode == 0
    config = (run_dir / ".hydra" / "config.yaml").read_bytes()
    before = (run_dir / "checkpoints" / "step_0000004.ckpt").read_bytes()
    line = error_line(run(run_dir, "seed=4", cwd=tmp_path))
    assert "already holds checkpoints of an earlier run" in line and "resume=auto" in line and "overwrite=true" in line
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config
    assert (run_dir / "checkpoints" / "step_0000004.ckpt").read_bytes() == before

    resumed = run(run_dir, "trainer.max_steps=6", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    again = run(run_dir, "trainer.max_steps=2", "overwrite=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "overwrite=true: removed 4 checkpoints of an earlier run" in again.stdout
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.slow
def test_ctrl_c_removes_the_lock_and_a_killed_runs_lock_is_taken_over_by_resume_auto(tmp_path):
    run_dir = tmp_path / "run"
    slow = ["trainer.max_steps=40", "callbacks.sample_grid.nfe=200"]
    interrupted = start(run_dir, *slow, cwd=tmp_path)
    wait_for(run_dir / "checkpoints" / "step_0000002.ckpt", interrupted)
    interrupted.send_signal(signal.SIGINT)
    interrupted.wait(timeout=120)
    assert not (run_dir / rundir.LOCK_NAME).exists()

    # the interrupted run may have saved more steps on its way out: wait for one the resumed run writes itself
    last = max(int(path.stem.split("_")[1]) for path in (run_dir / "checkpoints").glob("step_*.ckpt"))
    killed = start(run_dir, *slow, "resume=auto", cwd=tmp_path)
    wait_for(run_dir / "checkpoints" / f"step_{last + 2:07d}.ckpt", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((run_dir / rundir.LOCK_NAME).read_text())["pid"] == killed.pid
    (run_dir / "checkpoints" / f".step_0000006.ckpt.{killed.pid}.tmp").write_bytes(b"half")  # its write, cut short
    resumed = run(run_dir, "trainer.max_steps=40", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the lock of PID {killed.pid} on " in resumed.stdout
    assert "temporary file" in resumed.stdout and not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 40
    assert not (run_dir / rundir.LOCK_NAME).exists()


@pytest.mark.slow
def test_ddp_ranks_share_the_lock_of_rank_zero(tmp_path):
    run_dir = tmp_path / "run"
    result = run(run_dir, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.devices=2",
                 "trainer.strategy=ddp", "data.batch_size=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in use by another fewstep run" not in result.stderr
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not (run_dir / rundir.LOCK_NAME).exists()
