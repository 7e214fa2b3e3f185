"""One prepared run of every GPU figure docs/benchmarks.md lacks, inside a fixed time budget; prints a markdown table.

    bash tools/gpu_check.sh [--cpu] [--out DIR]          # the wrapper: nvidia-smi, then this script
    python tools/gpu_check.py [--cpu] [--out DIR] [--deadline SECONDS] [--only train,memory,...]

Sections (each run in its own child process with its own time limit, so a crash, an out-of-memory error
or a slow torch.compile costs one section's rows, never the run; rows come back as they are measured):

1. train: the Lightning step's images/s (``tools/bench_train.py``'s ``lightning_loop``) for unet_cifar and
   edm_ddpmpp_cifar at batch 128, fp32 / bf16-mixed x eager / torch.compile. The compiled rows run last,
   in whatever time the other sections leave.
2. memory: peak GPU memory and step time of one training step of each method (the teachers, then every
   distillation student with its teacher, critic or discriminator), through ``fewstep.train.train``.
3. sampler: per-NFE solver overhead against bare network calls (``tools/bench_sampler_overhead.py --json``).
4. fid: FID Inception images/s and the time of a 50,000-sample FID (the papers' protocol), plus EDM DDPM++
   sampling at batch 512.
5. ddp: the Lightning step with ``trainer=ddp`` on every GPU, if there are several.

A global deadline (``--deadline``, 450 s on a GPU) bounds the run: a section that cannot start in time
gets a "skipped: time budget" row, one that runs out of time is stopped with the rows it had. CIFAR-10 is
read from ``--cifar-root`` when given; otherwise a synthetic data set of CIFAR-10's shape (random 32x32 RGB
PNGs in EDM's folder format, ``data=edm_zip``) stands in: an image's content does not change the speed.
``--cpu``: the same sections and columns at tiny settings (unet_tiny, 8x8 digits, batch 8), to check the
code paths without a GPU; compiled rows are marked, not run. Writes DIR/gpu_check.md, DIR/gpu_check.json
and DIR/gpu_check.log (every child's output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from fewstep.bench import cpu_name
from fewstep.errors import one_line
from fewstep.methods import METHODS

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
PAPER_N = 50_000
GIB = 2**30


# ---------------------------------------------------------------- sections, settings and jobs


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    columns: tuple[str, ...]
    note: str = ""


SECTIONS = [
    Section("train", "Training throughput of the Lightning step",
            ("model", "precision", "compile", "images/s", "vs fp32 eager")),
    Section("memory", "Peak GPU memory of one training step per method",
            ("method", "network", "batch", "peak memory (GiB)", "step time (s)")),
    Section("sampler", "Per-NFE sampling overhead against bare network calls",
            ("solver", "noise", "NFE", "ms per NFE", "bare ms per call", "overhead")),
    Section("fid", "FID Inception throughput and the time of a 50,000-sample FID",
            ("what", "batch", "images/s", "50k-sample time")),
    Section("ddp", "trainer=ddp on all GPUs", ("GPUs", "model", "batch per GPU", "images/s", "vs 1 GPU")),
]
SECTION = {s.key: s for s in SECTIONS}

# How each numeric cell is written in the markdown (the JSON keeps the numbers).
FORMATS: dict[str, Callable[[float], str]] = {
    "images/s": lambda v: f"{v:.1f}",
    "vs fp32 eager": lambda v: f"{v:.2f}x",
    "vs 1 GPU": lambda v: f"{v:.2f}x",
    "peak memory (GiB)": lambda v: f"{v:.2f}",
    "step time (s)": lambda v: f"{v:.3f}",
    "ms per NFE": lambda v: f"{v:.3f}",
    "bare ms per call": lambda v: f"{v:.3f}",
    "overhead": lambda v: f"{v:+.1%}",
    "50k-sample time": lambda v: duration(v),
}

# The methods of section 2, every one of fewstep.methods.METHODS: teachers first (their checkpoints teach the students
# after them), each student with the first teacher of the kind it distils.
TEACHERS = [name for name, (cls, _) in METHODS.items() if not hasattr(cls, "teacher_kind")]
STUDENTS = {name: next(t for t in TEACHERS if issubclass(METHODS[t][0], cls.teacher_kind))
            for name, (cls, _) in METHODS.items() if hasattr(cls, "teacher_kind")}
STUDENT_OPTIONS = {  # staged methods: one stage; scm: its teacher's mode (sCD)
    "progressive": ["method.end_steps=16"], "kac_endpoint": ["method.stages=[100,20]", "method.steps_per_stage=400"],
    "scm": ["method.mode=scd"],
}


@dataclass(frozen=True)
class Settings:
    """Everything a mode (GPU or --cpu) changes."""

    deadline_s: float
    start_min_s: float                     # a job that cannot get this much time is skipped
    train_models: tuple[str, ...]
    train_batch: int
    train_steps: int
    train_warmup: int
    compile: bool                          # run the torch.compile rows (minutes of compiling on a CPU)
    compile_min_s: float                   # a compiled row needs at least this much of its job's time left
    memory_model: str
    memory_batch: int
    memory_warmup: int
    memory_timed: int
    sampler_args: tuple[str, ...]
    fid_batch: int
    fid_repeats: int
    fid_sample_model: str
    fid_samplers: tuple[str, ...]
    fid_sample_batch: int
    fid_nfe: int
    budgets: dict[str, float] = field(default_factory=dict)  # job name -> its own cap in seconds


GPU = Settings(
    deadline_s=450.0, start_min_s=20.0,
    train_models=("unet_cifar", "edm_ddpmpp_cifar"), train_batch=128, train_steps=20, train_warmup=5,
    compile=True, compile_min_s=45.0,
    memory_model="unet_cifar", memory_batch=128, memory_warmup=1, memory_timed=2,
    sampler_args=("--device", "cuda", "--model", "cifar", "--batch", "128", "--nfe", "32", "--repeats", "3"),
    fid_batch=512, fid_repeats=3, fid_sample_model="edm_ddpmpp_cifar", fid_samplers=("heun", "seeds3"),
    fid_sample_batch=512, fid_nfe=35,
    budgets={"train:unet_cifar": 75, "train:edm_ddpmpp_cifar": 75, "memory": 150, "sampler": 160, "fid": 60,
             "ddp": 120, "compile:unet_cifar": 150, "compile:edm_ddpmpp_cifar": 150},
)
CPU = Settings(
    deadline_s=170.0, start_min_s=5.0,
    train_models=("unet_tiny",), train_batch=8, train_steps=2, train_warmup=1,
    compile=False, compile_min_s=0.0,
    memory_model="unet_tiny", memory_batch=8, memory_warmup=1, memory_timed=1,
    sampler_args=("--device", "cpu", "--model", "tiny", "--batch", "8", "--nfe", "8", "--repeats", "1"),
    fid_batch=4, fid_repeats=1, fid_sample_model="edm_ddpmpp_cifar", fid_samplers=("euler",),
    fid_sample_batch=2, fid_nfe=1,
    budgets={"train:unet_tiny": 60, "memory": 100, "sampler": 60, "fid": 60},
)


@dataclass
class Job:
    """One child process: ``name`` (the job function and its options), the section its rows go to, the rows
    it would write (for the table when it cannot run), and how long it may take."""

    name: str
    section: str
    budget_s: float
    pending: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    skip: str | None = None                # a reason not to run it at all ("skipped: 1 GPU")


def plan(settings: Settings, cpu: bool, gpus: int, only: set[str] | None = None) -> list[Job]:
    """The jobs in the order they run: the cheap figures the docs lack first, torch.compile last."""
    s = settings
    jobs = []
    for model in s.train_models:
        rows = [train_row(model, p, False) for p in ("32-true", "bf16-mixed")]
        jobs.append(Job(f"train:{model}", "train", s.budgets.get(f"train:{model}", 60), rows,
                        {"model": model, "compiled": False}))
    jobs.append(Job("memory", "memory", s.budgets.get("memory", 100),
                    [{"method": m} for m in [*TEACHERS, *STUDENTS]]))
    jobs.append(Job("fid", "fid", s.budgets.get("fid", 60)))
    jobs.append(Job("sampler", "sampler", s.budgets.get("sampler", 60)))  # docs/benchmarks.md has H100 figures
    ddp = Job("ddp", "ddp", s.budgets.get("ddp", 120), [{"GPUs": gpus, "model": s.train_models[0]}])
    if cpu or gpus < 2:
        ddp.skip = "skipped: no GPU (--cpu)" if cpu else f"skipped: {gpus} GPU"
    jobs.append(ddp)
    for model in s.train_models:
        rows = [train_row(model, p, True) for p in ("bf16-mixed", "32-true")]  # bf16 first: what one would run
        job = Job(f"compile:{model}", "train", s.budgets.get(f"compile:{model}", 150), rows,
                  {"model": model, "compiled": True})
        if not s.compile:
            job.skip = "skipped: --cpu (compiling takes minutes on a CPU)"
        jobs.append(job)
    return [job for job in jobs if only is None or job.section in only]


def train_row(model: str, precision: str, compiled: bool) -> dict:
    return {"model": model, "precision": precision, "compile": "yes" if compiled else "no"}


# ---------------------------------------------------------------- the parent: budget, children, tables


class Runner:
    """Runs jobs one after another under a global deadline; ``clock`` and ``launch`` are replaceable (tests)."""

    def __init__(self, deadline_s: float, start_min_s: float, launch: Callable[[Job, float], list[dict]],
                 clock: Callable[[], float] = time.monotonic, on_job_done: Callable[[], None] | None = None):
        self.deadline_s, self.start_min_s, self.launch, self.clock = deadline_s, start_min_s, launch, clock
        self.on_job_done = on_job_done
        self.start = clock()
        self.results: dict[str, dict] = {}   # job name -> {"rows", "seconds", "limit_s", "status"}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.deadline_s - self.elapsed()

    def run(self, jobs: list[Job]) -> dict[str, dict]:
        for job in jobs:
            began = self.clock()
            limit = min(job.budget_s, self.remaining())
            if job.skip:
                rows, status = mark(job.pending, job.skip, job.section), job.skip
            elif limit < self.start_min_s:
                status = "skipped: time budget"
                rows = mark(job.pending, status, job.section)
            else:
                try:
                    rows, status = self.launch(job, limit), "ran"
                except Exception as error:  # the launcher itself failed: this job's rows carry the error
                    status = f"error: {type(error).__name__}: {one_line(error)}"
                    rows = mark(job.pending, status, job.section)
            self.results[job.name] = {"section": job.section, "rows": rows, "status": status,
                                      "seconds": round(self.clock() - began, 1), "limit_s": round(max(limit, 0), 1)}
            if self.on_job_done:
                self.on_job_done()
        return self.results


def mark(pending: list[dict], status: str, section: str) -> list[dict]:
    """The rows a job would have written, each with ``status`` in its first empty column (one row if none)."""
    columns = SECTION[section].columns
    rows = [dict(row) for row in pending] or [{}]
    for row in rows:
        empty = [c for c in columns if c not in row]
        row[empty[0] if empty else columns[-1]] = status
    return rows


def complete(rows: list[dict], pending: list[dict], status: str, section: str) -> list[dict]:
    """``rows`` plus, for every pending row no row answered (same key columns), that row marked ``status``."""
    def key(row):
        return tuple((k, row[k]) for k in sorted(row))

    answered = {key({k: row.get(k) for k in p}) for row in rows for p in pending}
    missing = [p for p in pending if key(p) not in answered]
    if missing or not rows:
        rows = rows + mark(missing, status, section)
    return rows


def run_child(job: Job, limit_s: float, settings_name: str, workdir: Path, log: Path, extra: list[str]) -> list[dict]:
    """Runs ``job`` (ours, or the sampler tool) in a child process with ``limit_s``; returns its rows."""
    rows_path = workdir / f"{job.name.replace(':', '_')}.rows"
    rows_path.unlink(missing_ok=True)
    if job.name == "sampler":
        settings = CPU if settings_name == "cpu" else GPU
        argv = [sys.executable, str(TOOLS / "bench_sampler_overhead.py"), *settings.sampler_args, "--json", str(rows_path)]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--job", job.name, "--rows", str(rows_path),
                "--job-options", json.dumps(job.options), "--job-limit", f"{limit_s:.1f}", *extra]
    rc, tail, timed_out = call(argv, limit_s, log, job.name)
    if job.name == "sampler":
        return sampler_rows(rows_path, rc, tail, timed_out, limit_s)
    rows = read_rows(rows_path)
    failures = [row.pop("_error") for row in rows if "_error" in row]
    rows = [row for row in rows if row]
    if failures:
        return complete(rows, job.pending, failures[0], job.section)
    if timed_out:
        return complete(rows, job.pending, f"timed out: stopped after {limit_s:.0f} s (time budget)", job.section)
    if rc != 0:
        return complete(rows, job.pending, f"error: exit code {rc}: {tail}", job.section)
    return complete(rows, job.pending, "error: no row written", job.section)


def call(argv: list[str], limit_s: float, log: Path, name: str) -> tuple[int | None, str, bool]:
    """Runs argv with its output appended to ``log``; stops its whole process group after ``limit_s``.
    Returns (exit code, last non-empty output line, timed out)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with open(log, "a") as out:
        out.write(f"\n===== {name}: {' '.join(argv)}\n")
        out.flush()
        start = out.tell()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc, timed_out = process.wait(timeout=max(limit_s, 1)), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:
            stop(process)
    with open(log) as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    return rc, one_line(lines[-1])[:300] if lines else "", timed_out


