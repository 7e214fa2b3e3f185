"""fewstep's solvers against k-diffusion's and diffusers' on analytic problems with exact denoisers: error against NFE.

The peers are optional (without one the script says so in one line and benchmarks what it can):

    pip install --no-deps "k-diffusion==0.1.1.post1" "dctorch==0.1.2" torchsde torchdiffeq trampoline
    pip install diffusers
    python tools/bench_samplers.py [--problems gaussian64 gmm mixture16] [--quick] [--n N] [--nfes 1,2,4] [--out docs]

Problems, in float64 on the CPU with fixed seeds, each with an exact denoiser:
  gaussian64  Gaussian.benchmark(dim=64): full covariance, standard deviations log-spaced in [0.05, 1], rotated;
  gmm         GaussianMixture.benchmark(dim=8, modes=32, std=0.05): 32 equal modes on the unit sphere;
  mixture16   8 equal modes in 16-d, means N(0, I), per-mode diagonal stds log-uniform in [0.05, 1] (SEEDS and lazy).
Rows: every solver in fewstep.samplers.SOLVERS (lazy ones told sigma_data, edm_sde with s_noise=1; DDIM also at eta=1,
SEEDS-2 also with its former phi1 weights), k-diffusion's samplers (only its ``sampling`` module is imported; fresh
noise, and dpmpp_sde also with its Brownian tree) and diffusers' EDMDPMSolverMultistepScheduler (sde-dpmsolver++). All
start from the same noise on EDM's Karras grid and run with the most steps whose counted NFE fits each budget; SDE noise
comes from torch's generator, seeded before each run. Scores: Frechet distance to the exact moments, squared sliced W2
to a fresh true sample (256 fixed directions), mode-mass TV (gmm); the noise floor is the same score of fresh true
samples. Writes <out>/bench_samplers.md, <out>/bench_samplers.json and <out>/images/bench_samplers_<problem>.png.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fewstep.bench import cpu_name, kdiffusion_sampling, strict_json, version
from fewstep.data import Gaussian, GaussianMixture
from fewstep.metrics import frechet_to_truth, mode_mass_error, sliced_wasserstein2
from fewstep.metrics.curves import figure, grid, markdown_table
from fewstep.samplers import SOLVERS, CountingDenoiser, sample

NFES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
QUICK_NFES = (2, 8, 32)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
NOISE_SEED, SDE_SEED, REFERENCE_SEED, PROJECTION_SEED, FLOOR_SEEDS = 1, 2, 3, 4, (10, 11, 12)
# torchsde's Brownian tree costs seconds per query at 20,000 x 64 on a 2-core CPU: on that problem, these budgets only
BROWNIAN_NFES = {"gaussian64": (4, 16)}
METRIC_TITLES = {
    "frechet": "Frechet distance to the exact moments",
    "sliced_w2": "sliced W2^2 to a fresh true sample",
    "mode_tv": "mode-mass total variation",
}
Denoiser = Callable[..., Tensor]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- problems and scores


@dataclass
class Problem:
    name: str
    title: str
    n: int  # samples: the floor falls as 1 / n and must sit below the errors of interest
    law: Gaussian | GaussianMixture
    metrics: tuple[str, ...]  # the main one first: a Gaussian's law is fixed by its moments, a mixture's is not

    @property
    def dim(self) -> int:
        return self.law.mean().shape[0]

    @property
    def sigma_data(self) -> float:
        """RMS standard deviation sqrt(tr Cov / d): the scale that the lazy schedules assume."""
        return math.sqrt(float(torch.trace(self.law.covariance())) / self.dim)

    def draw(self, n: int, seed: int) -> Tensor:
        samples = self.law.sample(n, generator=seeded(seed))
        return samples[0] if isinstance(samples, tuple) else samples

    def scores(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        """The distances from samples to the truth (NaN for samples that diverged)."""
        if not bool(torch.isfinite(samples).all()):
            return {metric: math.nan for metric in self.metrics}
        result = {
            "frechet": float(frechet_to_truth(samples, self.law.mean(), self.law.covariance())),
            "sliced_w2": float(sliced_wasserstein2(samples, reference, generator=seeded(PROJECTION_SEED))),
        }
        if "mode_tv" in self.metrics:
            result["mode_tv"] = float(mode_mass_error(samples, self.law))
        return result


def mixture16() -> GaussianMixture:
    generator = seeded(0)
    means = torch.randn(8, 16, dtype=torch.float64, generator=generator)
    log_stds = torch.empty(8, 16, dtype=torch.float64).uniform_(math.log(0.05), math.log(1.0), generator=generator)
    return GaussianMixture(means, log_stds.exp())


PROBLEMS = {
    "gaussian64": lambda: Problem("gaussian64", "64-d Gaussian, full covariance, stds log-spaced in [0.05, 1] "
                                  "(Gaussian.benchmark(dim=64))", 20_000, Gaussian.benchmark(dim=64, seed=0), ("frechet", "sliced_w2")),
    "gmm": lambda: Problem("gmm", "8-d mixture of 32 equal modes, std 0.05, on the unit sphere (GaussianMixture.benchmark"
                           "(dim=8, modes=32, std=0.05))", 10_000, GaussianMixture.benchmark(dim=8, modes=32, std=0.05, seed=0),
                           ("sliced_w2", "frechet", "mode_tv")),
    "mixture16": lambda: Problem("mixture16", "16-d mixture of 8 equal modes, means N(0, I), per-mode diagonal stds "
                                 "log-uniform in [0.05, 1] (seed 0)", 10_000, mixture16(), ("sliced_w2", "frechet")),
}


# ---------------------------------------------------------------- samplers: one Entry per row


@dataclass
class Entry:
    """A benchmarked sampler: ``plan(budget)``, its setting for an NFE budget (None: cannot fit); ``run`` samples."""

    name: str
    family: str  # fewstep, k-diffusion or diffusers
    plan: Callable[[int], int | None]
    run: Callable[[Denoiser, Tensor, int], Tensor]  # (denoiser, unit noise [n, d], setting) -> samples
    note: str = ""
    nfes: tuple[int, ...] | None = None  # the budgets it runs at (None: all)


def fewstep_entries(sigma_data: float) -> list[Entry]:
    """Every solver in SOLVERS at its defaults (lazy ones told sigma_data; edm_sde with s_noise=1), DDIM at eta=1, and
    SEEDS-2 with the phi1 weights it had before."""
    entries = []
    for name in SOLVERS:
        options = {"sigma_data": sigma_data} if "sigma_data" in inspect.signature(SOLVERS[name].fn).parameters else {}
        if name == "edm_sde":
            options["s_noise"] = 1.0  # EDM's 1.003 compensates a network's bias; an exact denoiser has none
        entries.append(fewstep_entry(name, options))
    extra = {"ddim": ("ddim(eta=1)", {"eta": 1.0}), "seeds2": ("seeds2(weights=phi1)", {"weights": "phi1"})}
    return entries + [fewstep_entry(name, options, label) for name, (label, options) in extra.items() if name in SOLVERS]


def fewstep_entry(name: str, options: dict, label: str | None = None) -> Entry:
    def run(denoiser: Denoiser, noise: Tensor, budget: int) -> Tensor:
        return sample(denoiser, noise, name, budget, SIGMA_MIN, SIGMA_MAX, rho=RHO, **options)

    note = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in options.items())
    return Entry(label or name, "fewstep", lambda budget: budget if budget >= SOLVERS[name].min_nfe else None, run, note)


class StepBudget:
    """The most steps whose counted NFE fits a budget, for a sampler that takes a step count.

    Counts are probed once per step count on a one-row batch with a zero denoiser, so they are measured, not
    assumed. A step count at which the sampler raises is skipped and remembered.
    """

    def __init__(self, run_steps: Callable[[Denoiser, Tensor, int], Tensor], dim: int):
        self.run_steps, self.dim = run_steps, dim
        self.counted: dict[int, int | None] = {}
        self.failures: dict[int, str] = {}

    def nfe(self, steps: int) -> int | None:
        if steps not in self.counted:
            counter = CountingDenoiser(lambda x, sigma, **cond: torch.zeros_like(x))
            state = torch.random.get_rng_state()  # probing must not shift the runs' SDE noise
            try:
                self.run_steps(counter, torch.zeros(1, self.dim, dtype=torch.float64), steps)
                self.counted[steps] = counter.nfe
            except Exception as error:  # a peer's bug at some step count: recorded and reported, not fatal
                self.counted[steps], self.failures[steps] = None, f"{type(error).__name__}: {error}"
            finally:
                torch.random.set_rng_state(state)
        return self.counted[steps]

    def __call__(self, budget: int) -> int | None:
        best = None
        for steps in range(1, budget + 1):  # every sampler makes at least one call per step
            nfe = self.nfe(steps)
            if nfe is not None and nfe > budget:
                break
            best = steps if nfe is not None else best
        return best


KDIFF_SAMPLERS = ("sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_sde", "sample_dpmpp_2m_sde",
                  "sample_dpmpp_3m_sde", "sample_euler_ancestral")
KDIFF_SDE = {"sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler_ancestral"}
# Of these only dpmpp_sde asks for noise over overlapping intervals ([t, t_mid] then [t, t_next]), where a Brownian
# tree correlates the draws; on disjoint steps the tree's increments have the law of fresh noise.
KDIFF_NEEDS_BROWNIAN = {"sample_dpmpp_sde"}


def kdiff_entries(sampling, problem: Problem) -> list[Entry]:
    entries = []
    for function in KDIFF_SAMPLERS:
        label = "kd." + function.removeprefix("sample_")
        kinds = ["fresh", "brownian"] if function in KDIFF_NEEDS_BROWNIAN else ["fresh"] if function in KDIFF_SDE else [None]
        for kind in kinds:
            run = kdiff_runner(sampling, function, kind)
            name = label + (f" ({kind})" if kind else "")
            note = {"fresh": "default_noise_sampler(x)", "brownian": "its BrownianTreeNoiseSampler"}.get(kind, "")
            nfes = BROWNIAN_NFES.get(problem.name) if kind == "brownian" else None
            entries.append(Entry(name, "k-diffusion", StepBudget(run, problem.dim), run, note, nfes))
    return entries


def kdiff_runner(sampling, function: str, noise_kind: str | None):
    def run(denoiser: Denoiser, noise: Tensor, steps: int) -> Tensor:
        sigmas = sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, rho=RHO).to(noise.dtype)
        x = noise * sigmas[0]
        options = {}
        if noise_kind == "fresh":
            options["noise_sampler"] = sampling.default_noise_sampler(x)
        elif noise_kind == "brownian":
            options["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())
        return getattr(sampling, function)(denoiser, x, sigmas, disable=True, **options)

    return run


def diffusers_entry(diffusers, problem: Problem) -> Entry:
    """diffusers' EDM sde-dpmsolver++ (2M): a hand loop hands it the epsilon output F of D = c_skip x + c_out F."""
    sigma_data = problem.sigma_data

    def run(denoiser: Denoiser, noise: Tensor, steps: int) -> Tensor:
        scheduler = diffusers.EDMDPMSolverMultistepScheduler(
            sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=sigma_data, rho=RHO, algorithm_type="sde-dpmsolver++",
            solver_order=2, prediction_type="epsilon")
        scheduler.set_timesteps(steps)
        x = noise * scheduler.sigmas[0].item()  # EDM's prior; init_noise_sigma, sqrt(sigma_max^2 + 1), is a VP leftover
        for t in scheduler.timesteps:
            x = scheduler.step(epsilon_output(denoiser, scheduler, scheduler.scale_model_input(x, t)), t, x).prev_sample
        return x

    note = f"solver_order=2, sigma_data={sigma_data:.4g}, epsilon output F = (D - c_skip x) / c_out"
    return Entry("df.EDMDPMSolverMultistep(sde-dpmsolver++)", "diffusers", StepBudget(run, problem.dim), run, note)


