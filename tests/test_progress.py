"""Progress without a terminal (plain lines, flushed), line-buffered entry points, and a run summary whose
commands can be copied."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from torch.utils.data import DataLoader, TensorDataset

from fewstep.callbacks import TextProgress, auto_progress_bar

from helpers import REPO, TINY, run_module

TRAIN_LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\) \| train/loss [-\d.e+]+ \| [\d.e+]+ it/s \| ETA \d+:\d\d:\d\d \| elapsed ")


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


class ReadsTheFile(Callback):
    """After the progress bar's hook (callbacks run in order): the line for this step is on disk already."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, self.path.read_text()))


def fit_tiny(progress: ProgressBar, *callbacks, max_steps: int = 6) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=3, limit_val_batches=1,
        num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[progress, *callbacks],
    )
    trainer.fit(Tiny())
    return trainer


def test_text_progress_prints_every_step_and_flushes(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w", buffering=1 << 20) as stream:  # a big buffer: only a flush puts a line on disk
        progress = TextProgress(interval=0, stream=stream)
        reader = ReadsTheFile(path)
        trainer = fit_tiny(progress, reader)
    # Lightning took it as the trainer's progress bar and added none of its own
    assert trainer.progress_bar_callback is progress
    assert [c for c in trainer.callbacks if isinstance(c, ProgressBar)] == [progress]

    lines = path.read_text().splitlines()
    train = [TRAIN_LINE.match(line) for line in lines if line.startswith("step ")]
    assert all(train), lines
    assert [int(m.group(1)) for m in train] == [1, 2, 3, 4, 5, 6] and {m.group(2) for m in train} == {"6"}
    validation = [line for line in lines if line.startswith("validation at step")]
    assert len(validation) == 2 and all(re.search(r"\| val/loss [-\d.e+]+ \| [\d.]+ s$", v) for v in validation)
    assert validation[0].startswith("validation at step 3/6") and validation[1].startswith("validation at step 6/6")
    assert "validating at step 3/6 (50%) ..." in lines
    assert not any("Sanity" in line or "at step 0/" in line for line in lines)  # the sanity check prints nothing
    # flushed: each step's line was in the file when the next callback read it
    for step, text in reader.seen:
        assert f"step {step}/6 " in text, (step, text)


def test_text_progress_interval(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        fit_tiny(TextProgress(interval=3600, stream=stream))
    lines = path.read_text().splitlines()
    # the first step, then nothing for an hour but the validations, and a line at the end
    assert [line.split(" ")[1] for line in lines if line.startswith("step ")] == ["1/6", "6/6"]
    assert sum(line.startswith("validation at step") for line in lines) == 2


def test_only_rank_zero_prints(capsys):
    progress = TextProgress(interval=0)
    progress.setup(SimpleNamespace(is_global_zero=False), None, "fit")
    assert progress.is_disabled
    progress._write("step 1/2")
    progress.enable()
    progress._write("step 1/2")  # still not rank zero
    assert capsys.readouterr().out == ""
    progress._trainer = SimpleNamespace(is_global_zero=True)
    progress._write("step 1/2")
    assert capsys.readouterr().out == "step 1/2\n"


class FakeStdout:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text):
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_factory_picks_rich_on_a_terminal_and_text_otherwise(compose_cfg, monkeypatch, tty):
    cfg = compose_cfg("train", ["data=digits", "model=unet_tiny", "callbacks.progress_bar.interval=7"])
    monkeypatch.setattr(sys, "stdout", FakeStdout(tty))
    bar = instantiate(cfg.callbacks.progress_bar)  # as fewstep.train builds it
    if tty:
        assert isinstance(bar, RichProgressBar)
    else:
        assert isinstance(bar, TextProgress) and bar.interval == 7
    assert isinstance(auto_progress_bar(mode="text"), TextProgress)
    assert isinstance(auto_progress_bar(mode="rich"), RichProgressBar)
    with pytest.raises(ValueError, match="choose auto, rich or text"):
        auto_progress_bar(mode="tqdm")


def test_benchmark_callbacks_keep_the_progress_bar(compose_cfg):
    cfg = compose_cfg("train", ["callbacks=benchmark"])
    assert cfg.callbacks.progress_bar._target_ == "fewstep.callbacks.auto_progress_bar"


@pytest.mark.slow
@pytest.mark.parametrize(
    "call, buffered",
    [("check_overrides(sys.argv[1:])", False), ("user_errors(lambda: None)()", False), ("pass", True)],
)
def test_entry_points_are_line_buffered(tmp_path, call, buffered):
    # What an entry point announces reaches a file at once, though the process is killed right after;
    # without the call ("pass") it sits in Python's buffer and is lost.
    log, printed = tmp_path / "log.txt", tmp_path / "printed"
    script = (f"import sys, time, pathlib\nfrom fewstep.cli import *\n{call}\nprint('training a teacher ...')\n"
              f"pathlib.Path({str(printed)!r}).touch()\ntime.sleep(120)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the Docker image sets it; a plain shell not
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not printed.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert printed.exists(), log.read_text()
    finally:
        process.kill()  # SIGKILL: nothing is flushed on the way out
        process.wait()
    assert log.read_text() == ("" if buffered else "training a teacher ...\n")


@pytest.mark.slow
def test_train_without_a_terminal_prints_progress_and_a_summary_to_copy(tmp_path):
    run_dir = tmp_path / "a_run_directory_deep_enough" / "that_its_checkpoint_path" / "is_longer_than_eighty_columns"
    result = run_module(
        "fewstep.train", "data=digits", *TINY, "callbacks.progress_bar.interval=0", f"hydra.run.dir={run_dir}",
        "trainer.enable_checkpointing=true", "+callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.model_checkpoint.dirpath={run_dir}/checkpoints", "+callbacks.model_checkpoint.save_last=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()  # captured: stdout is a pipe, not a terminal
    assert [TRAIN_LINE.match(line).group(1) for line in lines if line.startswith("step ")] == ["1", "2", "3"]
    assert any(re.match(r"validation at step 3/3 \(100%\) \| val/loss [\d.]+ \| ", line) for line in lines), lines
    assert "Epoch 0" not in result.stdout  # no rich bar

    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and len(str(last)) > 80
    assert "sample it:" in lines and "TensorBoard:" in lines
    assert f"  python -m fewstep.sample ckpt={last}" in lines  # the whole command on one line
    assert f"  tensorboard --logdir {run_dir}" in lines
    assert f"run directory: {run_dir}" in lines and f"checkpoints: {run_dir / 'checkpoints'}" in lines
    assert any(line.startswith("latest samples: ") and line.endswith(".png") for line in lines)
    assert any(re.fullmatch(r"val/loss: [\d.]+", line) for line in lines)
    assert any(re.fullmatch(r"train/loss: [\d.]+", line) for line in lines)
    assert not any(set(line) & set("│┃┌└") for line in lines[lines.index("fewstep run"):])  # no table