def stop(process: subprocess.Popen) -> None:
    """Ends the child's process group (its compile workers and DDP ranks too), TERM first, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=wait)
            if sig == signal.SIGTERM:
                continue  # the leader is gone; KILL whatever of its group is left
        except subprocess.TimeoutExpired:
            pass


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill
            pass
    return rows


def sampler_rows(path: Path, rc: int | None, tail: str, timed_out: bool, limit_s: float) -> list[dict]:
    """bench_sampler_overhead's JSON rows as this table's."""
    if timed_out:
        return [{"solver": f"timed out: stopped after {limit_s:.0f} s (time budget)"}]
    if rc == 0 and path.is_file():
        try:
            document = json.loads(path.read_text())
            if isinstance(document, dict):  # {"rows": [...], ...} as well as a bare list
                document = document.get("rows", document.get("results"))
            return [sampler_row(row) for row in document] or [{"solver": "error: --json wrote no rows"}]
        except (ValueError, KeyError, TypeError) as error:
            return [{"solver": f"error: unreadable --json output: {type(error).__name__}: {one_line(error)}"}]
    return [{"solver": f"error: tools/bench_sampler_overhead.py exit code {rc}: {tail}"}]


def sampler_row(row: dict) -> dict:
    return {"solver": row["solver"], "noise": row["noise"], "NFE": row["nfe"], "ms per NFE": float(row["ms_per_nfe"]),
            "bare ms per call": float(row["bare_ms_per_call"]), "overhead": float(row["overhead"])}


def add_ratios(sections: dict[str, list[dict]]) -> None:
    """vs fp32 eager (per model) and vs 1 GPU (against the 1-GPU bf16 eager row), filled in across jobs."""
    train = sections.get("train", [])
    base = {r["model"]: r["images/s"] for r in train
            if r.get("precision") == "32-true" and r.get("compile") == "no" and is_number(r.get("images/s"))}
    for row in train:
        if is_number(row.get("images/s")) and row.get("model") in base and "vs fp32 eager" not in row:
            row["vs fp32 eager"] = row["images/s"] / base[row["model"]]
    one_gpu = {r["model"]: r["images/s"] for r in train
               if r.get("precision") == "bf16-mixed" and r.get("compile") == "no" and is_number(r.get("images/s"))}
    for row in sections.get("ddp", []):
        if is_number(row.get("images/s")) and row.get("model") in one_gpu:
            row["vs 1 GPU"] = row["images/s"] / one_gpu[row["model"]]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cell(column: str, value) -> str:
    if value is None:
        return "-"
    if is_number(value) and column in FORMATS:
        text = FORMATS[column](float(value))
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return one_line(text).replace("|", "\\|")


def table(columns: tuple[str, ...], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    """The error cells of a section's rows (what the test and the exit code look at)."""
    return [str(v) for row in rows for v in row.values() if isinstance(v, str) and v.startswith(("error", "timed out"))]