def epsilon_output(denoiser: Denoiser, scheduler, model_input: Tensor) -> Tensor:
    """F of an EDM-preconditioned epsilon network given c_in x, in float32 as the scheduler computes c_in, c_skip and
    c_out, so that undoing its scaling is exact to float64 rounding."""
    sigma = scheduler.sigmas[scheduler.step_index]
    sigma_data = scheduler.config.sigma_data
    total = (sigma**2 + sigma_data**2) ** 0.5
    x = model_input * total  # undo scale_model_input's c_in = 1 / total
    c_skip, c_out = sigma_data**2 / (sigma**2 + sigma_data**2), sigma * sigma_data / total
    return (denoiser(x, sigma.to(x.dtype).expand(x.shape[0])) - c_skip * x) / c_out


def all_entries(problem: Problem, sampling, diffusers) -> list[Entry]:
    entries = fewstep_entries(problem.sigma_data)
    entries += kdiff_entries(sampling, problem) if sampling is not None else []
    return entries + ([diffusers_entry(diffusers, problem)] if diffusers is not None else [])


# ---------------------------------------------------------------- running


def benchmark(problem: Problem, entries: list[Entry], nfes: tuple[int, ...]) -> dict:
    noise = torch.randn(problem.n, problem.dim, dtype=torch.float64, generator=seeded(NOISE_SEED))
    reference = problem.draw(problem.n, REFERENCE_SEED)
    floors = [problem.scores(problem.draw(problem.n, seed), reference) for seed in FLOOR_SEEDS]
    floor = {metric: [run[metric] for run in floors] for metric in problem.metrics}
    print(f"\n{problem.name}: n={problem.n}, floor " + ", ".join(f"{k}={statistics.mean(v):.3g}" for k, v in floor.items()),
          flush=True)
    rows = []
    for entry in entries:
        for budget in nfes:
            setting = entry.plan(budget) if entry.nfes is None or budget in entry.nfes else None
            if setting is None:
                continue
            counter = CountingDenoiser(problem.law.denoiser)
            torch.manual_seed(SDE_SEED)
            start = time.perf_counter()
            samples = entry.run(counter, noise, setting)
            rows.append({"problem": problem.name, "solver": entry.name, "family": entry.family, "nfe_budget": budget,
                         "nfe": counter.nfe, "setting": setting, "wall_s": time.perf_counter() - start,
                         **problem.scores(samples, reference)})
            print(f"  {entry.name:42s} budget {budget:3d} nfe {counter.nfe:3d} {rows[-1]['wall_s']:7.2f}s  "
                  + " ".join(f"{m}={rows[-1][m]:.3g}" for m in problem.metrics), flush=True)
    return {
        "name": problem.name, "title": problem.title, "n": problem.n, "sigma_data": problem.sigma_data,
        "metrics": list(problem.metrics), "floor": floor, "rows": rows,
        "notes": {entry.name: entry.note for entry in entries if entry.note},
        "failures": {entry.name: {str(k): v for k, v in entry.plan.failures.items()}
                     for entry in entries if getattr(entry.plan, "failures", None)},
        "families": {entry.name: entry.family for entry in entries},
    }


