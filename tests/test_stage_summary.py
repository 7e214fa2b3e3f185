"""The end-of-run summary of a staged distillation: its table and files from rows, and a debug run that writes them."""

import json
from pathlib import Path

import pytest

from fewstep.errors import ConfigError
from fewstep.stage_summary import Model, build, markdown, settings, summarise, table, write
from fewstep.train import train

from helpers import TINY

ROWS = [
    {"stage": "teacher", "steps": 100, "nfe": 100, "sampler": "kac_euler", "fid_domain": 8.0, "noisy_share": 0.0,
     "train_seconds": None, "n": 1000, "ckpt": "t.ckpt"},
    {"stage": "stage 1", "steps": 4, "nfe": 4, "sampler": "kac_euler", "fid_domain": 10.0, "noisy_share": 0.026,
     "train_seconds": 95.4, "n": 1000, "ckpt": "s1.ckpt"},
    {"stage": "stage 2", "steps": 1, "nfe": 1, "sampler": "kac_euler", "fid_domain": 16.0, "noisy_share": 0.039,
     "train_seconds": 3725.0, "n": 1000, "ckpt": "s2.ckpt"},
]


def test_the_table_and_files_hold_one_row_per_model_with_its_ratio_to_the_teacher(tmp_path):
    summary = build(ROWS, {"n": 1000, "seed": 0}, seconds=61.0)
    assert [row["ratio"] for row in summary["rows"]] == [1.0, 1.25, 2.0]
    text = markdown(summary)
    assert "| teacher | 100 | kac_euler | 8.00 | 1.00x | 0.0% | reused |" in text
    assert "| stage 1 | 4 | kac_euler | 10.00 | 1.25x | 2.6% | 0:01:35 |" in text
    assert "| stage 2 | 1 | kac_euler | 16.00 | 2.00x | 3.9% | 1:02:05 |" in text
    assert "scoring took 0:01:01" in text
    assert table(summary).row_count == 3

    written = write(tmp_path, summary, figure=None)
    assert [path.name for path in written] == ["summary.json", "summary.md"] and not (tmp_path / "stages.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "summary.md").read_text() == text
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_settings(compose_cfg):
    assert settings(compose_cfg("train", ["method=kac_endpoint"])) == {"n": 1000, "seeds": 8, "seed": 0}
    assert settings(compose_cfg("train", ["method=kac_endpoint", "summary.n=200", "summary.seeds=4"]))["n"] == 200
    assert settings(compose_cfg("train", ["method=kac_endpoint", "summary=true"]))["n"] == 1000
    assert settings(compose_cfg("train", ["method=kac_endpoint", "trainer=debug"]))["n"] == 32  # a quick check
    assert settings(compose_cfg("train", ["method=kac_endpoint", "summary=false"])) is None
    for bad in ("summary.n=1", "summary.seeds=0", "summary.seed=-1", "summary.n=many"):
        with pytest.raises(ConfigError, match=rf"{bad.split('=')[0]}=.*: use a whole number"):
            settings(compose_cfg("train", ["method=kac_endpoint", bad]))


def test_a_bad_summary_setting_fails_before_any_training(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["method=kac_endpoint", "data=digits", *TINY, f"paths.root={tmp_path}", "summary.n=0"])
    with pytest.raises(ConfigError, match="summary.n=0"):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_summary_that_cannot_score_is_one_warning_and_writes_nothing(compose_cfg, tmp_path, capsys):
    cfg = compose_cfg("train", ["method=kac_endpoint", f"paths.output_dir={tmp_path}"])
    models = [Model("teacher", 4, {"name": "kac_euler"}, tmp_path / "missing.ckpt", None),
              Model("stage 1", 2, {"name": "kac_euler"}, tmp_path / "stage1_2steps" / "missing.ckpt", 1.0)]
    assert summarise(cfg, models, [1, 8, 8], num_classes=10) is None
    assert "warning: the end-of-run summary failed" in capsys.readouterr().err
    # fid_domain's features are those of a classifier of the data's classes
    assert summarise(cfg, models, [2], num_classes=8) is None
    assert "this data holds [2] vectors" in capsys.readouterr().out
    assert summarise(cfg, models, [3, 8, 8], num_classes=0) is None
    assert "this data holds images without class labels" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_a_debug_staged_run_writes_its_summary_and_figure_and_summary_false_neither(compose_cfg, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["method=kac_endpoint", "data=digits", *TINY, f"paths.root={tmp_path}", "method.stages=[4,2,1]",
                 "summary.seeds=3"]
    train(compose_cfg("train", [*overrides, f"paths.output_dir={tmp_path}/run"]))
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [(row["stage"], row["steps"], row["nfe"]) for row in summary["rows"]] == [
        ("teacher", 4, 4), ("stage 1", 2, 2), ("stage 2", 1, 1)
    ]
    assert summary["n"] == 32  # at most 32 images under trainer=debug
    for row in summary["rows"]:
        assert row["fid_domain"] >= 0 and 0 <= row["noisy_share"] <= 1 and row["train_seconds"] > 0
        assert Path(row["ckpt"]).is_file()
    assert summary["rows"][0]["ratio"] == 1.0
    assert (run / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(f"| {name} | {steps} | kac_euler |" in (run / "summary.md").read_text()
               for name, steps in (("teacher", 4), ("stage 1", 2), ("stage 2", 1)))
    tags = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload().Tags()
    assert "summary/stages" in tags["images"] and "summary/stages/text_summary" in tags["tensors"]

    # a second run reuses the debug teacher, whose training time is then not this run's, and its scored row
    capsys.readouterr()
    train(compose_cfg("train", [*overrides, f"paths.output_dir={tmp_path}/again", "method.stages=[4,2]"]))
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["rows"][0]["train_seconds"] is None and len(again["rows"]) == 2
    assert again["rows"][0]["fid_domain"] == summary["rows"][0]["fid_domain"]
    assert "summary: the teacher's row as scored by an earlier run" in capsys.readouterr().out

    train(compose_cfg("train", [*overrides, f"paths.output_dir={tmp_path}/off", "method.stages=[4,2]", "summary=false"]))
    assert (tmp_path / "off" / "stage1_2steps" / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "off").glob("summary.*")) and not (tmp_path / "off" / "stages.png").exists()


def test_progressive_rounds_are_summarised_alike(compose_cfg, tmp_path):
    overrides = ["method=progressive", "data=digits", *TINY, f"paths.root={tmp_path}", "method.start_steps=2",
                 "method.end_steps=1", f"paths.output_dir={tmp_path}/run"]
    train(compose_cfg("train", overrides))
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())["rows"]
    assert [(row["stage"], row["steps"], row["sampler"]) for row in rows] == [("teacher", 2, "heun"), ("stage 1", 1, "euler")]
    assert (tmp_path / "run" / "stages.png").is_file()