def gather(results: dict[str, dict]) -> dict[str, list[dict]]:
    sections = {s.key: [] for s in SECTIONS}
    for result in results.values():
        sections[result["section"]].extend(result["rows"])
    add_ratios(sections)
    return sections


def render(header: dict, sections: dict[str, list[dict]], notes: dict[str, str], ran: set[str]) -> str:
    """The markdown that goes into docs/benchmarks.md as it is."""
    lines = [f"## GPU check: {header['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    for number, section in enumerate(SECTIONS, start=1):
        if section.key not in ran:
            continue
        lines += ["", f"### {number}. {section.title}", ""]
        if notes.get(section.key):
            lines += [notes[section.key], ""]
        lines.append(table(section.columns, sections[section.key]))
    return "\n".join(lines) + "\n"


def section_notes(settings: Settings, cpu: bool, data: str) -> dict[str, str]:
    s = settings
    precision = "fp32 rows use TF32 matmuls (as bench_train --speedups), " if not cpu else ""
    return {
        "train": f"`tools/bench_train.py`'s `lightning_loop` (EDM teacher, EMA, LR monitor, TensorBoard), batch "
                 f"{s.train_batch}, {s.train_steps} timed steps after {s.train_warmup} (compiling falls in those), "
                 f"one run each; {precision}data: {data}.",
        "memory": f"One `fewstep.train.train` run per method ({'trainer=gpu, bf16-mixed' if not cpu else 'trainer=cpu'}, "
                  f"model={s.memory_model}, data: {data}), stopped after {s.memory_warmup + s.memory_timed} batches: "
                  f"peak = `torch.cuda.max_memory_allocated()` over the run, teacher, student and critic or "
                  f"discriminator together, above what was allocated before it; step time = median of the last "
                  f"{s.memory_timed} batches (a batch: every optimiser step of the method). Students get a "
                  f"{s.memory_warmup + s.memory_timed}-step teacher of the same network; progressive and kac_endpoint "
                  f"run their first stage only.",
        "sampler": f"`python tools/bench_sampler_overhead.py {' '.join(s.sampler_args)} --json F`: each solver against "
                   f"the same number of bare denoiser calls; global: SDE noise from torch's generator, per_image: the "
                   f"per-image seeded noise `fewstep.sample` uses (an image does not depend on its batch).",
        "fid": f"FID Inception (`fewstep.metrics.inception.InceptionFeatures`, fp32) on uint8 32x32 images resized "
               f"to 299, median of {s.fid_repeats} batches after one warm-up; the sampling rows draw batch "
               f"{s.fid_sample_batch} from {s.fid_sample_model} (random weights) at {s.fid_nfe} NFE, and their "
               f"50k time adds the features'.",
        "ddp": f"The Lightning step with `trainer=ddp` (bf16-mixed) on every GPU, batch {s.train_batch} per GPU; "
               f"vs 1 GPU: against section 1's bf16-mixed eager row.",
    }


def environment(cpu: bool) -> tuple[dict, int]:
    """Header lines and the GPU count (0 without torch or CUDA)."""
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "host": socket.gethostname()}
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
            header["device"] = ", ".join(names) + (f" (x{gpus})" if gpus > 1 else "")
        else:
            header["device"] = f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
        header["GPUs"] = gpus
        header["torch"] = torch.__version__
        header["CUDA"] = torch.version.cuda or "none"
        header["cuDNN"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    except Exception as error:  # no torch: every section will say so too
        header.update(device="unknown", GPUs=0, torch=f"not importable: {one_line(error)}")
    for package in ("lightning",):
        try:
            header[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            header[package] = "not installed"
    header["python"] = platform.python_version()
    header["mode"] = "--cpu (tiny settings: shapes and code paths, not figures)" if cpu else "GPU"
    return header, gpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny settings on the CPU: the table's shape, in minutes")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="where gpu_check.md/.json/.log go")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default 450, --cpu 170)")
    parser.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTION))
    parser.add_argument("--cifar-root", default=os.environ.get("CIFAR10_ROOT"),
                        help="a torchvision CIFAR-10 root (cifar-10-batches-py); default: synthetic data of its shape")
    parser.add_argument("--job", help=argparse.SUPPRESS)           # the child's side, below
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--job-options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--job-limit", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        return child(args)

    wall = time.monotonic()
    settings = CPU if args.cpu else GPU
    if args.deadline is not None:
        settings = Settings(**{**settings.__dict__, "deadline_s": args.deadline})
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(SECTION):
        parser.error(f"--only: unknown section(s) {sorted(only - set(SECTION))}; choose from {', '.join(SECTION)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    header, gpus = environment(args.cpu)
    if not args.cpu and not gpus:
        print("gpu_check: no CUDA GPU visible; run with --cpu for the reduced mode", file=sys.stderr)
        return 2
    cifar = args.cifar_root if args.cifar_root and (Path(args.cifar_root) / "cifar-10-batches-py").is_dir() else None
    data = ("digits (scikit-learn's 8x8)" if args.cpu else
            f"CIFAR-10 from {cifar}" if cifar else "synthetic CIFAR-10-shaped (random 32x32 RGB PNGs, data=edm_zip)")
    extra = (["--cpu"] if args.cpu else []) + (["--cifar-root", cifar] if cifar else [])
    jobs = plan(settings, args.cpu, gpus, only)
    ran = {job.section for job in jobs}
    notes = section_notes(settings, args.cpu, data)
    command = "bash tools/gpu_check.sh" + (" --cpu" if args.cpu else "")

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        def launch(job: Job, limit_s: float) -> list[dict]:
            return run_child(job, limit_s, "cpu" if args.cpu else "gpu", Path(workdir), log, extra)

        def write() -> None:
            results = runner.results
            sections = gather(results)
            full = {**header, "command": f"`{command}`", "total wall time": f"{time.monotonic() - wall:.0f} s"}
            (out / "gpu_check.md").write_text(render(full, sections, notes, ran))
            document = {"header": full, "settings": {k: v for k, v in settings.__dict__.items()},
                        "sections": [{"key": s.key, "title": s.title, "columns": list(s.columns),
                                      "rows": sections[s.key], "errors": problems(sections[s.key])}
                                     for s in SECTIONS if s.key in ran],
                        "jobs": {name: {k: v for k, v in r.items() if k != "rows"} for name, r in results.items()},
                        "wall_s": round(time.monotonic() - wall, 1)}
            (out / "gpu_check.json").write_text(json.dumps(document, indent=1, default=str))

        runner = Runner(settings.deadline_s - (time.monotonic() - wall), settings.start_min_s, launch,
                        on_job_done=write)
        for job in jobs:
            print(f"gpu_check: {job.name} (up to {min(job.budget_s, max(runner.remaining(), 0)):.0f} s)", flush=True)
            runner.run([job])
        write()
    markdown = (out / "gpu_check.md").read_text()
    print(markdown)
    errors = json.loads((out / "gpu_check.json").read_text())["sections"]
    bad = [e for s in errors for e in s["errors"]]
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} (children's output: {log}); "
          f"{len(bad)} error cell(s)", flush=True)
    return 0


