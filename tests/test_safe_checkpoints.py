"""No checkpoint runs code when read: fewstep's files are read weights-only, on every path that reads one."""

from __future__ import annotations

import builtins
import pickle

import pytest
import torch

from fewstep.checkpoints import AtomicCheckpointIO, CheckpointError, latest_checkpoint, load_method, read_checkpoint

from helpers import run_module

TINY_RUN = ["data=digits", "model=unet_tiny", "data.batch_size=8", "data.limit=64", "data.val_size=16"]


class Payload:
    """Unpickled with torch.load(weights_only=False) or plain pickle, this writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def checkpoint_shaped(path, marker, **fields):
    """A torch file shaped like a fewstep checkpoint, with a payload that writes ``marker`` when unpickled."""
    checkpoint = {
        "epoch": 0, "global_step": 0, "state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {},
        "fewstep": {"method_class": "fewstep.methods.edm_teacher.EDMTeacher"}, "extra": Payload(marker), **fields,
    }
    torch.save(checkpoint, path)
    return path


def assert_refused_in_one_line(result, marker):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fewstep: error:")]
    assert len(lines) == 1 and "builtins.exec" in lines[0], result.stderr[-2000:]
    assert "runs no code" in lines[0] or "does not run code" in lines[0], lines[0]
    assert not marker.exists(), "the payload ran"


def test_the_payload_would_run_if_loaded_unsafely(tmp_path):
    # the check below is meaningful only if this file really runs code under an unsafe load
    marker = tmp_path / "pwned"
    torch.load(checkpoint_shaped(tmp_path / "bad.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_read_checkpoint_and_lightnings_load_refuse_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    bad = checkpoint_shaped(tmp_path / "bad.ckpt", marker)
    for read in (read_checkpoint, load_method, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="builtins.exec") as error:
            read(bad)
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_resume_auto_stops_at_a_file_that_would_run_code_rather_than_skipping_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint_shaped(tmp_path / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match="refusing"):
        latest_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("fields, named", [
    ({"fewstep": {"method_class": "os.system"}}, "os.system"),
    ({"fewstep": {"method_class": "fewstep.methods.base.plain"}}, "fewstep.methods.base.plain"),
    ({"hyper_parameters": {"net": {"_target_": "os.system", "command": "touch x"}}}, "os.system"),
    ({"hyper_parameters": {"optimizer": {"a": [{"_target_": "builtins.exec"}]}}}, "hyper_parameters.optimizer._target_"),
])
def test_a_checkpoint_may_name_only_fewstep_methods_and_networks(tmp_path, fields, named):
    checkpoint = {"epoch": 0, "global_step": 0, "state_dict": {}, "hyper_parameters": {},
                  "fewstep": {"method_class": "fewstep.methods.edm_teacher.EDMTeacher"}, **fields}
    torch.save(checkpoint, tmp_path / "spoof.ckpt")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as error:
        load_method(tmp_path / "spoof.ckpt")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_every_entry_point_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    bad = checkpoint_shaped(tmp_path / "bad.ckpt", marker)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint_shaped(run_dir / "checkpoints" / "last.ckpt", marker)
    pickled = tmp_path / "bad.pkl"  # as an EDM network pickle
    pickled.write_bytes(pickle.dumps({"ema": Payload(marker)}))
    commands = {
        "sample .pkl": ("fewstep.sample", f"ckpt={pickled}", "n=2", "nfe=2", f"hydra.run.dir={tmp_path}/s"),
        "teacher.ckpt .pkl": ("fewstep.train", *TINY_RUN, "trainer=debug", "method=consistency", f"teacher.ckpt={pickled}",
                              f"hydra.run.dir={tmp_path}/c"),
        "sample": ("fewstep.sample", f"ckpt={bad}", "n=2", "nfe=2", f"hydra.run.dir={tmp_path}/s"),
        "ckpt_path": ("fewstep.train", *TINY_RUN, "trainer=debug", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path}/t"),
        "resume=auto": ("fewstep.train", *TINY_RUN, "trainer=debug", "resume=auto", f"hydra.run.dir={run_dir}"),
        "teacher.ckpt": ("fewstep.train", *TINY_RUN, "trainer=debug", "method=gdd", f"teacher.ckpt={bad}",
                         f"hydra.run.dir={tmp_path}/g"),
    }
    for module, *args in commands.values():
        assert_refused_in_one_line(run_module(module, *args, cwd=tmp_path), marker)


@pytest.mark.slow
def test_fewstep_writes_checkpoints_that_load_weights_only_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}",
            "callbacks.sample_grid=null"]
    assert run_module("fewstep.train", *args, cwd=tmp_path).returncode == 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and isinstance(checkpoint["hyper_parameters"]["net"], dict)
    result = run_module("fewstep.train", *args[:-3], "trainer.max_steps=4", "trainer.val_check_interval=2",
                        f"hydra.run.dir={run_dir}", "callbacks.sample_grid=null", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_latest_checkpoint_orders_step_files_by_step_not_by_time(tmp_path):
    import os

    for step in (2, 10, 4):  # fewstep's names, and Lightning's default
        torch.save({"fewstep": {}, "global_step": step}, tmp_path / f"step_{step:07d}.ckpt")
        torch.save({"fewstep": {}, "global_step": step}, tmp_path / f"epoch=0-step={step + 1}.ckpt")
    os.utime(tmp_path / "step_0000002.ckpt", (4e9, 4e9))  # the oldest step touched last
    assert latest_checkpoint(tmp_path).name == "epoch=0-step=11.ckpt"
    (tmp_path / "epoch=0-step=11.ckpt").write_bytes(b"truncated")  # unreadable: the next step down
    assert latest_checkpoint(tmp_path).name == "step_0000010.ckpt"
