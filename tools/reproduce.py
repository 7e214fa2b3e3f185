"""The seed papers' claims, settled over training seeds at a scale this CPU trains (docs/reproduction.md).

    python tools/reproduce.py TABLE [--seeds 0 1 2] [--n 1000] [--out docs/reproduction] [--set KEY=VALUE ...]

TABLE is one of ``teacher`` (the EDM teacher's samplers and the k-diffusion SDE peers: SEEDS, lazy schedules),
``kac`` (DistillKac), ``gdd`` (GDD and GDD-I), ``students`` (progressive, consistency and DMD2, each with and
without DDIL), ``kac_budget`` (DistillKac's student budgets), ``continuous`` (sCD, sCT and MeanFlow), ``fakescore``
(DMD2, SiD, SiDA and f-distill on one fake-score engine, against training images), ``phema`` (EDM2's post-hoc EMA
against fixed EMAs, for the EDM teacher and GDD) and ``autoguidance`` (the teacher guided by its own earlier
checkpoint, at 16 and 35 NFE); ``gdd``, ``students``, ``continuous``, ``fakescore`` and ``phema``'s GDD distil the
``teacher`` table's teachers, ``autoguidance`` guides them, ``kac`` and ``kac_budget`` train their own.

Every training run is ``python -m fewstep.train experiment=repro seed=S data.seed=S ...`` (conf/experiment/repro.yaml:
MNIST-5k at 16 x 16, unet_small) in ``OUT/runs/<run>/seed<S>``; a finished run (its ``DONE`` file) is reused and an
interrupted one resumes, so a table can be stopped and started again. Every row is ``fewstep.evaluate`` with
metric=fid_domain and repeats=2: two disjoint sample sets of n images, so each row carries the metric's own
sampling spread beside the spread over training seeds. Writes ``OUT/<table>.json`` (every row of every seed),
``OUT/<table>.md`` (mean +- std over seeds, and the verdict of each claim) and ``OUT/<table>.png``.
``--set`` adds overrides to every training command (e.g. ``--set trainer.max_steps=2000``), ``--gdd-set`` to the
GDD runs only (``--gdd-set callbacks.ema.decay=0.995``: their teachers stay the table's), ``--guide-at`` picks the
autoguidance table's guide (the teacher's checkpoint nearest that share of its steps), ``--quick`` is a smoke run
(tiny network, a few steps, n = 16) for tests.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fewstep import layout
from fewstep.metrics.curves import grid, markdown_table, plot

TABLES = ("teacher", "kac", "gdd", "students", "kac_budget", "continuous", "fakescore", "phema", "autoguidance")
ODE = ("euler", "heun", "dpmpp_2m")
LAZY = ("lazy_ode", "lazy_2m")
SDE = ("seeds3", "seeds2", "euler_maruyama", "edm_sde")
PEERS = {  # k-diffusion's SDE solvers, each with its Brownian tree (one per image), and their NFE per step
    "kd_dpmpp_sde": ("sample_dpmpp_sde", 2),
    "kd_dpmpp_2m_sde": ("sample_dpmpp_2m_sde", 1),
    "kd_dpmpp_3m_sde": ("sample_dpmpp_3m_sde", 1),
}
DIFFUSERS_PEER = "hf_edm_sde_dpmpp"  # diffusers' EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
PEER_NAMES = (*PEERS, DIFFUSERS_PEER)
BUDGETS = {  # training at the protocol's scale (batch 32); a student's teacher is the same seed's teacher run
    "edm_teacher": ["trainer.max_steps=4000"],
    "kac_teacher": ["trainer.max_steps=4000"],
    # 128k images: twice the 64k at which unfrozen GDD collapsed (docs/benchmarks.md); a checkpoint every 16k
    "gdd": ["trainer.max_steps=4000", "trainer.val_check_interval=500"],
    "progressive": ["method.steps_per_round=300"],
    "consistency": ["trainer.max_steps=1200", "callbacks.ema.decay=0.99"],
    "dmd2": ["trainer.max_steps=400", "callbacks.ema.decay=0.99"],
    "kac_endpoint": [],  # --kac-steps-per-stage
    "scm": [],  # the continuous table gives sCD the consistency student's steps, sCT the teacher's
    "meanflow": [],
    # the fakescore table's, DMD2's budget (that table adds a checkpoint every 100 steps to all five runs)
    "sid": ["trainer.max_steps=400", "callbacks.ema.decay=0.99"],
    "sida": ["trainer.max_steps=400", "callbacks.ema.decay=0.99"],
    "fdistill": ["trainer.max_steps=400", "callbacks.ema.decay=0.99"],
}
QUICK_BUDGETS = {"progressive": ["method.steps_per_round=2"]}
QUICK = [  # a smoke run: seconds per training run
    "model=unet_tiny", "data.resolution=8", "data.limit=256", "data.val_size=64", "trainer.max_steps=2", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "callbacks.sample_grid.n=4", "callbacks.sample_grid.nfe=2", "logger=csv",
]


# -- statistics ---------------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """A row over training seeds: each seed's value is the mean of its two sample sets."""

    per_seed: list[float]
    spread: float  # the metric's own sampling std (one sample set), from the two disjoint sets of each seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_seed)

    @property
    def std(self) -> float:
        return statistics.stdev(self.per_seed) if len(self.per_seed) > 1 else float("nan")

    @property
    def variance_of_mean(self) -> float:
        """Over training seeds; for one seed, the sampling variance of its mean of two sample sets."""
        if len(self.per_seed) > 1:
            return self.std**2 / len(self.per_seed)
        return self.spread**2 / 2

    def __str__(self) -> str:
        """mean ± std over seeds; a row of fewer than the protocol's 3 seeds says how many it has."""
        n = len(self.per_seed)
        text = f"{self.mean:.3g} ± {self.std:.2g}" if n > 1 else f"{self.mean:.3g}"
        return text if n >= 3 else f"{text} ({n} seed{'s' if n > 1 else ''})"


def stat(rows: list[dict], key: str = "value") -> Stat:
    """Mean over training seeds of each seed's mean over sample sets; the sampling spread from the set pairs."""
    per_seed, diffs = [], []
    for row in sorted(rows, key=lambda r: r.get("train_seed", 0)):  # per_seed[i]: the same seed in every Stat
        values = row["values"] if key == "value" and "values" in row else [row[key]]
        per_seed.append(statistics.fmean(values))
        if len(values) == 2:
            diffs.append((values[0] - values[1]) ** 2 / 2)  # E (v1 - v2)^2 / 2 = var of one set's value
    return Stat(per_seed, math.sqrt(statistics.fmean(diffs)) if diffs else float("nan"))


def verdict(ours: Stat, theirs: Stat, factor: float = 1.0, lower_is_better: bool = True) -> str:
    """Is ``ours <= factor * theirs`` (or >= for a higher-is-better metric)? "met", "missed" or "within noise".

    Noise: twice the standard error of the difference of the means over training seeds (each seed's value already
    carries the sampling spread); a difference inside it, ties included, is not evidence either way. A row of one
    training seed has no seed spread: its sampling spread stands in (a lower bound on the noise).
    """
    sign = 1 if lower_is_better else -1
    diff = sign * (ours.mean - factor * theirs.mean)
    variance = ours.variance_of_mean + factor**2 * theirs.variance_of_mean
    if not math.isfinite(variance):  # one seed of a value without a sampling spread (recall): nothing to judge by
        return "no verdict (one seed)"
    noise = 2 * math.sqrt(variance)
    if diff < -noise:
        return "met"
    return "within noise" if diff <= noise else "missed"


# -- training runs ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run per seed: ``python -m fewstep.train experiment=repro <overrides(seed)>``."""

    name: str
    overrides: Callable[[int], list[str]]
    out: Path
    extra: list[str] = field(default_factory=list)

    def dir(self, seed: int) -> Path:
        return self.out / "runs" / self.name / f"seed{seed}"

    def ckpt(self, seed: int, steps: int | None = None) -> Path:
        """The run's last checkpoint, or that of its stage of ``steps``-step students."""
        run = self.dir(seed)
        return layout.last_checkpoint(run if steps is None else layout.stages(run)[steps])

    def train(self, seed: int) -> Path:
        run, overrides = self.dir(seed), [*self.overrides(seed), *self.extra]
        saved = run / "OVERRIDES"  # a run is reused by its name: never for other overrides (--set, --gdd-set)
        if saved.is_file() and saved.read_text().splitlines() != overrides:
            raise SystemExit(f"{run} was trained with other overrides (see {saved}): give this variant its own --out")
        if (run / "DONE").is_file():
            return run
        resume = ["resume=auto"] if run.is_dir() else []
        command = [
            sys.executable, "-m", "fewstep.train", "experiment=repro", f"seed={seed}", f"data.seed={seed}",
            f"hydra.run.dir={run}", *overrides, *resume,
        ]
        run.mkdir(parents=True, exist_ok=True)
        saved.write_text("\n".join(overrides) + "\n")
        print(f"[train] {self.name} seed {seed}: {' '.join(command[2:])}", flush=True)
        start = time.perf_counter()
        with open(run / "train.log", "a") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"training {self.name} seed {seed} failed: see {run / 'train.log'}")
        (run / "DONE").write_text(f"{time.perf_counter() - start:.0f} s\n")
        return run

    def seconds(self, seed: int) -> float:
        return float((self.dir(seed) / "DONE").read_text().split()[0])


