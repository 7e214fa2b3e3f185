"""tools/gpu_check.sh / gpu_check.py: the table's shape, the time budget, the children's protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_check as gc
from helpers import REPO

COLUMNS = {s.key: s.columns for s in gc.SECTIONS}


def run_wrapper(out, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """'### N. title' -> the rows of the table under it (header row first)."""
    found, current = {}, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            current = found.setdefault(line[4:].split(". ", 1)[1], [])
        elif line.startswith("| ") and current is not None:
            current.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return found


def check_output(out, sections: list[str]) -> tuple[str, dict]:
    markdown = (out / "gpu_check.md").read_text()
    document = json.loads((out / "gpu_check.json").read_text())
    assert markdown.startswith("## GPU check: ")
    for key in ("date", "host", "device", "GPUs", "torch", "CUDA", "cuDNN", "lightning", "total wall time"):
        assert f"\n- {key}: " in markdown, key
    found = tables(markdown)
    assert list(found) == [gc.SECTION[key].title for key in sections]
    for key in sections:
        rows = found[gc.SECTION[key].title]
        assert rows[0] == list(COLUMNS[key]), rows[0]
        assert len(rows) > 1 and all(len(row) == len(COLUMNS[key]) for row in rows), rows
    assert [s["key"] for s in document["sections"]] == sections
    for section in document["sections"]:
        assert section["errors"] == [], (section["key"], section["errors"])
        assert not any(str(v).startswith(("error", "timed out")) for row in section["rows"] for v in row.values())
    return markdown, document


@pytest.mark.slow
def test_cpu_training_section_through_the_wrapper(tmp_path):
    """The wrapper, one child process and both outputs, on the cheapest section."""
    result = run_wrapper(tmp_path, "--only", "train", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    markdown, document = check_output(tmp_path, ["train"])
    rows = document["sections"][0]["rows"]
    eager = [r for r in rows if r["compile"] == "no"]
    assert [r["precision"] for r in eager] == ["32-true", "bf16-mixed"]
    assert all(isinstance(r["images/s"], float) and r["images/s"] > 0 for r in eager)
    assert eager[0]["vs fp32 eager"] == 1.0
    compiled = [r for r in rows if r["compile"] == "yes"]
    assert len(compiled) == 2 and all(r["images/s"].startswith("skipped: --cpu") for r in compiled)
    assert "| unet_tiny | 32-true | no |" in markdown and "| 1.00x |" in markdown
    assert markdown in result.stdout  # printed, to be pasted as it is
    assert (tmp_path / "gpu_check.log").read_text().count("===== train:unet_tiny") == 1


@pytest.mark.slow
def test_cpu_mode_runs_every_section(tmp_path):
    start = time.monotonic()
    result = run_wrapper(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    markdown, document = check_output(tmp_path, [s.key for s in gc.SECTIONS])
    assert time.monotonic() - start < 180
    sections = {s["key"]: s["rows"] for s in document["sections"]}
    assert [r["method"] for r in sections["memory"]] == [*gc.TEACHERS, *gc.STUDENTS]
    assert all(r["peak memory (GiB)"] == "n/a (cpu)" and r["step time (s)"] > 0 for r in sections["memory"])
    sampler = [r for r in sections["sampler"] if "noise" in r]
    assert {r["noise"] for r in sampler} == {"global", "per_image"} and all(r["NFE"] >= 1 for r in sampler)
    assert sections["fid"][0]["images/s"] > 0 and sections["fid"][0]["50k-sample time"] > 0
    assert sections["ddp"][0]["batch per GPU"].startswith("skipped")


# ---------------------------------------------------------------- the budget, with a fake clock


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jobs_for_tests() -> list[gc.Job]:
    return [
        gc.Job("train:a", "train", 100, [gc.train_row("a", "32-true", False), gc.train_row("a", "bf16-mixed", False)]),
        gc.Job("fid", "fid", 50),
        gc.Job("memory", "memory", 200, [{"method": "edm_teacher"}, {"method": "gdd"}]),
        gc.Job("ddp", "ddp", 100, [{"GPUs": 1}], skip="skipped: 1 GPU"),
        gc.Job("compile:a", "train", 150, [gc.train_row("a", "bf16-mixed", True)]),
    ]


def test_runner_gives_each_job_the_lesser_of_its_budget_and_whats_left_then_skips():
    clock, calls = FakeClock(), []
    durations = {"train:a": 40, "fid": 50, "memory": 85}

    def launch(job, limit):
        calls.append((job.name, limit))
        clock.now += durations[job.name]
        if job.name == "fid":
            raise RuntimeError("CUDA error: out of memory\n(details)")
        return [{**row, "images/s": 10.0 if row["precision"] == "32-true" else 15.0} for row in job.pending] or [{}]

    runner = gc.Runner(deadline_s=180, start_min_s=20, launch=launch, clock=clock)
    results = runner.run(jobs_for_tests())
    # 180 s: train gets its 100, fid its 50 (140 left), memory the 90 left, not its 200; then 5 s are left
    assert calls == [("train:a", 100), ("fid", 50), ("memory", 90)]
    assert results["fid"]["status"] == "error: RuntimeError: CUDA error: out of memory (details)"
    assert results["fid"]["rows"] == [{"what": "error: RuntimeError: CUDA error: out of memory (details)"}]
    assert results["ddp"]["rows"] == [{"GPUs": 1, "model": "skipped: 1 GPU"}]
    assert results["compile:a"]["status"] == "skipped: time budget"
    assert results["compile:a"]["rows"] == [{**gc.train_row("a", "bf16-mixed", True), "images/s": "skipped: time budget"}]
    assert runner.remaining() == pytest.approx(5)

    sections = gc.gather(results)
    assert [r.get("vs fp32 eager") for r in sections["train"]] == [1.0, 1.5, None]
    assert gc.problems(sections["fid"]) and not gc.problems(sections["train"])


def test_runner_skips_everything_once_the_deadline_has_passed():
    clock = FakeClock()

    def launch(job, limit):
        clock.now += 1000
        return [{"what": "ran", "batch": 1}]

    results = gc.Runner(deadline_s=100, start_min_s=20, launch=launch, clock=clock).run(jobs_for_tests())
    statuses = [r["status"] for r in results.values()]
    assert statuses == ["ran", "skipped: time budget", "skipped: time budget", "skipped: 1 GPU", "skipped: time budget"]
    assert results["memory"]["rows"] == [{"method": m, "network": "skipped: time budget"} for m in ("edm_teacher", "gdd")]


def test_plan_orders_compile_last_and_skips_ddp_and_compile_where_they_cannot_run():
    names = [j.name for j in gc.plan(gc.GPU, cpu=False, gpus=1)]
    assert names == ["train:unet_cifar", "train:edm_ddpmpp_cifar", "memory", "fid", "sampler", "ddp",
                     "compile:unet_cifar", "compile:edm_ddpmpp_cifar"]
    jobs = {j.name: j for j in gc.plan(gc.GPU, cpu=False, gpus=4)}
    assert jobs["ddp"].skip is None and jobs["compile:unet_cifar"].skip is None
    assert gc.plan(gc.GPU, cpu=False, gpus=1)[5].skip == "skipped: 1 GPU"
    cpu = {j.name: j for j in gc.plan(gc.CPU, cpu=True, gpus=0)}
    assert cpu["compile:unet_tiny"].skip.startswith("skipped: --cpu") and cpu["ddp"].skip.startswith("skipped")
    assert [j.section for j in gc.plan(gc.CPU, cpu=True, gpus=0, only={"fid"})] == ["fid"]
    # the GPU budgets fit the 8 minutes: the deadline bounds the sum, and each job has a cap
    assert gc.GPU.deadline_s <= 7.5 * 60 and all(j.budget_s <= 160 for j in gc.plan(gc.GPU, cpu=False, gpus=8))


# ---------------------------------------------------------------- tables


def test_table_formats_numbers_by_column_and_escapes_cells():
    rows = [{"what": "a|b\nc", "batch": 512, "images/s": 1234.567, "50k-sample time": 40.5},
            {"what": "x", "batch": 4, "images/s": 2.5, "50k-sample time": 20000.0},
            {"what": "error: boom"}]
    text = gc.table(gc.SECTION["fid"].columns, rows)
    assert text.splitlines() == [
        "| what | batch | images/s | 50k-sample time |",
        "|---|---|---|---|",
        "| a\\|b c | 512 | 1234.6 | 40.5 s |",
        "| x | 4 | 2.5 | 5.6 h |",
        "| error: boom | - | - | - |",
    ]
    assert gc.cell("overhead", 0.0333) == "+3.3%" and gc.cell("vs fp32 eager", 1.414) == "1.41x"
    assert gc.cell("images/s", float("nan")) == "nan" and gc.duration(600) == "10.0 min"


def test_render_has_a_header_list_and_numbered_sections():
    sections = {s.key: [] for s in gc.SECTIONS}
    sections["train"] = [{**gc.train_row("m", "32-true", False), "images/s": 5.0, "vs fp32 eager": 1.0}]
    text = gc.render({"device": "NVIDIA H200", "torch": "2.11"}, sections, {"train": "A note."}, {"train", "ddp"})
    assert text.startswith("## GPU check: NVIDIA H200\n\n- device: NVIDIA H200\n- torch: 2.11\n")
    assert "### 1. Training throughput of the Lightning step\n\nA note.\n\n| model |" in text
    assert "### 5. trainer=ddp on all GPUs" in text and "### 2." not in text


def test_complete_marks_the_rows_a_child_did_not_write():
    pending = [gc.train_row("m", p, True) for p in ("bf16-mixed", "32-true")]
    done = [{**pending[0], "images/s": 9.0}]
    rows = gc.complete(done, pending, "timed out: stopped after 60 s (time budget)", "train")
    assert rows == [done[0], {**pending[1], "images/s": "timed out: stopped after 60 s (time budget)"}]
    assert gc.complete([], [], "error: no row written", "fid") == [{"what": "error: no row written"}]


# ---------------------------------------------------------------- the sampler tool's output


SAMPLER_JSON = [
    {"solver": "euler", "noise": "global", "nfe": 32, "ms_per_nfe": 25.5, "bare_ms_per_call": 26.6, "overhead": -0.042},
    {"solver": "seeds3", "noise": "per_image", "nfe": 30, "ms_per_nfe": 27.0, "bare_ms_per_call": 26.0, "overhead": 0.0385},
]


@pytest.mark.parametrize("document", [SAMPLER_JSON, {"rows": SAMPLER_JSON, "device": "cpu"}])
def test_sampler_json_rows_become_table_rows(tmp_path, document):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(document))
    rows = gc.sampler_rows(path, 0, "", False, 60)
    assert rows[1] == {"solver": "seeds3", "noise": "per_image", "NFE": 30, "ms per NFE": 27.0,
                       "bare ms per call": 26.0, "overhead": 0.0385}
    assert gc.table(gc.SECTION["sampler"].columns, rows).splitlines()[2] == "| euler | global | 32 | 25.500 | 26.600 | -4.2% |"


def test_sampler_failures_become_one_error_row(tmp_path):
    (tmp_path / "bad.json").write_text('[{"solver": "euler"}]')
    assert gc.sampler_rows(tmp_path / "bad.json", 0, "", False, 60)[0]["solver"].startswith(
        "error: unreadable --json output: KeyError")
    rows = gc.sampler_rows(tmp_path / "none.json", 2, "error: unrecognized arguments: --json x", False, 60)
    assert rows == [{"solver": "error: tools/bench_sampler_overhead.py exit code 2: error: unrecognized arguments: --json x"}]
    assert gc.sampler_rows(tmp_path / "none.json", None, "", True, 60)[0]["solver"].startswith("timed out")


# ---------------------------------------------------------------- children


@pytest.mark.slow
def test_call_stops_a_slow_child_and_its_own_children(tmp_path):
    log = tmp_path / "log"
    script = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); "
              "time.sleep(60)")
    start = time.monotonic()
    rc, tail, timed_out = gc.call([sys.executable, "-c", script], 3, log, "slow")
    assert timed_out and rc is None and time.monotonic() - start < 15
    grandchild = int(tail)
    time.sleep(0.5)
    stat = Path(f"/proc/{grandchild}/stat")  # killed with its group: gone, or a zombie its new parent has not reaped
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    rc, tail, timed_out = gc.call([sys.executable, "-c", "print('one'); print('last line'); raise SystemExit(3)"], 30,
                                  log, "fails")
    assert (rc, tail, timed_out) == (3, "last line", False)
    assert log.read_text().count("=====") == 2


@pytest.mark.slow
def test_child_errors_become_rows_of_the_pending_ones(tmp_path):
    """A child that fails before its first row (here: a job it does not know): every pending row says why."""
    pending = [gc.train_row("m", "32-true", False), gc.train_row("m", "bf16-mixed", False)]
    job = gc.Job("nope:m", "train", 60, pending)
    rows = gc.run_child(job, 60, "cpu", tmp_path, tmp_path / "log", ["--cpu"])
    assert rows == [{**row, "images/s": "error: KeyError: 'nope'"} for row in pending]
    assert "Traceback" in (tmp_path / "log").read_text()  # the child's traceback is kept in the log


@pytest.mark.slow
def test_ddp_job_on_two_cpu_processes(tmp_path):
    """Section 5's code path (Lightning starts a second rank that reruns the child; rank 0 alone writes the row)."""
    (job,) = [j for j in gc.plan(gc.CPU, cpu=False, gpus=2) if j.name == "ddp"]
    assert job.skip is None
    rows = gc.run_child(job, 300, "cpu", tmp_path, tmp_path / "log", ["--cpu"])
    assert len(rows) == 1 and rows[0]["GPUs"] == 2 and rows[0]["batch per GPU"] == gc.CPU.train_batch, rows
    assert rows[0]["images/s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is there")
def test_without_a_gpu_the_full_mode_refuses_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # fewstep from this checkout, as the wrapper gives it
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run with --cpu" in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--only", "fid,nope",
                             "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown section(s) ['nope']" in result.stderr