# ---------------------------------------------------------------- the child's side: one job, rows as they come


class Clock:
    """The child's own deadline (its parent stops it at ``limit_s``)."""

    def __init__(self, limit_s: float):
        self.end = time.monotonic() + limit_s

    def remaining(self) -> float:
        return self.end - time.monotonic()


def child(args) -> int:
    options = json.loads(args.job_options)
    name, _, _ = args.job.partition(":")
    settings = CPU if args.cpu else GPU
    clock = Clock(args.job_limit)
    jobs = {"train": job_train, "compile": job_train, "memory": job_memory, "fid": job_fid, "ddp": job_ddp}
    rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))  # DDP's other ranks run this job too

    def emit(row: dict) -> None:
        if rank == 0:
            with open(args.rows, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    try:
        for row in jobs[name](settings, options, clock, args):
            emit(row)
    except Exception as error:
        traceback.print_exc()
        emit({"_error": f"error: {type(error).__name__}: {one_line(error)[:300]}"})
        return 1
    return 0


def quiet() -> None:
    """Fewer lines from Lightning in the log; GPUs use TF32 for fp32 matmuls (as bench_train --speedups does)."""
    import logging

    import torch

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def error_text(error: BaseException) -> str:
    traceback.print_exception(error)
    return f"error: {type(error).__name__}: {one_line(error)[:300]}"


def data_overrides(args, batch_size: int, workdir: Path) -> list[str]:
    """Digits on the CPU; CIFAR-10 if its root was given; else a synthetic folder of CIFAR-10's shape."""
    batch = f"data.batch_size={batch_size}"
    if args.cpu:
        return ["data=digits", batch, "data.val_size=16"]
    if args.cifar_root:
        return ["data=cifar10", f"data.root={args.cifar_root}", batch]
    folder = workdir / "synthetic_cifar10"
    if not folder.is_dir():
        synthetic_images(folder, 2048 + 64)
    return ["data=edm_zip", f"data.path={folder}", batch, "data.val_size=64"]


def synthetic_images(folder: Path, n: int, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"img{i:05d}.png")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fewstep.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def job_train(settings: Settings, options: dict, clock: Clock, args) -> Iterator[dict]:
    """Section 1: the Lightning step, through bench_train's own loop."""
    quiet()
    import bench_train  # a sibling in tools/, this script's folder
    import torch

    model, compiled = options["model"], options["compiled"]
    s = settings
    with tempfile.TemporaryDirectory() as workdir:
        cfg = compose([f"model={model}", *data_overrides(args, s.train_batch, Path(workdir)), "paths.output_dir=."])
        accelerator = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"
        precisions = ("bf16-mixed", "32-true") if compiled else ("32-true", "bf16-mixed")
        for precision in precisions:
            row = train_row(model, precision, compiled)
            if compiled and clock.remaining() < s.compile_min_s:
                row["images/s"] = "skipped: time budget"
            else:
                try:
                    steps_per_second = bench_train.lightning_loop(cfg, s.train_steps, s.train_warmup, accelerator,
                                                                  precision, compiled)
                    row["images/s"] = steps_per_second * s.train_batch
                except Exception as error:
                    row["images/s"] = error_text(error)
                if compiled:
                    torch._dynamo.reset()
            yield row


TIMERS: list = []  # every step timer built in this process, newest last (a staged method builds one per stage)


def step_timer(warmup: int = 1, timed: int = 2):
    """A Lightning callback (Hydra target): times each training batch, synchronised; stops the run after
    ``warmup + timed`` batches; records the peak CUDA memory at the end. Registered in ``TIMERS``."""
    import lightning as L
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self.peak, self.start = [], None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            self.times.append(time.perf_counter() - self.start)
            if len(self.times) >= warmup + timed:
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module):
            if torch.cuda.is_available():
                self.peak = torch.cuda.max_memory_allocated()

    timer = StepTimer()
    TIMERS.append(timer)
    return timer