# ---------------------------------------------------------------- reports


def fmt(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3g}"


def problem_section(result: dict, nfes: tuple[int, ...], image: str) -> list[str]:
    lines = [f"## {result['name']}: {result['title']}", "",
             f"n = {result['n']} samples; data RMS std (sigma_data for the lazy solvers and the EDM scheduler) "
             f"{result['sigma_data']:.4g}. A number in parentheses is the NFE counted, where it differs from the budget.",
             "", f"![{result['name']}]({image})", ""]
    curves = {}
    for row in result["rows"]:
        curves.setdefault(row["solver"], {})[row["nfe_budget"]] = row
    for metric in result["metrics"]:
        def cell(row, metric=metric):
            return fmt(row[metric]) + (f" ({row['nfe']})" if row["nfe"] != row["nfe_budget"] else "")

        floor = result["floor"][metric]
        columns, cells = grid(curves, cell, list(nfes), sort=False)
        cells.append([f"*noise floor* {fmt(statistics.mean(floor))} (fresh true samples: {', '.join(map(fmt, floor))})",
                      *[""] * len(columns)])
        lines += [f"### {METRIC_TITLES[metric]}" + (" (main)" if metric == result["metrics"][0] else ""), ""]
        lines += markdown_table("solver", columns, cells) + [""]
    lines += [f"### Settings on {result['name']}", ""] + [f"- `{k}`: {v}" for k, v in result["notes"].items()] + [""]
    failures = [f"- `{name}` at {steps} step(s): `{message}`" for name, by_steps in result["failures"].items()
                for steps, message in by_steps.items()]
    return lines + (["### Step counts at which a peer raised (skipped)", "", *failures, ""] if failures else [])