# -- rows ---------------------------------------------------------------------------------------------------------
def register_peers() -> list[str]:
    """The peers' SDE solvers as fewstep solvers of this process: k-diffusion's and diffusers' (when installed)."""
    from fewstep.bench import kdiffusion_sampling
    from fewstep.samplers import SOLVERS, Solver

    names = []
    sampling = kdiffusion_sampling()  # its sampling module alone: the package's __init__ needs scikit-image
    if sampling is not None:
        def solver(function: str):
            def solve(denoiser, x, sigmas, noise=None, callback=None):
                seeds = [int(s) for s in noise.seeds] if noise is not None else None
                tree = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
                return getattr(sampling, function)(denoiser, x, sigmas, disable=True, noise_sampler=tree)

            return solve

        for name, (function, per_step) in PEERS.items():
            SOLVERS[name] = Solver(solver(function), lambda nfe, k=per_step: (nfe - 1) // k + 1, stochastic=True)
        names += list(PEERS)
    try:
        from diffusers import EDMDPMSolverMultistepScheduler
    except ImportError:
        print("[peers] the diffusers row is skipped: pip install diffusers")
    else:
        SOLVERS[DIFFUSERS_PEER] = Solver(diffusers_edm_sde_dpmpp(EDMDPMSolverMultistepScheduler), lambda nfe: nfe,
                                         stochastic=True)
        names.append(DIFFUSERS_PEER)
    return names


def diffusers_edm_sde_dpmpp(scheduler_class):
    """diffusers' EDM sde-dpmsolver++ (2M, midpoint) on our grid and denoiser: 1 NFE per step, a generator per image."""
    import torch

    def solve(denoiser, x, sigmas, noise=None, callback=None):
        scheduler = scheduler_class(algorithm_type="sde-dpmsolver++", solver_order=2, sigma_min=float(sigmas[-2]),
                                    sigma_max=float(sigmas[0]), final_sigmas_type="zero")
        scheduler.set_timesteps(len(sigmas) - 1)
        scheduler.sigmas = sigmas.to(torch.float32).cpu()  # our grid (the last entry is 0), as for every fewstep solver
        scheduler.timesteps = scheduler.precondition_noise(scheduler.sigmas[:-1])
        scheduler.convert_model_output = lambda model_output, sample: model_output  # we hand it D(x; sigma) itself
        generators = None if noise is None else [torch.Generator().manual_seed(int(s) % 2**63) for s in noise.seeds]
        ones = x.new_ones(len(x))
        for t, sigma in zip(scheduler.timesteps, sigmas[:-1]):
            x = scheduler.step(denoiser(x, sigma * ones), t, x, generator=generators).prev_sample
        return x

    return solve


def evaluate_row(ckpt: Path, sampler: str, nfe: int, n: int, out: Path, options: dict | None = None, weights: str = "ema",
                 **guidance) -> dict:
    """The protocol's row: fid_domain of two disjoint sample sets of n images; ``guidance``: guide, guidance and
    guidance_interval (autoguidance, docs/autoguidance.md) when the row is guided."""
    from fewstep.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, {"name": sampler, **(options or {})}, nfe, n, "fid_domain", repeats=2, out=out,
                               weights=weights, **guidance)


ROW_KEY = ("label", "train_seed", "sampler_name", "nfe_budget", "n")
# the rest of what tells two rows apart, with the value of a row saved without it: its weights and its guidance
ROW_DEFAULTS = {"weights": "ema", "guide": None, "guidance": 0.0, "guidance_interval": None}
GUIDANCE = ("guide", "guidance", "guidance_interval")


def row_key(row: dict) -> dict:
    return {**{k: row[k] for k in ROW_KEY}, **{k: row.get(k, default) for k, default in ROW_DEFAULTS.items()}}