def timer_config(warmup: int, timed: int) -> dict:
    return {"_target_": f"{__name__}.step_timer", "warmup": warmup, "timed": timed}


def job_memory(settings: Settings, options: dict, clock: Clock, args) -> Iterator[dict]:
    """Section 2: one short ``fewstep.train.train`` run per method, teachers first."""
    quiet()
    import gc
    import statistics

    import torch
    from omegaconf import open_dict

    from fewstep.train import train

    s = settings
    cuda = torch.cuda.is_available() and not args.cpu
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        data = data_overrides(args, s.memory_batch, work)
        steps = s.memory_warmup + s.memory_timed
        common = [f"model={s.memory_model}", *data, "trainer=gpu" if cuda else "trainer=cpu",
                  "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
                  "callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.model_summary=null",
                  f"paths.root={work / 'root'}"]
        checkpoints = {}
        for method in [*TEACHERS, *STUDENTS]:
            row = {"method": method, "network": s.memory_model, "batch": s.memory_batch}
            if clock.remaining() < 10:
                row["peak memory (GiB)"] = "skipped: time budget"
                yield row
                continue
            out = work / method
            if method in TEACHERS:  # the default checkpoint callback writes the last.ckpt its students read
                overrides = [f"method={method}", f"trainer.max_steps={steps}"]
            else:
                teacher, extra = STUDENTS[method], STUDENT_OPTIONS.get(method, [])
                if teacher not in checkpoints:
                    row["peak memory (GiB)"] = f"error: no {teacher} checkpoint (its row failed)"
                    yield row
                    continue
                overrides = [f"method={method}", f"teacher.ckpt={checkpoints[teacher]}", "trainer.max_steps=100000",
                             "callbacks.model_checkpoint=null", *extra]
            try:
                cfg = compose([*common, *overrides, f"paths.output_dir={out}"])
                with open_dict(cfg):
                    cfg.callbacks.gpu_check_timer = timer_config(s.memory_warmup, s.memory_timed)
                TIMERS.clear()
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                train(cfg)
                timer = TIMERS[-1]  # a staged method's first (only) stage
                times = timer.times[s.memory_warmup:] or timer.times
                row["step time (s)"] = statistics.median(times)
                row["peak memory (GiB)"] = (timer.peak - before) / GIB if cuda else "n/a (cpu)"
                if method in TEACHERS:
                    last = out / "checkpoints" / "last.ckpt"
                    if not last.exists():
                        raise FileNotFoundError(f"the {method} run wrote no {last}")
                    checkpoints[method] = last.resolve()
            except Exception as error:
                row["peak memory (GiB)"] = error_text(error)
            yield row


