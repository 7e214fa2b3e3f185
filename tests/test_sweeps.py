"""Sweeps the ecosystem's way: Hydra's Optuna sweeper (hparams_search=*_optuna) and submitit launchers
(hydra/launcher=slurm, hydra/launcher=local), run as a user runs them."""

import json
import os
import sqlite3
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fewstep.cli import CONF_DIR

from helpers import run_module

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweeps extra: pip install -e '.[sweeps]'")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweeps extra: pip install -e '.[sweeps]'")

TINY_DATA = ["data=digits", "model=unet_tiny", "trainer=debug", "data.limit=64", "data.val_size=16", "logger=csv"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))  # domain classifiers and real statistics


def sweep_dir(root):
    (found,) = root.glob("multirun/*/optimization_results.yaml")
    return found.parent


@pytest.mark.slow
def test_optuna_teacher_sweep_with_shared_storage(tmp_path):
    db = tmp_path / "optuna.db"
    result = run_module(
        "fewstep.train", "-m", "hparams_search=teacher_optuna", "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{db}", *TINY_DATA, f"paths.root={tmp_path / 'out'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(tmp_path / "out")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert set(best["best_params"]) == {"method.optimizer.lr", "data.batch_size", "callbacks.ema.decay"}
    assert 1e-4 <= best["best_params"]["method.optimizer.lr"] <= 3e-3 and best["best_params"]["data.batch_size"] in (16, 32, 64)
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"]  # one run directory per trial
    # the study lives in the storage, where another process (same storage and study_name) would add its trials
    with sqlite3.connect(db) as connection:
        (study,) = connection.execute("select study_name from studies").fetchall()
        trials = connection.execute(
            "select t.state, v.value from trials t join trial_values v on v.trial_id = t.trial_id"
        ).fetchall()
    assert study == ("edm_teacher",)
    assert [state for state, _ in trials] == ["COMPLETE", "COMPLETE"]
    assert best["best_value"] == pytest.approx(min(value for _, value in trials))  # val/loss, minimised

    # another process (its own seed and sweep dir) continues the same study
    again = run_module(
        "fewstep.train", "-m", "hparams_search=teacher_optuna", "hydra.sweeper.n_trials=1", "hydra.sweeper.sampler.seed=2",
        f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={tmp_path / 'second'}", *TINY_DATA,
        f"paths.root={tmp_path / 'out'}", cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    with sqlite3.connect(db) as connection:
        assert connection.execute("select count(*) from trials where state = 'COMPLETE'").fetchone() == (3,)
        values = [value for (value,) in connection.execute("select value from trial_values")]
    second = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert second["best_value"] == pytest.approx(min(values))  # the best of all three trials, both processes'


@pytest.mark.slow
def test_optuna_optimises_a_benchmark_metric(tmp_path):
    # benchmark/* reaches the sweeper from SamplerBenchmark's rows (gdd_optuna's one-step FID goes the same way)
    benchmark = [
        "callbacks=benchmark", "callbacks.sampler_benchmark.samplers=[euler]", "callbacks.sampler_benchmark.nfe=[1]",
        "callbacks.sampler_benchmark.n=16", "callbacks.sampler_benchmark.every_n_validations=1",
    ]
    result = run_module(
        "fewstep.train", "-m", "hparams_search=teacher_optuna", "hydra.sweeper.n_trials=1", *benchmark,
        "optimized_metric=benchmark/fid_domain/euler_nfe1", *TINY_DATA, f"paths.root={tmp_path / 'out'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(tmp_path / "out")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    (rows,) = sweep.glob("0/**/benchmark/results.jsonl")
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert best["best_value"] == pytest.approx(row["value"]) and row["nfe"] == 1


@pytest.mark.slow
def test_optuna_refuses_a_metric_the_run_did_not_log(tmp_path):
    wrong = run_module(
        "fewstep.train", "-m", "hparams_search=teacher_optuna", "hydra.sweeper.n_trials=1", "optimized_metric=val/nope",
        *TINY_DATA, f"paths.root={tmp_path / 'wrong'}", cwd=tmp_path,
    )
    assert wrong.returncode == 2
    (line,) = [line for line in wrong.stderr.splitlines() if line.startswith("fewstep: error:")]
    assert "optimized_metric=val/nope" in line and "val/loss" in line and "train/loss" in line


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_slurm_launcher_composes(entry):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            overrides = ["hydra/launcher=slurm", *(["ckpt=x"] if entry == "evaluate" else [])]
            cfg = compose(entry, overrides=overrides, return_hydra_config=True)
            local = compose(entry, overrides=[*overrides[1:], "hydra/launcher=local"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.timeout_min > 0 and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb > 0 and launcher.partition is None
    assert launcher.array_parallelism >= 1 and launcher.setup is None
    # submitit's logs beside the job directories of the sweep
    assert launcher.submitit_folder.startswith("outputs/multirun/") and launcher.submitit_folder.endswith("/.submitit/%j")
    assert local.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def nfe_sweep(tmp_path, ckpt, launcher: str):
    """The README's job-array NFE sweep (smaller): one result.json per job."""
    result = run_module(
        "fewstep.evaluate", "-m", f"hydra/launcher={launcher}", f"ckpt={ckpt}", "sampler=heun", "nfe=1,3",
        "metric=fid_domain", "n=16", "batch_size=16", f"paths.root={tmp_path / 'eval'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = tmp_path.glob("eval/multirun/evaluate/*")
    rows = {path.parent.name: json.loads(path.read_text()) for path in sweep.glob("*/result.json")}
    assert sorted(rows) == ["0", "1"]
    assert {(r["sampler"], r["nfe_budget"], r["nfe"]) for r in rows.values()} == {("heun", 1, 1), ("heun", 3, 3)}
    assert all(r["metric"] == "fid_domain" and r["value"] > 0 and r["n"] == 16 for r in rows.values())
    return sweep


@pytest.mark.slow
def test_nfe_sweep_through_the_submitit_local_executor(tiny_checkpoint, tmp_path):
    sweep = nfe_sweep(tmp_path, tiny_checkpoint[1], "local")
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # each job ran in its own submitit process


FAKE_SBATCH = """#!{python}
# sbatch stand-in: answers with a job id at once, then runs the array's tasks one after another in the background,
# with the environment SLURM gives an array task
import os, re, subprocess, sys, time
script = sys.argv[-1]
first, last = map(int, re.search(r"--array=(\\d+)-(\\d+)", open(script).read()).group(1, 2))
if os.fork() == 0:
    os.setsid()
    log = os.open(script + ".log", os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1)
    os.dup2(log, 2)
    time.sleep(1)  # submitit moves each task's pickled job into place once it has the job id
    for i in range(first, last + 1):
        env = {{**os.environ, "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(i), "SLURM_JOB_ID": str(5000 + i),
               "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost"}}
        subprocess.run(["bash", script], env=env)
    os._exit(0)
print("Submitted batch job 4242")
"""

FAKE_SRUN = """#!{python}
# srun stand-in: drops srun's options and runs the command
import os, sys
args = sys.argv[1:]
while args[0].startswith("--"):
    args = args[2:] if args[0] in ("--output", "--error") else args[1:]
os.execvp(args[0], args)
"""


@pytest.mark.slow
def test_nfe_sweep_as_a_slurm_job_array(tiny_checkpoint, tmp_path, monkeypatch):
    # hydra/launcher=slurm end to end, with sbatch and srun stand-ins (no cluster here): the sbatch script that
    # conf/hydra/launcher/slurm.yaml makes, one array task per NFE, each task's result read back by the launcher
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = nfe_sweep(tmp_path, tiny_checkpoint[1], "slurm")
    (script,) = sweep.glob(".submitit/*/*_submission.sh")
    directives = {line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")}
    assert {"--array=0-1%2", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=32GB",
            "--time=240", "--job-name=evaluate"} <= directives
    assert not any(d.startswith("--partition") for d in directives)  # partition: null, the cluster's default
    assert sorted(p.name for p in sweep.glob(".submitit/4242_*")) == ["4242_0", "4242_1"]


def test_gdd_optuna_optimises_what_its_benchmark_logs():
    # gdd_optuna's metric name is the one SamplerBenchmark logs for the setting it configures (a rename breaks here)
    from fewstep.callbacks.sampler_benchmark import tag_of

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["hparams_search=gdd_optuna"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    bench = cfg.callbacks.sampler_benchmark
    (sampler,), (nfe,) = bench.samplers, bench.nfe
    row = {"sampler": sampler, "nfe_budget": nfe, "grid": bench.grid, "guidance": 0.0}
    assert cfg.hydra.sweeper.params.optimized_metric == f"benchmark/{bench.metric}/{tag_of(row)}"
    assert cfg.method._target_.endswith("GDD") and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper.sampler.seed is not None and cfg.hydra.sweeper.storage is None