class Rows:
    """Every evaluated row of a table, saved after each one so that an interrupted table resumes."""

    def __init__(self, path: Path, seeds: list[int] | None = None):
        self.path, self.seeds = path, seeds  # select() summarises these training seeds only (None: all)
        self.rows: list[dict] = json.loads(path.read_text()) if path.is_file() else []

    def get(self, label: str, seed: int, ckpt: Path, sampler: str, nfe: int, n: int, options: dict | None = None,
            weights: str = "ema", guide: Path | None = None, guidance: float = 0.0,
            guidance_interval: list[float] | None = None) -> dict:
        """The row of (label, seed, sampler, nfe, n, weights, guidance), evaluated now if not saved; ``options`` are
        sampler options, ``weights`` the checkpoint's (ema, or raw: the trained weights), ``guide`` a weaker checkpoint
        that guides it with scale ``guidance`` inside ``guidance_interval`` (autoguidance)."""
        key = dict(zip(ROW_KEY, (label, seed, sampler, nfe, n)))
        key.update(weights=weights, guide=str(Path(guide).resolve()) if guide else None, guidance=float(guidance),
                   guidance_interval=[float(v) for v in guidance_interval] if guidance_interval else None)
        row = self.find(key)
        if row is not None:
            return row
        out = self.path.parent / "eval" / self.path.stem / re.sub(r"[^\w.-]+", "_", f"{label}_{sampler}_{nfe}_seed{seed}")
        guided = {k: key[k] for k in GUIDANCE if key[k] != ROW_DEFAULTS[k]}
        row = {**evaluate_row(ckpt, sampler, nfe, n, out, options, weights, **guided), **key}
        self.save(row)
        return row

    def find(self, key: dict) -> dict | None:
        return next((row for row in self.rows if all(row.get(k, ROW_DEFAULTS.get(k)) == v for k, v in key.items())), None)

    def adopt(self, source: Rows, key: dict, label: str) -> dict | None:
        """The row of ``source`` (another table's) that ``key`` finds, saved here under ``label`` (the evaluation this
        table would make, already made), or None when ``source`` has none."""
        row = source.find(key)
        if row is not None:
            row = {**row, "label": label, "copied_from": str(source.path)}
            self.save(row)
            return self.find(row_key(row))
        return None

    def save(self, row: dict) -> None:
        """Add a row to the file under a lock: the seeds of a table may run as parallel processes (--jobs). A row
        that another process saved meanwhile under the same key is kept, and this one dropped."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.rows = json.loads(self.path.read_text()) if self.path.is_file() else []
            if self.find(row_key(row)) is not None:
                return
            self.rows.append(row)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.rows, indent=1))
            temporary.replace(self.path)

    def select(self, label: str, sampler: str | None = None, nfe: int | None = None) -> list[dict]:
        return [r for r in self.rows if r["label"] == label and sampler in (None, r["sampler_name"])
                and nfe in (None, r["nfe_budget"]) and (self.seeds is None or r["train_seed"] in self.seeds)]


# -- tables -------------------------------------------------------------------------------------------------------
def valid(sampler: str, nfe: int) -> bool:
    from fewstep.errors import ConfigError
    from fewstep.samplers import check_solver

    try:
        check_solver(sampler, nfe)
    except ConfigError:
        return False
    return not (sampler.startswith("kd_dpmpp_") and sampler != "kd_dpmpp_sde" and nfe < 2)  # k-diffusion 0.1.1 crashes


def method(name: str, quick: bool) -> list[str]:
    """``method=name`` and its training budget."""
    return [f"method={name}", *(QUICK_BUDGETS.get(name, []) if quick else BUDGETS[name])]


def teacher_runs(args) -> Run:
    return Run("edm_teacher", lambda seed: method("edm_teacher", args.quick), args.out, args.extra)


def table_teacher(args, rows: Rows) -> list[str]:
    from fewstep.samplers import SOLVERS

    teacher = teacher_runs(args)
    samplers = [s for s in (*ODE, *LAZY, *SDE) if s in SOLVERS] + register_peers()
    samplers = [s for s in samplers if not args.samplers or s in args.samplers]
    for seed in args.seeds:
        teacher.train(seed)
        for sampler in samplers:
            for nfe in args.nfe:
                if valid(sampler, nfe):
                    rows.get("teacher", seed, teacher.ckpt(seed), sampler, nfe, args.n)
    curves = {s: {nfe: stat(rows.select("teacher", s, nfe)) for nfe in args.nfe if rows.select("teacher", s, nfe)}
              for s in samplers}
    lines = [*fid_nfe_table(curves, args.nfe), ""]
    figure(curves, args.out / "teacher.png", "EDM teacher: fid_domain against NFE (mean ± std over training seeds)")
    lines += ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    peers = {s: c for s, c in curves.items() if s in PEER_NAMES and c}
    if "seeds3" in curves and peers:
        peer, peer_nfe = min(((s, nfe) for s, c in peers.items() for nfe in c), key=lambda k: peers[k[0]][k[1]].mean)
        target = peers[peer][peer_nfe]
        reached = [(nfe, ours) for nfe, ours in sorted(curves["seeds3"].items()) if verdict(ours, target) != "missed"]
        best = reached[0] if reached else None
        ours_text = (f"best peer {peer} {target} at {peer_nfe} NFE; SEEDS-3 reaches it at {best[0]} NFE ({best[1]})"
                     if best else f"best peer {peer} {target} at {peer_nfe} NFE; SEEDS-3 never within noise of it")
        met = best is not None and best[0] * 3 <= peer_nfe
        lines.append(f"| SEEDS-3 reaches the best SDE solver's FID at a third of the NFE | 3-5x fewer NFE | {ours_text} | "
                     f"{'met' if met else 'missed'} |")
    for nfe in (1, 2, 4):
        lazy = {s: curves[s][nfe] for s in LAZY if nfe in curves.get(s, {})}
        ode = {s: curves[s][nfe] for s in ODE if nfe in curves.get(s, {})}
        if lazy and ode:
            (ls, lv), (os_, ov) = min(lazy.items(), key=lambda kv: kv[1].mean), min(ode.items(), key=lambda kv: kv[1].mean)
            lines.append(f"| the lazy conversion beats the schedule's best ODE solver at {nfe} NFE | better | "
                         f"{ls} {lv} vs {os_} {ov} | {verdict(lv, ov)} |")
    return lines


# the rows of the staged students whose first stage missed the teacher's denoising jumps (the float test of
# t - D = 0 in KacEndpoint.teacher_endpoint, fixed 2026-12-02): kept to show the fix on the same seeds
BEFORE_FIX = ", before the fix"
ROLLOUTS = ", rollouts"  # method.rollout_share: the last interval trained on the student's own states
KAC_ROLLOUT_SHARE = 1.0
# an earlier form of the rollouts (2026-12-02): 25% of each batch moved to the last interval, at the student's own
# states; kept in kac.json, not produced by the command
BATCH_ROLLOUTS = ", 25% of each batch rolled to the last interval"


def noisy(rows: list[dict]) -> str:
    """The share of noisy images (fewstep.metrics.diversity.NOISY), or blank for rows evaluated before it existed."""
    return str(stat(rows, "noisy_share")) if rows and all("noisy_share" in r for r in rows) else ""


def table_kac(args, rows: Rows) -> list[str]:
    teacher = Run("kac_teacher", lambda seed: method("kac_teacher", args.quick), args.out, args.extra)
    # one jump with the staged pipeline's teacher evaluations: steps x sum of (teacher steps / student steps)
    stages, per_stage = args.kac_stages, args.kac_steps_per_stage
    calls = per_stage * sum(a // b for a, b in zip(stages, stages[1:]))
    jump_steps = max(1, round(calls / stages[0]))
    direct = Run("kac_one_jump", lambda seed: [
        *method("kac_endpoint", args.quick), f"teacher.ckpt={teacher.ckpt(seed)}", f"method.stages=[{stages[0]},1]",
        f"method.steps_per_stage={jump_steps}", "method.ema_decay=0.9",
    ], args.out, args.extra)
    def staged_run(name: str, share: float) -> Run:
        return Run(name, lambda seed: [
            *method("kac_endpoint", args.quick), f"teacher.ckpt={teacher.ckpt(seed)}",
            f"method.stages=[{','.join(map(str, stages))}]", f"method.steps_per_stage={per_stage}",
            f"method.rollout_share={share}",
        ], args.out, args.extra)

    staged, rolled = staged_run("kac_endpoint", 0.0), staged_run("kac_endpoint_rollouts", KAC_ROLLOUT_SHARE)
    for seed in args.seeds:
        for run in (teacher, staged, rolled, direct):
            run.train(seed)
        for sampler in ("kac_euler", "kac_ab2"):
            rows.get("teacher", seed, teacher.ckpt(seed), sampler, stages[0], args.n)
        # the same teacher without its final denoising jumps: the sampler before issue 17's fix
        rows.get("teacher, no jumps", seed, teacher.ckpt(seed), "kac_euler", stages[0], args.n, {"denoise": []})
        for steps in stages[1:]:
            rows.get("staged", seed, staged.ckpt(seed, steps), "kac_euler", steps, args.n)
            rows.get(f"staged{ROLLOUTS}", seed, rolled.ckpt(seed, steps), "kac_euler", steps, args.n)
        rows.get("one jump", seed, direct.ckpt(seed, 1), "kac_euler", 1, args.n)
    best = min((stat(rows.select("teacher", s)) for s in ("kac_euler", "kac_ab2")), key=lambda s: s.mean)
    edm = best_edm_teacher(args)
    lines = ["| model | NFE | fid_domain | sampling spread | / best teacher | dark fraction | / EDM teacher's | noisy images |",
             "|---|---|---|---|---|---|---|---|"]
    models = [("teacher", "kac_euler", stages[0]), ("teacher", "kac_ab2", stages[0]), ("teacher, no jumps", "kac_euler", stages[0])]
    students = [(f"staged{when}", "kac_euler", s) for when in (ROLLOUTS, "", BATCH_ROLLOUTS, BEFORE_FIX) for s in stages[1:]]
    students.append(("one jump", "kac_euler", 1))  # its interval ends at exactly 0: the fix left it unchanged
    for label, sampler, nfe in models + [m for m in students if rows.select(*m)]:
        s, dark = stat(rows.select(label, sampler, nfe)), stat(rows.select(label, sampler, nfe), "dark_fraction")
        lines.append(f"| {label} ({sampler}) | {nfe} | {s} | {s.spread:.2g} | {ratio(s, best)} | {dark} | "
                     f"{ratio(dark, edm.dark) if edm else ''} | {noisy(rows.select(label, sampler, nfe))} |")
    if edm:
        lines.append(f"| EDM teacher ({edm.sampler}) | {edm.nfe} | {edm.fid} | {edm.fid.spread:.2g} | | {edm.dark} | 1.00 | |")
    figure({"Kac teacher (kac_euler)": {stages[0]: stat(rows.select("teacher", "kac_euler"))},
            "Kac teacher (kac_ab2)": {stages[0]: stat(rows.select("teacher", "kac_ab2"))},
            "staged DistillKac students": {s: stat(rows.select("staged", nfe=s)) for s in stages[1:]},
            f"staged{ROLLOUTS}": {s: stat(rows.select(f"staged{ROLLOUTS}", nfe=s)) for s in stages[1:]
                                  if rows.select(f"staged{ROLLOUTS}", nfe=s)},
            f"staged{BEFORE_FIX}": {s: stat(rows.select(f"staged{BEFORE_FIX}", nfe=s)) for s in stages[1:]
                                    if rows.select(f"staged{BEFORE_FIX}", nfe=s)},
            "one jump": {1: stat(rows.select("one jump"))}},
           args.out / "kac.png", "DistillKac: fid_domain against NFE (mean ± std over training seeds)")
    final = f"staged{ROLLOUTS}" if rows.select(f"staged{ROLLOUTS}") else "staged"  # the default's students
    four, one = stat(rows.select(final, nfe=4)), stat(rows.select(final, nfe=1))
    jump = stat(rows.select("one jump"))
    euler, bare = stat(rows.select("teacher", "kac_euler")), stat(rows.select("teacher, no jumps"))
    lines += [
        "", "| claim | paper | ours | verdict |", "|---|---|---|---|",
        f"| 4-step student ({final}) within 15% of the teacher | 1.16x | {ratio(four, best)}x | {verdict(four, best, 1.15)} |",
        f"| 1-step student ({final}) within 2x of the teacher | 1.58x | {ratio(one, best)}x | {verdict(one, best, 2.0)} |",
        f"| staged better than one jump at equal teacher evaluations ({jump_steps} steps) | better | {one} vs {jump} | "
        f"{verdict(one, jump)} |",
        f"| the denoising jumps: fid_domain unchanged or better (issue 17) | no worse | {euler} vs {bare} without | "
        f"{verdict(euler, bare)} |",
    ]
    for nfe in (stages[1], 4, 1):
        before, after = (rows.select(label, "kac_euler", nfe) for label in (f"staged{BEFORE_FIX}", "staged"))
        if before and after:
            lines.append(f"| the {nfe}-step student's dark fraction, before -> after the first stage's jump targets "
                         f"(issue 17) | lower | {stat(before, 'dark_fraction')} -> {stat(after, 'dark_fraction')} | "
                         f"{verdict(stat(after, 'dark_fraction'), stat(before, 'dark_fraction'))} |")
            lines.append(f"| the {nfe}-step student's fid_domain, before -> after (issue 17) | no worse | "
                         f"{stat(before)} -> {stat(after)} | {verdict(stat(after), stat(before))} |")
    for nfe in (stages[1], 4, 1):
        before, after = (rows.select(label, "kac_euler", nfe) for label in ("staged", f"staged{ROLLOUTS}"))
        if noisy(before) and noisy(after):  # both evaluated since noisy_share exists
            lines.append(f"| the {nfe}-step student's noisy images, without -> with rollouts on its last interval "
                         f"(issue 17) | lower | {noisy(before)} -> {noisy(after)} | "
                         f"{verdict(stat(after, 'noisy_share'), stat(before, 'noisy_share'))} |")
            lines.append(f"| the {nfe}-step student's fid_domain, without -> with rollouts (issue 17) | no worse | "
                         f"{stat(before)} -> {stat(after)} | {verdict(stat(after), stat(before))} |")
    if edm:
        for label, nfe in (("teacher", stages[0]), (final, 4), (final, 1)):
            dark = stat(rows.select(label, "kac_euler", nfe), "dark_fraction")
            lines.append(f"| Kac {label} ({nfe} NFE): dark fraction within 1.5x of the EDM teacher's (issue 17) | "
                         f"<= 1.5x | {dark} vs {edm.dark} ({ratio(dark, edm.dark)}x) | {verdict(dark, edm.dark, 1.5)} |")
    return lines


# the default run's student budget, allocated otherwise: each candidate names every knob it sets, so that its rows
# stay what they were when the default moves (docs/reproduction.md, "The default run's student budget")
CONSTANT_LR = ["method.optimizer.lr=2e-4", "method.scheduler._target_=torch.optim.lr_scheduler.LinearLR",
               "method.scheduler.start_factor=0.1", "method.scheduler.total_iters=50"]


def one_cycle(lr: float) -> list[str]:
    """A 1/8 warm-up from lr / 10, then a cosine to lr / 1000 at the stage's end (OneCycleLR, total_steps: the stage's)."""
    return [f"method.optimizer.lr={lr}", "method.scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
            "~method.scheduler.start_factor", "~method.scheduler.total_iters", f"+method.scheduler.max_lr={lr}",
            "+method.scheduler.total_steps=null", "+method.scheduler.pct_start=0.125",
            "+method.scheduler.cycle_momentum=false", "+method.scheduler.div_factor=10",
            "+method.scheduler.final_div_factor=100"]


KAC_CANDIDATES = {
    "400 each, constant lr 2e-4": ["method.steps_per_stage=400", *CONSTANT_LR],
    "400 each, one-cycle lr 2e-4": ["method.steps_per_stage=400", *one_cycle(2e-4)],
    "200/400/500/700, constant lr 2e-4": ["method.steps_per_stage=[200,400,500,700]", *CONSTANT_LR],
    "400 each, constant lr 5e-4": ["method.steps_per_stage=400", *CONSTANT_LR[1:], "method.optimizer.lr=5e-4"],
    "300/400/450/600, constant lr 5e-4": ["method.steps_per_stage=[300,400,450,600]", *CONSTANT_LR[1:],
                                          "method.optimizer.lr=5e-4"],
}


def table_kac_budget(args, rows: Rows) -> list[str]:
    """DistillKac's students from the kac table's teachers under each of KAC_CANDIDATES (--only: some of them)."""
    teacher = Run("kac_teacher", lambda seed: method("kac_teacher", args.quick), args.out, args.extra)
    stages = args.kac_stages
    names = [name for name in KAC_CANDIDATES if args.only is None or name in args.only]
    runs = {name: Run(f"kac_budget_{slug(name)}", lambda seed, name=name: [
        *method("kac_endpoint", args.quick), f"teacher.ckpt={teacher.ckpt(seed)}",
        f"method.stages=[{','.join(map(str, stages))}]", f"method.rollout_share={KAC_ROLLOUT_SHARE}",
        "method.ema_decay=0.99", "summary=false",
        *(KAC_CANDIDATES[name] if not args.quick else quick_lengths(KAC_CANDIDATES[name], args.kac_steps_per_stage)),
    ], args.out, args.extra) for name in names}
    for seed in args.seeds:
        teacher.train(seed)
        rows.get("teacher", seed, teacher.ckpt(seed), "kac_euler", stages[0], args.n)
        for name, run in runs.items():
            run.train(seed)
            for steps in stages[1:]:
                rows.get(name, seed, run.ckpt(seed, steps), "kac_euler", steps, args.n)
    best = stat(rows.select("teacher", "kac_euler"))
    lines = [f"| candidate | {' | '.join(f'{s} steps: fid_domain (noisy images)' for s in stages[1:])} | "
             "training, all stages (min per seed) |", "|---|" + "---|" * len(stages)]
    lines.append(f"| teacher, {stages[0]} steps: {best} | {' | '.join('' for _ in stages[1:])} | |")
    for name, run in runs.items():
        cells = [f"{stat(rows.select(name, nfe=s))} ({noisy(rows.select(name, nfe=s))})" for s in stages[1:]]
        minutes = statistics.fmean(run.seconds(seed) for seed in args.seeds) / 60
        lines.append(f"| {name} | {' | '.join(cells)} | {minutes:.1f} |")
    return lines


def quick_lengths(overrides: list[str], steps: int) -> list[str]:
    """A candidate for --quick: its stage lengths replaced by ``steps`` each (the quick run's stages are fewer)."""
    return [o for o in overrides if not o.startswith("method.steps_per_stage=")] + [f"method.steps_per_stage={steps}"]


def slug(text: str) -> str:
    return re.sub(r"[^\w]+", "_", text).strip("_")


def ratio(ours: Stat, theirs: Stat) -> str:
    return f"{ours.mean / theirs.mean:.2f}" if theirs.mean else "n/a"


class BestCell(NamedTuple):
    """The EDM teacher's best cell of the teacher table."""

    sampler: str
    nfe: int
    dark: Stat  # its dark-pixel fraction
    fid: Stat

    @classmethod
    def of(cls, sampler: str, nfe: int, rows: list[dict]) -> BestCell:
        return cls(sampler, nfe, stat(rows, "dark_fraction"), stat(rows))


def best_edm_teacher(args, evaluable: bool = False) -> BestCell | None:
    """The EDM teacher's best (sampler, NFE <= 35) by fid_domain in the teacher table. ``evaluable``: among fewstep's
    samplers only (a cell this table evaluates itself), chosen over every seed the teacher table holds, so that each
    seed's process (--jobs) picks the same cell."""
    from fewstep.samplers import SOLVERS

    teacher = Rows(args.out / "teacher.json", None if evaluable else args.seeds)
    seeds = {r["train_seed"] for r in teacher.select("teacher")} if evaluable else set(args.seeds)
    options = {(r["sampler_name"], r["nfe_budget"]) for r in teacher.select("teacher")
               if r["nfe_budget"] <= 35 and (not evaluable or r["sampler_name"] in SOLVERS)}
    options = {k for k in options if len(teacher.select("teacher", *k)) == len(seeds)}
    if not options:
        return None
    key = min(options, key=lambda k: stat(teacher.select("teacher", *k)).mean)
    return BestCell.of(*key, teacher.select("teacher", *key))


def teacher_reference(args, rows: Rows, teacher: Run) -> tuple[BestCell, str]:
    """The teacher table's best cell and "best sampler"; without a teacher table at this scale (another --out), EDM's
    stochastic sampler at 35 NFE, evaluated into ``rows``, and "no teacher table"."""
    edm = best_edm_teacher(args)
    if edm is not None:
        return edm, "best sampler"
    for seed in args.seeds:
        rows.get("teacher", seed, teacher.ckpt(seed), "edm_sde", 35, args.n)
    return BestCell.of("edm_sde", 35, rows.select("teacher", "edm_sde", 35)), "no teacher table"


def gdd_runs(args) -> dict[int, Run]:
    """The GDD run of each freezing level, from the teacher table's teacher; ``--gdd-set`` reaches these only."""
    return {level: gdd_run(args, level) for level in args.gdd_levels}


def gdd_run(args, level: int) -> Run:
    teacher = teacher_runs(args)
    return Run(f"gdd_level{level}", lambda seed: [
        *method("gdd", args.quick), f"teacher.ckpt={teacher.ckpt(seed)}", f"method.freeze.level={level}"],
        args.out, [*args.extra, *args.gdd_extra])


def table_gdd(args, rows: Rows) -> list[str]:
    """One-step fid_domain of every kept checkpoint of each GDD run: the final value, the curve and any collapse."""
    teacher, runs = teacher_runs(args), gdd_runs(args)
    steps = set()
    for seed in args.seeds:
        teacher.train(seed)
        for level, run in runs.items():
            run.train(seed)
            for step, ckpt in layout.kept_checkpoints(run.dir(seed)).items():
                steps.add(step)
                rows.get(f"{gdd_label(level)} @ {step}", seed, ckpt, "euler", 1, args.n)
                rows.get(f"{gdd_label(level)}{RAW} @ {step}", seed, ckpt, "euler", 1, args.n, weights="raw")
    edm, which = teacher_reference(args, rows, teacher)
    best_sampler, best_nfe, _, best = edm
    steps = sorted(steps)
    batch = images_per_step(teacher.dir(args.seeds[0]))
    teacher_steps = max(layout.kept_checkpoints(teacher.dir(args.seeds[0])))
    # the teacher's own curve (its best cell at each of its checkpoints): was it still improving when GDD began?
    for seed in args.seeds:
        for step, ckpt in layout.kept_checkpoints(teacher.dir(seed)).items():
            if step < teacher_steps:
                rows.get(f"{TEACHER_AT} @ {step}", seed, ckpt, best_sampler, best_nfe, args.n)
    teacher_rows = {s: rows.select(f"{TEACHER_AT} @ {s}", best_sampler, best_nfe) for s in steps}
    teacher_curve = {s: stat(found) for s, found in teacher_rows.items() if found}
    final, half = steps[-1], max([s for s in steps if s <= teacher_steps // 2], default=steps[0])
    lines = ["| model | " + " | ".join(f"{s * batch / 1000:g}k" for s in steps) + " | collapsed seeds |",
             "|---|" + "---|" * (len(steps) + 1)]
    curves = {}
    for label in [gdd_label(level) + raw for level in runs for raw in ("", RAW)]:
        curve = {step: stat(rows.select(f"{label} @ {step}")) for step in steps if rows.select(f"{label} @ {step}")}
        curves[label] = curve
        lines.append(f"| {label} | " + " | ".join(str(curve[s]) if s in curve else "" for s in steps)
                     + f" | {collapsed(curve)} of {len(args.seeds)} |")
    figure({label: {s * batch / 1000: v for s, v in curve.items()} for label, curve in curves.items()},
           args.out / "gdd.png", "GDD: one-step fid_domain against training images (mean ± std over training seeds)",
           xlabel="training images (thousands)", xscale="linear")
    at = min(steps, key=lambda s: abs(s - teacher_steps))  # the teacher's value in the column of the images it saw
    lines += [f"| teacher, {which} ({best_sampler}, {best_nfe} NFE), {teacher_steps * batch / 1000:g}k images | "
              + " | ".join(str(best) if s == at else "" for s in steps) + f" | sampling spread {best.spread:.2g} |"]
    if teacher_curve:
        lines.append(f"| teacher ({best_sampler}, {best_nfe} NFE) at its own checkpoints | "
                     + " | ".join(str(teacher_curve.get(s, best if s == at else "")) for s in steps) + " | |")
    lines += ["",
              "One-step fid_domain (EMA weights; the trained weights themselves where it says so) against the training "
              "images seen, mean ± std over training seeds. A seed has collapsed when a later checkpoint scores more than "
              "twice its best.", "",
              "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    gdd = curves.get(gdd_label(0), {})
    if gdd:
        for step, text in ((half, "with half the teacher's images"), (final, "at the end")):
            lines.append(f"| GDD at one step at or below the teacher's best, {text} ({step * batch / 1000:g}k images) | "
                         f"1.54 vs 1.79 (CIFAR-10) | {gdd[step]} vs {best} | {verdict(gdd[step], best)} |")
        for claim, curve in (("GDD without freezing does not collapse", gdd),
                             ("GDD's trained weights (not their EMA) do not collapse", curves.get(gdd_label(0) + RAW, {}))):
            if curve:
                lines.append(f"| {claim} (issue 17) | no collapse | {collapsed(curve)} of "
                             f"{len(args.seeds)} seeds collapsed within {final * batch / 1000:g}k images | "
                             f"{'met' if collapsed(curve) == 0 else 'missed'} |")
    for level in runs:
        frozen = curves[gdd_label(level)]
        if level and gdd:
            lines.append(f"| {gdd_label(level)}: freezing does not cost FID, at the end | frozen is best | "
                         f"{frozen[final]} vs {gdd[final]} | {verdict(frozen[final], gdd[final])} |")
        if level and final in frozen:
            lines.append(f"| {gdd_label(level)} at one step at or below the teacher's best, at the end | 1.54 vs 1.79 "
                         f"(CIFAR-10) | {frozen[final]} vs {best} | {verdict(frozen[final], best)} |")
    return lines


TEACHER_AT = "teacher checkpoint"  # the gdd table's teacher at its earlier checkpoints, its best sampler cell
RAW = ", trained weights"  # a GDD row scored with the checkpoint's trained weights (weights=raw), not their EMA


def gdd_label(level: int) -> str:
    return "GDD" if level == 0 else f"GDD-I level {level}"


def collapsed(curve: dict[int, Stat]) -> int:
    """Training seeds whose one-step fid_domain at a later checkpoint is more than twice their best so far."""
    steps = sorted(curve)
    count = 0
    for i in range(len(curve[steps[0]].per_seed)):
        values = [curve[s].per_seed[i] for s in steps if len(curve[s].per_seed) > i]
        count += any(v > 2 * min(values[: j + 1]) for j, v in enumerate(values))
    return count


def images_per_step(run: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(layout.saved_config(run)).data.batch_size)


DDIL_VARIANTS = {  # label prefix -> overrides
    "": ["ddil=none"],
    "ddil_": ["ddil=default", "ddil.reflect=true"],  # the paper's DDIL, with reflected diffusion
    "ddil_noreflect_": ["ddil=default", "ddil.reflect=false"],  # fewstep's default since 2026-12-02
    # the 4-step students only (DDIL's regression there): the paper's DDIL with 10x the rollouts, each <= 10 steps old
    "ddil_fresh_": ["ddil=default", "ddil.reflect=true", "ddil.buffer.refresh_every=10"],
}
STUDENT_STEPS = (1, 2, 4)


def student_runs(args) -> dict[str, tuple[Run, list[tuple[int | None, str, int]]]]:
    """Each students-table run by label, with its evaluations (stage or None, sampler, steps).

    Progressive's rounds give the 1-, 2- and 4-step students of one run, consistency samples its one model at
    each; DMD2 trains one generator per step count.
    """
    teacher = teacher_runs(args)
    bases = {  # name -> (training overrides, evaluations)
        "progressive": (method("progressive", args.quick), [(k, "euler", k) for k in STUDENT_STEPS]),
        "consistency": (method("consistency", args.quick), [(None, "consistency", k) for k in STUDENT_STEPS]),
        **{f"dmd2_{k}": ([*method("dmd2", args.quick), f"method.student_steps={k}"], [(None, "consistency", k)])
           for k in STUDENT_STEPS},
    }
    runs = {}
    for prefix, ddil in DDIL_VARIANTS.items():  # every base without DDIL first, then with it, then the variants
        for base, (options, evaluations) in bases.items():
            if prefix != "ddil_fresh_" or base in ("progressive", "dmd2_4"):
                run = Run(prefix + base, lambda seed, o=options, d=ddil: [*o, *d, f"teacher.ckpt={teacher.ckpt(seed)}"],
                          args.out, args.extra)
                runs[prefix + base] = (run, evaluations)
    return runs


def same_seeds(ours: list[dict], theirs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Both row lists on the training seeds they share: a comparison of different seeds mixes in the seed spread."""
    shared = {r["train_seed"] for r in ours} & {r["train_seed"] for r in theirs}
    return [r for r in ours if r["train_seed"] in shared], [r for r in theirs if r["train_seed"] in shared]


def ddil_verdict(ddil: list[dict], plain: list[dict]) -> str:
    """DDIL's claim: better FID or better recall than the base method; "met" when either is, "missed" when both are
    worse."""
    fid = verdict(stat(ddil), stat(plain))
    recall = verdict(stat(ddil, "recall"), stat(plain, "recall"), lower_is_better=False)
    overall = "met" if "met" in (fid, recall) else "missed" if (fid, recall) == ("missed", "missed") else "within noise"
    return f"{overall} (FID {fid}, recall {recall})"


def student_label(name: str) -> str:
    """The row label of a run: DMD2's runs per step count share one (``dmd2_4`` -> ``dmd2``)."""
    return re.sub(r"^(.*dmd2)_\d+$", r"\1", name)


def table_students(args, rows: Rows) -> list[str]:
    teacher = teacher_runs(args)
    runs = student_runs(args)
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            raise SystemExit(f"--only {unknown[0]}: not a students-table run; choose from {', '.join(runs)}")
        runs = {name: value for name, value in runs.items() if name in args.only}
    for seed in args.seeds:
        teacher.train(seed)
        for name, (run, evaluations) in runs.items():
            run.train(seed)
            for stage, sampler, steps in evaluations:
                rows.get(student_label(name), seed, run.ckpt(seed, stage), sampler, steps, args.n)
    lines = ["| student | steps | fid_domain | recall | DDIL | fid_domain | recall | DDIL better (FID or recall) |",
             "|---|---|---|---|---|---|---|---|"]
    for base in ("progressive", "consistency", "dmd2"):
        for k in STUDENT_STEPS:
            for prefix, what in (("ddil_", "the paper's (reflected)"), ("ddil_noreflect_", "without reflection")):
                ddil, plain = same_seeds(rows.select(prefix + base, nfe=k), rows.select(base, nfe=k))
                if plain and ddil:
                    lines.append(f"| {base} | {k} | {stat(plain)} | {stat(plain, 'recall')} | {what} | {stat(ddil)} | "
                                 f"{stat(ddil, 'recall')} | {ddil_verdict(ddil, plain)} |")
    lines += ["", "DDIL's 4-step regression: the buffer's refresh and the reflection, one at a time.", "",
              "| student, 4 steps | DDIL | fid_domain | recall | dark fraction | FID against no DDIL, same seeds |",
              "|---|---|---|---|---|---|"]
    for base in ("progressive", "dmd2"):
        plain = rows.select(base, nfe=4)
        for prefix, what in (("", "none"), ("ddil_", "the paper's: reflected, refresh every 100 steps"),
                             ("ddil_fresh_", "reflected, refresh every 10 steps"), ("ddil_noreflect_", "no reflection")):
            selected = rows.select(prefix + base, nfe=4)
            if selected:
                ours, theirs = same_seeds(selected, plain)
                against = f"{verdict(stat(ours), stat(theirs))} ({stat(theirs)} without)" if prefix and theirs else ""
                lines.append(f"| {base} | {what} | {stat(selected)} | {stat(selected, 'recall')} | "
                             f"{stat(selected, 'dark_fraction')} | {against} |")
    curves = {f"{prefix}{base}": {k: stat(rows.select(prefix + base, nfe=k)) for k in STUDENT_STEPS
                                  if rows.select(prefix + base, nfe=k)}
              for base in ("progressive", "consistency", "dmd2") for prefix in ("", "ddil_", "ddil_noreflect_")}
    if any(curves.values()):
        figure(curves, args.out / "students.png", "Students: fid_domain against steps (mean ± std over training seeds)",
               xlabel="student steps")
    return lines


CONTINUOUS_STEPS = (1, 2)
TEACHER_FEW_STEP = (("lazy_ode", 1), ("lazy_ode", 2), ("dpmpp_2m", 2), ("edm_sde", 35), ("heun", 35))


def table_continuous(args, rows: Rows) -> list[str]:
    """sCD from the teacher table's teachers against the students table's consistency distillation (equal training
    images); sCT and MeanFlow from data at the teacher's budget; the teacher at 1, 2 and 35 NFE."""
    teacher, consistency = teacher_runs(args), student_runs(args)["consistency"][0]
    steps = {"scd": BUDGETS["consistency"][0], "data": BUDGETS["edm_teacher"][0]}  # trainer.max_steps=...
    quick = args.quick
    runs = {
        "sCD": Run("scd", lambda seed: [*method("scm", quick), "method.mode=scd", f"teacher.ckpt={teacher.ckpt(seed)}",
                                        *([] if quick else [steps["scd"], "method.tangent_warmup=300", "callbacks.ema.decay=0.99"])],
                   args.out, args.extra),
        "sCT": Run("sct", lambda seed: [*method("scm", quick), *([] if quick else [steps["data"]])], args.out, args.extra),
        "MeanFlow": Run("meanflow", lambda seed: [*method("meanflow", quick), *([] if quick else [steps["data"]])],
                        args.out, args.extra),
    }
    for seed in args.seeds:
        teacher.train(seed)
        for sampler, nfe in TEACHER_FEW_STEP:
            rows.get(f"teacher, {sampler}", seed, teacher.ckpt(seed), sampler, nfe, args.n)
        consistency.train(seed)
        for run in runs.values():
            run.train(seed)
        for k in CONTINUOUS_STEPS:
            rows.get("consistency (LCM form)", seed, consistency.ckpt(seed), "consistency", k, args.n)
            for name, run in runs.items():
                rows.get(name, seed, run.ckpt(seed), "euler" if name == "MeanFlow" else "consistency", k, args.n)
    teachers = list(dict.fromkeys(f"teacher, {sampler}" for sampler, _ in TEACHER_FEW_STEP))
    labels = [*teachers, "consistency (LCM form)", *runs]
    lines = ["| model | training | 1 NFE | 2 NFE | 35 NFE |", "|---|---|---|---|---|"]
    training = {"consistency (LCM form)": "distilled, 1,200 steps", "sCD": "distilled, 1,200 steps",
                "sCT": "from data, 4,000 steps", "MeanFlow": "from data, 4,000 steps"}
    for label in labels:
        cells = [str(stat(rows.select(label, nfe=n))) if rows.select(label, nfe=n) else "" for n in (1, 2, 35)]
        lines.append(f"| {label} | {training.get(label, 'teacher, 4,000 steps')} | {' | '.join(cells)} |")
    best = {n: min((stat(rows.select(label, nfe=n)) for label in teachers if rows.select(label, nfe=n)), key=lambda s: s.mean)
            for n in CONTINUOUS_STEPS}
    lines += ["", "| claim | ours | verdict |", "|---|---|---|"]
    for k in CONTINUOUS_STEPS:
        scd, lcm = stat(rows.select("sCD", nfe=k)), stat(rows.select("consistency (LCM form)", nfe=k))
        lines.append(f"| sCD at {k} step(s) better than the LCM-form consistency student at equal training images | "
                     f"{scd} vs {lcm} | {verdict(scd, lcm)} |")
        for name in ("sCD", "sCT", "MeanFlow"):
            ours = stat(rows.select(name, nfe=k))
            lines.append(f"| {name} at {k} step(s) better than the teacher's best sampler at {k} NFE | {ours} vs "
                         f"{best[k]} | {verdict(ours, best[k])} |")
    figure({label: {n: stat(rows.select(label, nfe=n)) for n in (1, 2, 35) if rows.select(label, nfe=n)} for label in labels},
           args.out / "continuous.png", "sCM, MeanFlow and the teacher (mean ± std over seeds)")
    return lines


# every method at DMD2's learning rate: SiD's and SiDA's own (1e-5) is made for 300-500M images at batch 256, and this
# budget is 12,800 images
FAKESCORE_LR = ["method.optimizer.lr=5e-5", "method.optimizer_critic.lr=5e-5"]
FAKESCORE_CHECKPOINTS = ["trainer.val_check_interval=100"]  # every 100 steps: a curve of 4 points over the 400-step budget
FAKESCORE_METHODS = {  # row label -> (run name, method, its options)
    "DMD2": ("fs_dmd2", "dmd2", ["method.student_steps=1"]),
    "SiD": ("fs_sid", "sid", []),
    "SiDA": ("fs_sida", "sida", []),
    "f-distill, JS": ("fs_fdistill_js", "fdistill", ["method.divergence=js"]),
    "f-distill, reverse KL": ("fs_fdistill_reverse_kl", "fdistill", ["method.divergence=reverse_kl"]),
}


def fakescore_runs(args) -> dict[str, Run]:
    """The fakescore table's one-step students by row label, each from the teacher table's teacher of its seed, at one
    budget of training images with a checkpoint every 100 steps (--quick: QUICK's two steps and one checkpoint)."""
    teacher = teacher_runs(args)
    checkpoints = [] if args.quick else FAKESCORE_CHECKPOINTS
    return {label: Run(name, lambda seed, m=method_name, o=options: [
        *method(m, args.quick), *o, *checkpoints, f"teacher.ckpt={teacher.ckpt(seed)}", *FAKESCORE_LR], args.out, args.extra)
        for label, (name, method_name, options) in FAKESCORE_METHODS.items()}


def checkpoint_curve(rows: Rows, label: str) -> dict[int, Stat]:
    """The rows ``<label> @ <step>`` of the selected seeds as a curve over training steps."""
    steps = sorted({int(r["label"].rsplit(" @ ", 1)[1]) for r in rows.rows if r["label"].startswith(f"{label} @ ")
                    and (rows.seeds is None or r["train_seed"] in rows.seeds)})
    return {step: stat(rows.select(f"{label} @ {step}")) for step in steps}


def fast_start(curve: dict[int, Stat]) -> tuple[str, str]:
    """SiD's "exponentially fast" start, as (ours, verdict): the last checkpoint below the first beyond noise, and the
    second already at or below the midpoint of the first and the last (half the fall made in the first interval)."""
    if len(curve) < 3:
        return f"{len(curve)} checkpoint(s)", "no verdict (fewer than 3 checkpoints)"
    steps = sorted(curve)
    first, second, last = curve[steps[0]], curve[steps[1]], curve[steps[-1]]
    midpoint = (first.mean + last.mean) / 2
    ours = f"{first} -> {second} -> {last} (midpoint {midpoint:.3g})"
    fell = verdict(last, first)
    if fell != "met":  # no fall beyond noise (or a rise): nothing fast to see
        return ours, fell
    return ours, "met" if second.mean <= midpoint else "missed"


def table_fakescore(args, rows: Rows) -> list[str]:
    """One-step fid_domain of every kept checkpoint of DMD2, SiD, SiDA and f-distill (JS, reverse KL), distilled from
    the teacher table's teachers at equal training images; GDD's curve (the gdd table's rows, when saved) and the
    teacher's best sampler beside them."""
    teacher, runs = teacher_runs(args), fakescore_runs(args)
    for seed in args.seeds:
        teacher.train(seed)
        for label, run in runs.items():
            run.train(seed)
            for step, ckpt in layout.kept_checkpoints(run.dir(seed)).items():
                rows.get(f"{label} @ {step}", seed, ckpt, "consistency", 1, args.n)
    (best_sampler, best_nfe, _, best), which = teacher_reference(args, rows, teacher)
    batch = images_per_step(teacher.dir(args.seeds[0]))  # every run here trains at the protocol's batch
    steps = {label: checkpoint_curve(rows, label) for label in runs}
    curves = {label: {step * batch: value for step, value in curve.items()} for label, curve in steps.items()}
    gdd_rows = Rows(args.out / "gdd.json", args.seeds)
    gdd = checkpoint_curve(gdd_rows, "GDD")
    if gdd:  # the gdd table's runs, which may be gone: their batch from the run of a saved checkpoint, if still there
        run = layout.run_of_checkpoint(gdd_rows.select(f"GDD @ {min(gdd)}")[0]["ckpt"])
        gdd_batch = images_per_step(run) if run is not None else batch
        curves["GDD (gdd table)"] = {step * gdd_batch: value for step, value in gdd.items()}
    teacher_images = max(layout.kept_checkpoints(teacher.dir(args.seeds[0]))) * batch
    columns = sorted({images for curve in curves.values() for images in curve} | {teacher_images})
    lines = ["| model | " + " | ".join(f"{images / 1000:g}k" for images in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, curve in curves.items():
        lines.append(f"| {label} | " + " | ".join(str(curve[c]) if c in curve else "" for c in columns) + " |")
    lines.append(f"| teacher, {which} ({best_sampler}, {best_nfe} NFE) | "
                 + " | ".join(str(best) if c == teacher_images else "" for c in columns) + " |")
    budget = max((max(curve) for curve in steps.values() if curve), default=0)
    spreads = [v.spread for curve in curves.values() for v in curve.values() if math.isfinite(v.spread)] or [float("nan")]
    lines += ["", f"One-step fid_domain (EMA weights, the consistency sampler at 1 NFE) against the training images seen "
              f"({batch} a step), mean ± std over training seeds: every method {budget} steps from the same seed's teacher, "
              f"scored at each kept checkpoint; the teacher at the images it trained on. The metric's own sampling "
              f"spread (one set of n images) is {min(spreads):.2g}-{max(spreads):.2g}. SiD improves fast when its last "
              "checkpoint is below its first beyond noise and its second is already at or below the midpoint of the two "
              "(half the fall in the first interval: an exponential fall keeping under 62% of its gap per interval does "
              "this, a linear one makes a third).",
              "", "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    if steps["SiD"]:
        ours, judged = fast_start(steps["SiD"])
        lines.append(f"| SiD improves fast in its first images | FID falls exponentially fast | {ours} | {judged} |")

    def final_rows(label: str, other: str) -> tuple[int, list[dict], list[dict]] | None:
        """Both labels' rows at the last checkpoint they share, on the seeds they share."""
        shared = set(steps[label]) & set(steps[other])
        if not shared:
            return None
        return max(shared), *same_seeds(rows.select(f"{label} @ {max(shared)}"), rows.select(f"{other} @ {max(shared)}"))

    if steps["SiDA"]:
        final = max(steps["SiDA"])
        sida = steps["SiDA"][final]
        lines.append(f"| SiDA at one step at or below the teacher's best sampler, at the end ({final * batch / 1000:g}k "
                     f"images) | 1.50 on CIFAR-10 (unconditional), below its teacher | {sida} vs {best} | "
                     f"{verdict(sida, best)} |")
    for ours_label, theirs_label, claim, paper in (
            ("f-distill, JS", "f-distill, reverse KL", "f-distill with JS at or below f-distill with reverse KL",
             "JS below reverse KL (f-distill: 1.92 on CIFAR-10)"),
            ("SiD", "DMD2", "SiD at or below DMD2 at equal training images", "1.92 vs DMD's 3.77 (CIFAR-10, unconditional)")):
        found = final_rows(ours_label, theirs_label)
        if found and found[1]:
            final, ours, theirs = found
            lines.append(f"| {claim}, at the end ({final * batch / 1000:g}k images, same seeds) | {paper} | "
                         f"{stat(ours)} vs {stat(theirs)} | {verdict(stat(ours), stat(theirs))} |")
    span = sorted({images for curve in curves.values() for images in curve})
    figure({**{label: {images / 1000: value for images, value in curve.items()} for label, curve in curves.items()},
            f"teacher, {best_sampler} at {best_nfe} NFE ({teacher_images / 1000:g}k images)": {images / 1000: best for images in span}},
           args.out / "fakescore.png", "Fake-score students: one-step fid_domain (mean ± std)",
           xlabel="training images (thousands)", xscale="linear")
    return lines


# post-hoc EMA (docs/phema.md): the reconstructed widths, from under EDM2's tracked 0.05 to near the bound 0.289
PHEMA_SIGMA_REL = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)
QUICK_PHEMA_SIGMA_REL = (0.03, 0.1)
PHEMA_SNAPSHOTS = 16  # snapshots over a run's budget
GDD_FIXED_EMA = (0.999, 0.995)  # the default decay, and the one the gdd table's retraining found better


def max_steps(overrides: list[str]) -> int:
    return int([o for o in overrides if o.startswith("trainer.max_steps=")][-1].split("=")[1])


def phema_tracking(budget: str, quick: bool) -> list[str]:
    """Post-hoc EMA tracking beside the fixed EMA: a snapshot every 1/16 of the budget's steps (every step for --quick)."""
    every = 1 if quick else max_steps(BUDGETS[budget]) // PHEMA_SNAPSHOTS
    return ["callbacks=phema", f"callbacks.phema.snapshot_every={every}"]


def phema_runs(args) -> dict[str, Run]:
    """The phema table's runs by model: an EDM teacher trained as the teacher table's with post-hoc EMA tracking, and
    GDD from the teacher table's teacher (the gdd table's run, so that its rows score the same trained weights) with
    tracking and the better fixed EMA, 0.995."""
    teacher, quick = teacher_runs(args), args.quick
    return {
        "teacher": Run("phema_teacher", lambda seed: [*method("edm_teacher", quick), *phema_tracking("edm_teacher", quick)],
                       args.out, args.extra),
        "GDD": Run("phema_gdd", lambda seed: [
            *method("gdd", quick), f"teacher.ckpt={teacher.ckpt(seed)}", "method.freeze.level=0",
            *phema_tracking("gdd", quick), f"callbacks.ema.decay={GDD_FIXED_EMA[1]}"], args.out, [*args.extra, *args.gdd_extra]),
    }


def reconstruct(run: Path, sigma_rels: tuple[float, ...]) -> dict[float, Path]:
    """``python -m fewstep.phema RUN sigma_rel=...`` for the targets not reconstructed yet: each target's checkpoint."""
    from fewstep.phema import RECONSTRUCTED_DIR, SNAPSHOT_DIR, reconstructed_path

    paths = {s: reconstructed_path(run / SNAPSHOT_DIR / RECONSTRUCTED_DIR, s) for s in sigma_rels}
    missing = [s for s, path in paths.items() if not path.is_file()]
    if missing:
        command = [sys.executable, "-m", "fewstep.phema", str(run), "sigma_rel=" + ",".join(map(repr, missing))]
        print(f"[phema] {' '.join(command[2:])}", flush=True)
        with open(run / "phema.log", "a") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"post-hoc EMA of {run} failed: see {run / 'phema.log'}")
    return paths


def ema_decay(run: Path) -> float:
    """The fixed EMA's decay that a run trained with."""
    from omegaconf import OmegaConf

    return float(OmegaConf.load(layout.saved_config(run)).callbacks.ema.decay)


def profile_error(path: Path) -> float:
    """A reconstruction's relative L2 distance from its target profile, as ``fewstep.phema`` recorded it."""
    from fewstep.checkpoints import read_checkpoint

    return float(read_checkpoint(path)["fewstep"]["phema"]["profile_error"])


def gdd_table_rows(args) -> Rows | None:
    """The gdd table's rows at this --out when its last call had this table's --n, --set and --gdd-set (its markdown's
    first line), else None."""
    rows, text = args.out / "gdd.json", args.out / "gdd.md"
    if rows.is_file() and text.is_file() and f"{settings(args)}:" in text.read_text().splitlines()[0]:
        return Rows(rows, args.seeds)
    return None


def default_ema_gdd(args, rows: Rows, seed: int, step: int) -> None:
    """GDD with the default fixed EMA at the phema GDD run's last step: the gdd table's row of this --out's run (the same
    teacher, seed and overrides, so the same trained weights when training repeats bit for bit), else that run trained
    here and scored."""
    label, run = f"GDD, fixed EMA {GDD_FIXED_EMA[0]:g}", gdd_run(args, 0)
    source = gdd_table_rows(args)
    key = {**dict(zip(ROW_KEY, (f"{gdd_label(0)} @ {step}", seed, "euler", 1, args.n))), **ROW_DEFAULTS,
           "ckpt": str(layout.checkpoints(run.dir(seed)) / f"step_{step:07d}.ckpt")}
    if source is None or rows.adopt(source, key, label) is None:
        run.train(seed)
        rows.get(label, seed, layout.kept_checkpoints(run.dir(seed))[step], "euler", 1, args.n)


def table_phema(args, rows: Rows) -> list[str]:
    """Post-hoc EMA against fixed EMAs on the same trained weights: the EDM teacher at its best sampler cell and GDD at
    one step, each reconstructed at every sigma_rel of PHEMA_SIGMA_REL from one run's snapshots."""
    from fewstep.phema import sigma_rel_to_gamma

    if any(o.startswith("callbacks.ema.decay=") for o in args.gdd_extra):
        raise SystemExit("the phema table sets the GDD runs' fixed EMAs itself (0.999 and 0.995): leave "
                         "callbacks.ema.decay out of --gdd-set")
    teacher, runs = teacher_runs(args), phema_runs(args)
    sigma_rels = QUICK_PHEMA_SIGMA_REL if args.quick else PHEMA_SIGMA_REL
    edm = best_edm_teacher(args, evaluable=True)  # without a teacher table at this --out: EDM's stochastic sampler (4 NFE for --quick)
    cells = {"teacher": (edm.sampler, edm.nfe) if edm else ("edm_sde", 4 if args.quick else 35), "GDD": ("euler", 1)}
    errors: dict[str, dict[float, float]] = {model: {} for model in runs}  # the largest profile error over seeds
    for seed in args.seeds:
        teacher.train(seed)
        for model, run in runs.items():
            run.train(seed)
            sampler, nfe = cells[model]
            for sigma_rel, path in reconstruct(run.dir(seed), sigma_rels).items():
                rows.get(f"{model}, sigma_rel {sigma_rel:g}", seed, path, sampler, nfe, args.n)
                errors[model][sigma_rel] = max(errors[model].get(sigma_rel, 0.0), profile_error(path))
            rows.get(f"{model}, fixed EMA {ema_decay(run.dir(seed)):g}", seed, run.ckpt(seed), sampler, nfe, args.n)
            rows.get(f"{model}{RAW}", seed, run.ckpt(seed), sampler, nfe, args.n, weights="raw")
        default_ema_gdd(args, rows, seed, max(layout.kept_checkpoints(runs["GDD"].dir(seed))))

    phema = {model: {s: stat(rows.select(f"{model}, sigma_rel {s:g}")) for s in sigma_rels} for model in runs}
    fixed = {model: {label: stat(rows.select(label)) for label in sorted({r["label"] for r in rows.rows})
                     if label.startswith(f"{model}, fixed EMA ") and rows.select(label)} for model in runs}
    heading = {model: f"{model} ({sampler}, {nfe} NFE)" for model, (sampler, nfe) in cells.items()}
    lines = [f"| averaging | {heading['teacher']} | profile error | {heading['GDD']} | profile error |", "|---|---|---|---|---|"]
    gammas = dict(zip(sigma_rels, sigma_rel_to_gamma(list(sigma_rels)).tolist()))
    for s in sigma_rels:
        lines.append(f"| sigma_rel {s:g} (gamma {gammas[s]:.3g}) | {phema['teacher'][s]} | {errors['teacher'][s]:.1e} | "
                     f"{phema['GDD'][s]} | {errors['GDD'][s]:.1e} |")
    decays = sorted({label.rsplit(" ", 1)[1] for model in runs for label in fixed[model]}, key=float, reverse=True)
    for decay in decays:
        cell = {model: fixed[model].get(f"{model}, fixed EMA {decay}", "") for model in runs}
        lines.append(f"| fixed EMA {decay} | {cell['teacher']} | | {cell['GDD']} | |")
    lines.append(f"| trained weights | {stat(rows.select('teacher' + RAW))} | | {stat(rows.select('GDD' + RAW))} | |")
    steps = {model: max(layout.kept_checkpoints(run.dir(args.seeds[0]))) for model, run in runs.items()}
    every = {model: phema_tracking(budget, args.quick)[1].split("=")[1] for model, budget in (("teacher", "edm_teacher"), ("GDD", "gdd"))}
    where = "the teacher table's best sampler cell" if edm else "EDM's stochastic sampler (no teacher table at this --out)"
    lines += ["", f"fid_domain, mean ± std over training seeds, of one run per seed and model: the EDM teacher "
              f"({steps['teacher']} steps, the teacher table's budget) at {where}, "
              f"GDD ({steps['GDD']} steps from the teacher table's teacher) at one step. Each run tracks EDM2's "
              f"power-function EMAs at sigma_rel 0.05 and 0.1 with a snapshot every {every['teacher']} (teacher) and "
              f"{every['GDD']} (GDD) steps; `python -m "
              "fewstep.phema` reconstructs each sigma_rel from them after training (its profile error: the largest over "
              "seeds, relative L2 from the exact profile). The fixed EMAs and the trained weights are of the same runs, "
              f"except GDD's {GDD_FIXED_EMA[0]:g}: the gdd table's run from the same teacher and seed (its rows, when "
              "saved at this --out), whose trained weights are the same where training repeats bit for bit. The best "
              "reconstruction is picked on the same sample sets it is scored on, which favours it by up to about the "
              "sampling spread.", "", "| claim | ours | verdict |", "|---|---|---|"]
    for model in runs:
        if fixed[model]:
            best_s = min(sigma_rels, key=lambda s: phema[model][s].mean)
            best_fixed = min(fixed[model], key=lambda label: fixed[model][label].mean)
            ours, theirs = same_seeds(rows.select(f"{model}, sigma_rel {best_s:g}"), rows.select(best_fixed))
            lines.append(f"| {model}: the best reconstructed sigma_rel matches or beats the best fixed decay (met: beats "
                         f"it; within noise: matches it) | sigma_rel {best_s:g} {stat(ours)} vs "
                         f"{best_fixed.split(', ', 1)[1]} {stat(theirs)} | {verdict(stat(ours), stat(theirs))} |")
    curves = {heading[model]: phema[model] for model in runs}
    for model in runs:
        for label, value in fixed[model].items():
            curves[label] = {s: value for s in sigma_rels}
    figure(curves, args.out / "phema.png", "Post-hoc EMA against fixed EMAs (dashed), mean ± std",
           xlabel="sigma_rel", dashed={label for model in runs for label in fixed[model]})
    return lines


# autoguidance (docs/autoguidance.md): the teacher guided by its own earlier checkpoint, unconditional
AUTOGUIDANCE_W = (0.25, 0.5, 1.0, 2.0)  # fewstep's w: D_guide + (1 + w)(D - D_guide); the paper's w' = 1 + w
AUTOGUIDANCE_NFE = (16, 35)
AUTOGUIDANCE_SAMPLERS = ("heun", "edm_sde")  # the teacher's deterministic sampler and EDM's stochastic one
QUICK_AUTOGUIDANCE = {"w": (1.0,), "nfe": (2,)}


def guide_checkpoint(run: Path, fraction: float, quick: bool = False) -> tuple[int, Path]:
    """The run's kept checkpoint before its last that is nearest ``fraction`` of its steps: (step, path). A quick run
    that kept one checkpoint is guided by it (a model guided by itself samples as unguided)."""
    kept = layout.kept_checkpoints(run)
    last = max(kept)
    earlier = [step for step in kept if step < last]
    if not earlier and not quick:
        raise SystemExit(f"{run} kept no checkpoint before its last: train its teacher with trainer.val_check_interval "
                         "below trainer.max_steps")
    step = min(earlier or [last], key=lambda s: abs(s - fraction * last))
    return step, kept[step]


def guided_label(w: float, step: int | None) -> str:
    return "W = 0" if not w else f"W = {w:g}, guide @ {step}"


def table_autoguidance(args, rows: Rows) -> list[str]:
    """The teacher table's teacher guided by its own checkpoint at about --guide-at of its steps, at each W of
    AUTOGUIDANCE_W against W = 0, with heun and edm_sde at 16 and 35 NFE."""
    teacher = teacher_runs(args)
    ws = QUICK_AUTOGUIDANCE["w"] if args.quick else AUTOGUIDANCE_W
    nfes = QUICK_AUTOGUIDANCE["nfe"] if args.quick else AUTOGUIDANCE_NFE
    source = Rows(args.out / "teacher.json", args.seeds)
    guides = {}
    for seed in args.seeds:
        teacher.train(seed)
        guides[seed] = guide_checkpoint(teacher.dir(seed), args.guide_at, args.quick)
        ckpt = teacher.ckpt(seed)
        for sampler in AUTOGUIDANCE_SAMPLERS:
            for nfe in nfes:
                # W = 0: the teacher table's row of the same checkpoint and cell, when saved
                key = {**dict(zip(ROW_KEY, ("teacher", seed, sampler, nfe, args.n))), **ROW_DEFAULTS, "ckpt": str(ckpt.resolve())}
                if rows.adopt(source, key, guided_label(0, None)) is None:
                    rows.get(guided_label(0, None), seed, ckpt, sampler, nfe, args.n)
                for w in ws:
                    rows.get(guided_label(w, guides[seed][0]), seed, ckpt, sampler, nfe, args.n, guide=guides[seed][1], guidance=w)
    step = guides[args.seeds[0]][0]
    last = max(layout.kept_checkpoints(teacher.dir(args.seeds[0])))
    columns = [0.0, *ws]
    cell = {(sampler, nfe, w): stat(rows.select(guided_label(w, step), sampler, nfe))
            for sampler in AUTOGUIDANCE_SAMPLERS for nfe in nfes for w in columns if rows.select(guided_label(w, step), sampler, nfe)}
    lines = []
    for nfe in nfes:
        lines += [f"{nfe} NFE:", "", "| sampler | " + " | ".join("W = 0 (no guidance)" if not w else f"W = {w:g}" for w in columns)
                  + " |", "|---|" + "---|" * len(columns)]
        for sampler in AUTOGUIDANCE_SAMPLERS:
            lines.append(f"| {sampler} | " + " | ".join(str(cell.get((sampler, nfe, w), "")) for w in columns) + " |")
        lines.append("")
    lines += [f"fid_domain, mean ± std over training seeds, of the teacher table's teachers ({last} steps), unconditional, "
              f"each guided by its own checkpoint at step {step} (about {args.guide_at:g} of its steps; EMA weights, as "
              "the model's): D_guide + (1 + W)(D - D_guide) at every sigma, the paper's w' = 1 + W (W = 0: no guidance, "
              "the teacher table's rows where saved). One NFE is one guided evaluation (the model and the guide once "
              "each). The best W is picked on the same sample sets it is scored on, which favours it by up to about the "
              "sampling spread.", "", "| claim | ours | verdict |", "|---|---|---|"]
    for nfe in nfes:
        for sampler in AUTOGUIDANCE_SAMPLERS:
            guided = [w for w in ws if (sampler, nfe, w) in cell]
            if guided and (sampler, nfe, 0.0) in cell:
                best = min(guided, key=lambda w: cell[(sampler, nfe, w)].mean)
                ours, theirs = same_seeds(rows.select(guided_label(best, step), sampler, nfe),
                                          rows.select(guided_label(0, None), sampler, nfe))
                lines.append(f"| autoguidance with an earlier checkpoint improves fid_domain at {nfe} NFE ({sampler}) | "
                             f"best W = {best:g}: {stat(ours)} vs W = 0: {stat(theirs)} | {verdict(stat(ours), stat(theirs))} |")
    figure({f"{sampler}, {nfe} NFE": {w: cell[(sampler, nfe, w)] for w in columns if (sampler, nfe, w) in cell}
            for sampler in AUTOGUIDANCE_SAMPLERS for nfe in nfes},
           args.out / "autoguidance.png", f"Autoguidance by the step-{step} checkpoint, mean ± std",
           xlabel="guidance W (0: none)", xscale="linear")
    return lines


# -- output -------------------------------------------------------------------------------------------------------
def fid_nfe_table(curves: dict[str, dict[int, Stat]], nfes: list[int]) -> list[str]:
    columns, cells = grid({sampler: curve for sampler, curve in curves.items() if curve}, str, nfes, sort=False)
    lines = markdown_table("sampler", [f"{n} NFE" for n in columns], cells)
    spreads = [s.spread for c in curves.values() for s in c.values() if math.isfinite(s.spread)]
    if spreads:
        lines.append(f"\nfid_domain, mean ± std over training seeds; the metric's own sampling spread (one set of n "
                     f"images) is {min(spreads):.2g}-{max(spreads):.2g}.")
    return lines


def figure(curves: dict[str, dict[int, Stat]], path: Path, title: str, xlabel: str = "NFE", xscale: str = "log",
           dashed: Collection[str] = PEER_NAMES) -> None:
    """fid_domain against NFE (or what ``xlabel`` says), mean and std over training seeds; the peers (or ``dashed``)
    dashed."""
    plot("fid_domain", curves, path, title=title, xlabel=xlabel, xscale=xscale, dashed=dashed, sort=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=[*TABLES, "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=1000, help="images per sample set (two disjoint sets per row)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 35])
    parser.add_argument("--samplers", nargs="+", default=None, help="teacher table: only these samplers")
    parser.add_argument("--gdd-levels", type=int, nargs="+", default=[0, 1], help="gdd table: GDD-I freezing levels (0: GDD)")
    parser.add_argument("--kac-stages", type=int, nargs="+", default=[100, 20, 4, 2, 1])
    parser.add_argument("--kac-steps-per-stage", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="an override for every training run")
    parser.add_argument("--gdd-set", dest="gdd_extra", action="append", default=[],
                        help="gdd table: an override for the GDD runs only, not their teachers (e.g. callbacks.ema.decay=0.995)")
    parser.add_argument("--guide-at", type=float, default=0.25,
                        help="autoguidance table: the guide is the teacher's kept checkpoint nearest this share of its steps")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny network, two steps, n = 16")
    parser.add_argument("--only", nargs="+", default=None,
                        help="students table: train and evaluate only these runs (e.g. ddil_noreflect_progressive)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train and evaluate this many seeds at once, each a process with cores/jobs threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.extra = QUICK + args.extra
        args.n, args.kac_stages, args.kac_steps_per_stage = 16, [8, 4, 2, 1], 2
    return args


def without_options(argv: list[str], *names: str) -> list[str]:
    """``argv`` less the options ``names`` and their values (``--seeds 0 1 2``, ``--jobs=2``)."""
    kept, skipping = [], False
    for token in argv:
        if token.startswith("-"):
            skipping = token.split("=")[0] in names
            if skipping:
                continue
        if not skipping:
            kept.append(token)
    return kept


def run_seeds_in_parallel(table: str, args, argv: list[str]) -> None:
    """The table's seeds as parallel processes of this tool, ``--jobs`` at a time, each with its share of the cores.

    Each process trains and evaluates one seed into the shared ``OUT/<table>.json`` (saved under a lock);
    the caller then summarises every seed from the saved rows.
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rest = list(argv)
    rest.remove(args.table)  # the positional TABLE ("all" runs table by table)
    base = [sys.executable, __file__, table, *without_options(rest, "--seeds", "--jobs")]

    def one(seed: int) -> int:
        log = args.out / f"{table}_seed{seed}.log"
        print(f"[jobs] {table} seed {seed} ({threads} threads): log in {log}", flush=True)
        with open(log, "a") as stream:
            return subprocess.run([*base, "--seeds", str(seed)], env=env, stdout=stream, stderr=subprocess.STDOUT).returncode

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [seed for seed, code in zip(args.seeds, pool.map(one, args.seeds)) if code]
    if failed:
        raise SystemExit(f"{table}: seeds {failed} failed: see {args.out}/{table}_seed<S>.log")


def settings(args) -> str:
    """The options that decide a table's runs and rows, as its markdown's first line gives them."""
    return f" --n {args.n}{''.join(f' --set {e}' for e in args.extra)}{''.join(f' --gdd-set {e}' for e in args.gdd_extra)}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for table in TABLES if args.table == "all" else [args.table]:
        start = time.perf_counter()
        if args.jobs > 1 and len(args.seeds) > 1:
            run_seeds_in_parallel(table, args, argv)
        rows = Rows(args.out / f"{table}.json", args.seeds)
        lines = globals()[f"table_{table}"](args, rows)
        minutes = (time.perf_counter() - start) / 60
        header = [f"<!-- python tools/reproduce.py {table} --seeds {' '.join(map(str, args.seeds))}{settings(args)}"
                  f": {minutes:.1f} min this call -->", ""]
        text = "\n".join(header + lines) + "\n"
        (args.out / f"{table}.md").write_text(text)
        print(text)
        others = sorted({r["train_seed"] for r in rows.rows} - set(args.seeds))
        if others:
            print(f"{table}.md summarises seeds {args.seeds} only; {table}.json also holds seeds {others}: run "
                  f"`python tools/reproduce.py {table} --seeds {' '.join(map(str, sorted({*args.seeds, *others})))}` "
                  "(saved rows are not evaluated again) for the table over all of them", flush=True)


if __name__ == "__main__":
    main()