def job_fid(settings: Settings, options: dict, clock: Clock, args) -> Iterator[dict]:
    """Section 4: Inception features per second, then sampling per second with the papers' network."""
    quiet()
    import torch
    from omegaconf import OmegaConf

    from fewstep.bench import median_seconds
    from fewstep.cli import CONF_DIR
    from fewstep.errors import FewstepError
    from fewstep.images import to_uint8
    from fewstep.metrics import inception as fid_inception
    from fewstep.networks.edm import edm_denoiser
    from fewstep.samplers import CountingDenoiser, SeededNoise, sample

    s = settings
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    inception_ips = None
    row = {"what": "FID Inception features (uint8 32x32, resized to 299)", "batch": s.fid_batch}
    try:
        try:
            inception = fid_inception.InceptionFeatures().to(device).eval()
        except FewstepError as error:  # no weights file here (87 MB): the same network with random weights, as fast
            if "not found" not in str(error):
                raise
            network = fid_inception.FIDInceptionV3().to(device).eval().requires_grad_(False)

            def inception(images):
                return network(fid_inception.to_network_input(images))

            row["what"] += " (random weights: the FID weights are not installed here)"
        images = to_uint8(torch.rand(s.fid_batch, 3, 32, 32, device=device) * 2 - 1)
        with torch.no_grad():
            inception_ips = s.fid_batch / median_seconds(lambda: inception(images), device, s.fid_repeats)
        row["images/s"], row["50k-sample time"] = inception_ips, PAPER_N / inception_ips
    except Exception as error:
        row["images/s"] = error_text(error)
    yield row

    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{s.fid_sample_model}.yaml"))
    config.pop("_target_")
    net = None
    for name in s.fid_samplers:
        row = {"what": f"{s.fid_sample_model} + {name}, {s.fid_nfe} NFE: sampling + features", "batch": s.fid_sample_batch}
        if clock.remaining() < 10:
            row["images/s"] = "skipped: time budget"
            yield row
            continue
        try:
            if net is None:
                torch.manual_seed(0)
                net = edm_denoiser([3, 32, 32], 0, **config).to(device).eval()
            counted = CountingDenoiser(lambda x, sigma: net(x, sigma))
            noise = SeededNoise(range(s.fid_sample_batch), device=device)

            @torch.no_grad()
            def draw(name=name, counted=counted, noise=noise):
                counted.nfe = 0
                return sample(counted, noise.randn((3, 32, 32)), name, s.fid_nfe, generator=noise)

            ips = s.fid_sample_batch / median_seconds(draw, device, s.fid_repeats)
            row["what"] = f"{s.fid_sample_model} + {name}, {counted.nfe} NFE: sampling + features"
            row["images/s"] = ips
            if inception_ips:
                row["50k-sample time"] = PAPER_N / ips + PAPER_N / inception_ips
        except Exception as error:
            row["images/s"] = error_text(error)
        yield row


