"""fewstep.evaluate and fewstep.report as a user runs them: a multirun over samplers and NFE, then the table."""

import json

import pytest

from fewstep.errors import FewstepError
from fewstep.metrics.inception_weights import find_weights

from helpers import run_module


def weights_available() -> bool:
    try:
        find_weights()
        return True
    except FewstepError:
        return False


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))  # domain classifiers and real statistics


@pytest.mark.slow
def test_multirun_evaluate_then_report(tiny_checkpoint, tmp_path):
    root, ckpt = tiny_checkpoint
    result = run_module(
        "fewstep.evaluate", "-m", f"ckpt={ckpt}", "sampler=euler,seeds2", "nfe=1,3", "n=40", "batch_size=40",
        "metric=fid_domain", f"paths.root={tmp_path}", cwd=root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = tmp_path.glob("multirun/evaluate/*")
    rows = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert len(rows) == 4
    assert {(r["sampler"], r["nfe_budget"], r["nfe"]) for r in rows} == {
        ("euler", 1, 1), ("euler", 3, 3), ("seeds2", 1, 1), ("seeds2", 3, 3)
    }
    assert all(r["metric"] == "fid_domain" and r["value"] > 0 and r["n"] == 40 and r["data"] == "Digits" for r in rows)
    assert all(r["domain_classifier_accuracy"] > 0.8 for r in rows)  # trained once, then read from the cache
    # diversity beside the FID: precision/recall on the same features, class coverage of the predictions
    assert all(0 <= r[key] <= 1 for r in rows for key in ("precision", "recall", "class_entropy", "classes_covered"))
    assert len(list((tmp_path / "cache").glob("domain_*.pt"))) == 1
    assert "biased" in result.stderr  # n < 2048 warns

    reported = run_module("fewstep.report", str(sweep), cwd=root)
    assert reported.returncode == 0, reported.stderr[-2000:]
    table = (sweep / "report.md").read_text().splitlines()
    assert table[2] == "| sampler | 1 | 3 |"
    assert sorted(line.split(" |")[0] for line in table[4:6]) == ["| euler", "| seeds2"]
    assert (sweep / "fid_domain_vs_nfe.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(not weights_available(), reason="FID weights absent: run 'python -m fewstep.metrics.weights'")
def test_standard_fid_row(tiny_checkpoint, tmp_path):
    root, ckpt = tiny_checkpoint
    result = run_module(
        "fewstep.evaluate", f"ckpt={ckpt}", "sampler=heun", "nfe=3", "n=3", "metric=fid", f"paths.root={tmp_path}", cwd=root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = tmp_path.glob("evaluate/*/result.json")
    row = json.loads(path.read_text())
    assert row["metric"] == "fid" and row["value"] > 0 and row["nfe"] == 3 and row["n_real"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expected",
    [
        (["metric=is"], "unknown metric 'is': choose one of fid, fid_domain, kid"),
        (["data_config=/nonexistent/config.yaml"], "no training config at '/nonexistent/config.yaml'"),
        (["n=0"], "n=0: ask for at least one image"),
        (["weights=last"], "weights=last: choose ema"),
    ],
)
def test_evaluate_errors_are_one_line(tiny_checkpoint, args, expected):
    root, ckpt = tiny_checkpoint
    result = run_module("fewstep.evaluate", f"ckpt={ckpt}", *args, cwd=root)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.slow
def test_report_of_an_empty_directory_is_one_line(tmp_path):
    result = run_module("fewstep.report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no result.json" in result.stderr


@pytest.mark.slow
def test_raw_weights_are_the_trained_ones_and_ema_the_average(tiny_checkpoint, tmp_path):
    """weights=raw (evaluate, sample) loads what the EMA hides: the checkpoint's current_model_state."""
    import torch

    from fewstep.checkpoints import load_method, read_checkpoint

    _, ckpt = tiny_checkpoint
    checkpoint = dict(read_checkpoint(ckpt, mmap=False))
    assert "current_model_state" in checkpoint  # Lightning's EMAWeightAveraging keeps the trained weights there
    # a checkpoint whose trained weights differ from their average, as after any real run
    checkpoint["current_model_state"] = {k: v + 1 if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    ema, raw = load_method(tmp_path / "moved.ckpt").state_dict(), load_method(tmp_path / "moved.ckpt", weights="raw").state_dict()
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(ema[key], value) and torch.equal(raw[key], checkpoint["current_model_state"][key])


@pytest.mark.slow
def test_evaluate_checkpoint_gives_the_row_the_command_line_writes(tiny_checkpoint, tmp_path):
    """The Python API and `python -m fewstep.evaluate` are one code path: the same settings give the same row."""
    from fewstep.errors import ConfigError
    from fewstep.evaluate import evaluate_checkpoint

    root, ckpt = tiny_checkpoint
    settings = ["sampler=euler", "nfe=2", "n=24", "batch_size=24", "metric=fid_domain", "seed=5"]
    result = run_module("fewstep.evaluate", f"ckpt={ckpt}", *settings, f"hydra.run.dir={tmp_path / 'cli'}", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    cli = json.loads((tmp_path / "cli" / "result.json").read_text())
    row = evaluate_checkpoint(ckpt, "euler", nfe=2, n=24, metric="fid_domain", batch_size=24, seed=5, out=tmp_path / "api")
    different = {"images_per_second", "device"}  # the machine's, not the result's

    def same(r, leave_out=()):  # as JSON text: a NaN (no dark pixels) equals itself there
        return json.dumps({k: v for k, v in r.items() if k not in leave_out}, sort_keys=True)

    assert same(row) == same(json.loads((tmp_path / "api" / "result.json").read_text()))
    assert same(row, different) == same(cli, different)
    # a sampler with options, and nothing written without out=
    row = evaluate_checkpoint(ckpt, {"name": "edm_sde", "s_churn": 10.0}, nfe=3, n=24, metric="fid_domain", batch_size=24)
    assert row["sampler"] == "edm_sde" and row["sampler_options"]["s_churn"] == 10.0 and row["nfe"] == 3
    with pytest.raises(ConfigError, match="evaluate_checkpoint got nfes=: not an option of conf/evaluate.yaml"):
        evaluate_checkpoint(ckpt, nfes=4)