def markdown(env: dict, results: list[dict], nfes: tuple[int, ...], images: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# Sampler benchmark: fewstep against k-diffusion and diffusers on analytic problems", "",
        f"`{env['command']}`, {env['date']}, {env['machine']} (torch threads {env['torch_threads']}), Python "
        f"{env['python']}, {versions}; {env['wall_minutes']:.1f} min wall clock.", "",
        "Every number below comes from that run (`bench_samplers.json`, beside this file, holds the raw rows). All "
        f"samplers start from the same noise (seed {NOISE_SEED}) on the EDM Karras grid (sigma {SIGMA_MIN} to {SIGMA_MAX}, "
        f"rho {RHO:g}), call the same exact float64 denoiser, and run with the most steps whose *counted* NFE fits each "
        f"budget; SDE noise comes from torch's global generator seeded with {SDE_SEED} before each run. A `-` marks a "
        "budget a sampler cannot fit (or, for Brownian-tree rows, a budget not run). Rows: fewstep's solvers (names as "
        "in `fewstep.samplers.SOLVERS`), `kd.` k-diffusion, `df.` diffusers. Noise floor: the same scores for fresh "
        "true samples of the same size (three seeds); a sampler cannot be told apart from exact below it.", "",
    ]
    for result in results:
        lines += problem_section(result, nfes, images[result["name"]])
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib import pyplot as plt

    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 3, 5.5), squeeze=False)
    peers = {name for name, family in result["families"].items() if family != "fewstep"}
    for ax, metric in zip(axes[0], metrics, strict=True):
        curves = {}
        for row in result["rows"]:
            if math.isfinite(row[metric]) and row[metric] > 0:
                curves.setdefault(row["solver"], {})[row["nfe"]] = row[metric]
        figure(metric, curves, title=METRIC_TITLES[metric], floor=statistics.mean(result["floor"][metric]),
               dashed=peers, axes=ax, sort=False)
    fig.suptitle(f"{result['name']}: n = {result['n']} (peers dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: three budgets, n = 1000")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default 20000 on gaussian64, else 10000)")
    parser.add_argument("--nfes", type=lambda text: tuple(int(v) for v in text.split(",")), default=None,
                        help="comma-separated NFE budgets (default 1,2,3,4,6,8,12,16,24,32,48,64; quick 2,8,32)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the markdown, JSON and images go")
    args = parser.parse_args(argv)
    nfes = args.nfes or (QUICK_NFES if args.quick else NFES)
    sampling = kdiffusion_sampling()
    try:
        import diffusers
    except ImportError as error:
        print(f"bench_samplers: diffusers is not importable ({error}); benchmarking without it", flush=True)
        diffusers = None
    started = time.perf_counter()
    results = []
    for name in args.problems:
        problem = PROBLEMS[name]()
        problem.n = args.n or (1000 if args.quick else problem.n)
        results.append(benchmark(problem, all_entries(problem, sampling, diffusers), nfes))
    images = {r["name"]: f"images/bench_samplers_{r['name']}.png" for r in results}
    for result in results:
        plot(result, args.out / images[result["name"]])
    env = {
        "command": "python tools/bench_samplers.py" + "".join(f" {a}" for a in argv),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "versions": {pkg: version(pkg) for pkg in ("torch", "numpy", "k-diffusion", "diffusers", "torchsde", "matplotlib")},
        "wall_minutes": (time.perf_counter() - started) / 60,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"environment": env, "problems": results}
    (args.out / "bench_samplers.json").write_text(json.dumps(strict_json(raw), indent=1, allow_nan=False))
    (args.out / "bench_samplers.md").write_text(markdown(env, results, nfes, images))
    print(f"\nwrote {args.out / 'bench_samplers.md'}, bench_samplers.json and {len(images)} images in "
          f"{env['wall_minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    main()