def job_ddp(settings: Settings, options: dict, clock: Clock, args) -> Iterator[dict]:
    """Section 5: the Lightning step under trainer=ddp on every GPU (Lightning starts one process per GPU)."""
    quiet()
    import statistics

    import torch
    from omegaconf import open_dict

    from fewstep.train import fit

    s = settings
    model = s.train_models[0]
    with tempfile.TemporaryDirectory() as workdir:
        cfg = compose([f"model={model}", *data_overrides(args, s.train_batch, Path(workdir)), "trainer=ddp",
                       "trainer.limit_val_batches=0", "trainer.max_steps=100000",
                       "callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.model_summary=null",
                       "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
                       f"paths.output_dir={workdir}",
                       # --cpu (tests only: the plan never runs this job there): two CPU processes on gloo
                       *(["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"] if args.cpu else [])])
        with open_dict(cfg):
            cfg.callbacks.gpu_check_timer = timer_config(s.train_warmup, s.train_steps)
        fit(cfg)
        timer = TIMERS[-1]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else torch.cuda.device_count()
        step = statistics.median(timer.times[s.train_warmup:] or timer.times)
        yield {"GPUs": world, "model": model, "batch per GPU": s.train_batch, "images/s": world * s.train_batch / step}


if __name__ == "__main__":
    sys.exit(main())
