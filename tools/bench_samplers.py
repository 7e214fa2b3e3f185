"""fewstep's solvers against k-diffusion's and diffusers' on two analytic problems: error against NFE, and overhead.

Install (the peers are optional: without them the script says so in one line and benchmarks what it can):

    pip install -e ".[dev,bench]"
    pip install --no-deps "k-diffusion==0.1.1.post1" "dctorch==0.1.2"

Every dctorch release (0.1.0-0.1.2) pins numpy<2 in its metadata, so a plain `pip install k-diffusion`
downgrades numpy and breaks mlxtend (numpy>=2.3.5), although dctorch works with numpy 2 at run time. Hence
k-diffusion and dctorch go in with --no-deps, and the `bench` extra carries the rest of what
`import k_diffusion` needs (and setuptools<81: k-diffusion imports clip-anytorch, which needs pkg_resources).

    python tools/bench_samplers.py [--quick] [--n N] [--n-gmm N] [--nfes 1,2,4] [--out docs]

Problems, in float64 on the CPU with fixed seeds, each with an exact denoiser:
  gaussian64  Gaussian.benchmark(dim=64): full covariance, standard deviations log-spaced in [0.05, 1], rotated;
  gmm         GaussianMixture.benchmark(dim=8, modes=32, std=0.05): 32 equal modes on the unit sphere.
Every solver in fewstep.samplers.SOLVERS (read at run time), k-diffusion's samplers and two diffusers
schedulers start from the same noise and call the same denoiser; NFE is counted, never assumed.
Scores: Frechet distance to the exact moments, sliced W2 to a fresh true sample, mode-mass TV (gmm),
against the noise floor, the same scores of a fresh true sample of the same size.

Writes <out>/bench_samplers.md, <out>/bench_samplers.json and <out>/images/bench_samplers_{gaussian64,gmm}.png.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.data import Gaussian, GaussianMixture
from fewstep.metrics import frechet_to_truth, mode_mass_error, sliced_wasserstein2
from fewstep.samplers import SOLVERS, CountingDenoiser, sample

NFES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Settings:
    nfes: tuple[int, ...]
    n: int  # samples on gaussian64: its floor (which falls as 1 / n) must sit below the errors of interest
    n_gmm: int  # samples on gmm: its exact denoiser costs ~5x the Gaussian's per sample
    verify_budget: int  # NFE of the adapters' convergence check
    verify_n: int  # its sample size (the diffusers Brownian tree costs ~ n * d per query)
    timing_batch: int
    timing_repeats: int


FULL = Settings(NFES, n=20_000, n_gmm=10_000, verify_budget=127, verify_n=4_000, timing_batch=4096, timing_repeats=5)
QUICK = Settings((2, 8, 32), n=1_000, n_gmm=1_000, verify_budget=16, verify_n=1_000, timing_batch=256, timing_repeats=1)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
NOISE_SEED, SDE_SEED, REFERENCE_SEED, PROJECTION_SEED, FLOOR_SEEDS = 1, 2, 3, 4, (10, 11, 12)

# torchsde's Brownian tree costs seconds per query at 20,000 x 64 on a 2-core CPU, so the samplers that need
# it (below) run with it at these budgets only on the big problem; everywhere else they get fresh normals.
BROWNIAN_NFES = {"gaussian64": (4, 16), "gmm": NFES}

Denoiser = Callable[..., Tensor]


# ---------------------------------------------------------------- problems


@dataclass
class Problem:
    name: str
    title: str
    denoiser: Denoiser
    draw: Callable[[int, torch.Generator], Tensor]  # n true samples [n, d]
    mean: Tensor
    cov: Tensor
    mixture: GaussianMixture | None = None

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def sigma_data(self) -> float:
        """RMS standard deviation sqrt(tr Cov / d): the scale that the lazy schedules assume."""
        return math.sqrt(float(torch.trace(self.cov)) / self.dim)

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("frechet", "sliced_w2", "mode_tv") if self.mixture is not None else ("frechet", "sliced_w2")

    @property
    def main_metric(self) -> str:
        # A Gaussian's exact law is fixed by its moments; a mixture's is not, so it is scored on the samples.
        return "sliced_w2" if self.mixture is not None else "frechet"


def gaussian_problem() -> Problem:
    gaussian = Gaussian.benchmark(dim=64, seed=0)
    return Problem(
        "gaussian64",
        "64-d Gaussian, full covariance, stds log-spaced in [0.05, 1] (Gaussian.benchmark(dim=64))",
        gaussian.denoiser,
        lambda n, generator: gaussian.sample(n, generator=generator),
        gaussian.mean(),
        gaussian.covariance(),
    )


def gmm_problem() -> Problem:
    mixture = GaussianMixture.benchmark(dim=8, modes=32, std=0.05, seed=0)
    return Problem(
        "gmm",
        "8-d mixture of 32 equal modes, std 0.05, on the unit sphere "
        "(GaussianMixture.benchmark(dim=8, modes=32, std=0.05))",
        mixture.denoiser,
        lambda n, generator: mixture.sample(n, generator=generator)[0],
        mixture.mean(),
        mixture.covariance(),
        mixture,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- scores


def scores(samples: Tensor, problem: Problem, reference: Tensor) -> dict[str, float]:
    """The problem's distances from samples to the truth (NaN for samples that diverged)."""
    if not bool(torch.isfinite(samples).all()):
        return {metric: math.nan for metric in problem.metrics}
    result = {
        "frechet": float(frechet_to_truth(samples, problem.mean, problem.cov)),
        "sliced_w2": float(sliced_wasserstein2(samples, reference, generator=seeded(PROJECTION_SEED))),
    }
    if problem.mixture is not None:
        result["mode_tv"] = float(mode_mass_error(samples, problem.mixture))
    return result


def noise_floor(problem: Problem, reference: Tensor) -> dict[str, list[float]]:
    """Scores of fresh true samples of the reference's size, one per floor seed."""
    runs = [scores(problem.draw(len(reference), seeded(seed)), problem, reference) for seed in FLOOR_SEEDS]
    return {metric: [run[metric] for run in runs] for metric in problem.metrics}


# ---------------------------------------------------------------- solvers: one Entry per benchmarked row


@dataclass
class Entry:
    """A benchmarked sampler: ``plan(budget)``, its setting for an NFE budget (None: cannot fit); ``run`` samples."""

    name: str
    family: str  # fewstep, k-diffusion or diffusers
    plan: Callable[[int], int | None]
    run: Callable[[Denoiser, Tensor, int], Tensor]  # (denoiser, unit noise [n, d], plan) -> samples
    note: str = ""
    nfes: tuple[int, ...] | None = None  # budgets it runs at (None: all)


def fewstep_entries(sigma_data: float) -> list[Entry]:
    """Every solver in SOLVERS at its defaults (lazy ones told sigma_data; edm_sde with s_noise=1), and DDIM eta=1."""
    entries = [fewstep_entry(name, solver_options(name, sigma_data)) for name in SOLVERS]
    if "ddim" in SOLVERS:
        entries.append(fewstep_entry("ddim", {"eta": 1.0}, label="ddim(eta=1)"))
    return entries


def solver_options(name: str, sigma_data: float) -> dict:
    options = {}
    if "sigma_data" in inspect.signature(SOLVERS[name].fn).parameters:
        options["sigma_data"] = sigma_data
    if name == "edm_sde":
        options["s_noise"] = 1.0  # EDM's 1.003 compensates a network's bias; an exact denoiser has none
    return options


def fewstep_entry(name: str, options: dict, label: str | None = None) -> Entry:
    def run(denoiser: Denoiser, noise: Tensor, budget: int) -> Tensor:
        return sample(denoiser, noise, name, budget, SIGMA_MIN, SIGMA_MAX, rho=RHO, **options)

    note = ", ".join(f"{key}={value:.4g}" for key, value in options.items())
    return Entry(
        label or name, "fewstep", lambda budget: budget if budget >= SOLVERS[name].min_nfe else None, run, note
    )


class StepBudget:
    """The most steps whose counted NFE fits a budget, for a sampler that takes a step count.

    Counts are probed once per step count on a one-row batch with a zero denoiser, so they are
    measured, not assumed. A step count at which the sampler raises is skipped and remembered.
    """

    def __init__(self, run_steps: Callable[[Denoiser, Tensor, int], Tensor], dim: int, min_steps: int = 1):
        self.run_steps, self.dim, self.min_steps = run_steps, dim, min_steps
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
                self.counted[steps] = None
                self.failures[steps] = f"{type(error).__name__}: {error}"
            finally:
                torch.random.set_rng_state(state)
        return self.counted[steps]

    def __call__(self, budget: int) -> int | None:
        best = None
        for steps in range(self.min_steps, budget + 1):  # every sampler makes at least one call per step
            nfe = self.nfe(steps)
            if nfe is not None and nfe > budget:
                break
            if nfe is not None:
                best = steps
        return best


def peer_entry(name: str, family: str, run_steps, dim: int, note: str = "", min_steps: int = 1, nfes=None) -> Entry:
    return Entry(name, family, StepBudget(run_steps, dim, min_steps), run_steps, note, nfes)


# k-diffusion: the sampler functions take the denoiser as it is (they call model(x, sigma * s_in)).
KDIFF_SAMPLERS = (
    "sample_euler",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler_ancestral",
)
KDIFF_SDE = {"sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler_ancestral"}
# Of these, only dpmpp_sde asks for noise over overlapping intervals ([t, t_mid] then [t, t_next]), where a
# Brownian tree correlates the draws. The others ask once per disjoint step, where the tree's normalised
# increments are independent standard normals: the same law as fresh noise, so one run of them suffices.
KDIFF_NEEDS_BROWNIAN = {"sample_dpmpp_sde"}


def kdiff_entries(kdiff, problem: Problem) -> list[Entry]:
    entries = []
    for function in KDIFF_SAMPLERS:
        label = "kd." + function.removeprefix("sample_")
        if function not in KDIFF_SDE:
            entries.append(peer_entry(label, "k-diffusion", kdiff_runner(kdiff, function, None), problem.dim))
            continue
        entries.append(
            peer_entry(
                label + " (fresh)",
                "k-diffusion",
                kdiff_runner(kdiff, function, "fresh"),
                problem.dim,
                "noise_sampler=default_noise_sampler(x)",
            )
        )
        if function in KDIFF_NEEDS_BROWNIAN:
            entries.append(
                peer_entry(
                    label + " (brownian)",
                    "k-diffusion",
                    kdiff_runner(kdiff, function, "brownian"),
                    problem.dim,
                    "its default BrownianTreeNoiseSampler",
                    nfes=BROWNIAN_NFES[problem.name],
                )
            )
    return entries


def kdiff_runner(kdiff, function: str, noise_kind: str | None):
    sampler = getattr(kdiff.sampling, function)

    def run(denoiser: Denoiser, noise: Tensor, steps: int) -> Tensor:
        sigmas = kdiff.sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, rho=RHO).to(noise.dtype)
        x = noise * sigmas[0]
        options = {}
        if noise_kind == "fresh":
            options["noise_sampler"] = kdiff.sampling.default_noise_sampler(x)
        elif noise_kind == "brownian":
            options["noise_sampler"] = kdiff.sampling.BrownianTreeNoiseSampler(
                x, sigmas[sigmas > 0].min(), sigmas.max()
            )
        return sampler(denoiser, x, sigmas, disable=True, **options)

    return run


# diffusers: schedulers expect a network's output, so hand loops convert the denoiser into what each expects.


def diffusers_entries(diffusers, problem: Problem) -> list[Entry]:
    sigma_data = problem.sigma_data

    def edm_scheduler():
        return diffusers.EDMDPMSolverMultistepScheduler(
            sigma_min=SIGMA_MIN,
            sigma_max=SIGMA_MAX,
            sigma_data=sigma_data,
            rho=RHO,
            algorithm_type="sde-dpmsolver++",
            solver_order=2,
            prediction_type="epsilon",
        )

    def vp_scheduler(trained_betas=None):
        return lambda: diffusers.DPMSolverSDEScheduler(
            trained_betas=trained_betas, use_karras_sigmas=True, prediction_type="epsilon"
        )

    matched = vp_scheduler(betas_spanning(SIGMA_MIN, SIGMA_MAX))
    matched_range, default_range = vp_sigma_range(matched()), vp_sigma_range(vp_scheduler()())
    # set_timesteps(1) collapses its Karras grid onto the smallest sigma, so one step is no sampler.
    vp_min_steps = 2
    return [
        peer_entry(
            "df.EDMDPMSolverMultistep(sde-dpmsolver++)",
            "diffusers",
            lambda d, noise, steps: run_edm_scheduler(edm_scheduler(), d, noise, steps),
            problem.dim,
            f"solver_order=2, sigma_data={sigma_data:.4g}, epsilon output F = (D - c_skip x) / c_out",
        ),
        peer_entry(
            "df.DPMSolverSDE (fresh)",
            "diffusers",
            lambda d, noise, steps: run_vp_scheduler(matched(), d, noise, steps, fresh_noise=True),
            problem.dim,
            f"betas matched to sigma in [{matched_range[0]:.4g}, {matched_range[1]:.4g}]; fresh normals as noise",
            vp_min_steps,
        ),
        peer_entry(
            "df.DPMSolverSDE (brownian)",
            "diffusers",
            lambda d, noise, steps: run_vp_scheduler(matched(), d, noise, steps, fresh_noise=False),
            problem.dim,
            f"betas matched to sigma in [{matched_range[0]:.4g}, {matched_range[1]:.4g}]; its BrownianTree noise",
            vp_min_steps,
            nfes=BROWNIAN_NFES[problem.name],
        ),
        peer_entry(
            "df.DPMSolverSDE (default betas, fresh)",
            "diffusers",
            lambda d, noise, steps: run_vp_scheduler(vp_scheduler()(), d, noise, steps, fresh_noise=True),
            problem.dim,
            f"default betas: sigma in [{default_range[0]:.4g}, {default_range[1]:.4g}]; fresh normals as noise",
            vp_min_steps,
        ),
    ]


def betas_spanning(sigma_min: float, sigma_max: float, train_steps: int = 1000) -> np.ndarray:
    """Betas whose VP noise levels sqrt((1 - alpha_bar) / alpha_bar) run log-uniformly from sigma_min to sigma_max."""
    sigmas = np.geomspace(sigma_min, sigma_max, train_steps)
    alphas_cumprod = 1 / (1 + sigmas**2)
    return 1 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])


def vp_sigma_range(scheduler) -> tuple[float, float]:
    """The sigma range a DPMSolverSDEScheduler ends up sampling over (after its float32 alpha_bar)."""
    scheduler.set_timesteps(8)
    positive = scheduler.sigmas[scheduler.sigmas > 0]
    return float(positive.min()), float(positive.max())


def run_edm_scheduler(scheduler, denoiser: Denoiser, noise: Tensor, steps: int) -> Tensor:
    scheduler.set_timesteps(steps)
    # EDM's prior is sigma_max * n; the scheduler's init_noise_sigma, sqrt(sigma_max^2 + 1), is a VP leftover.
    x = noise * scheduler.sigmas[0].item()
    for t in scheduler.timesteps:
        output = edm_epsilon_output(denoiser, scheduler, scheduler.scale_model_input(x, t))
        x = scheduler.step(output, t, x).prev_sample
    return x


def edm_epsilon_output(denoiser: Denoiser, scheduler, model_input: Tensor) -> Tensor:
    """The output F of an EDM-preconditioned epsilon network with D = c_skip x + c_out F, given c_in x.

    The noise level is the scheduler's own float32 sigma, and c_in, c_skip, c_out are computed in
    float32 as the scheduler computes them, so that undoing its scaling is exact to float64 rounding
    (verify_adapters checks the round trip, and the sigma that the timestep c_noise = ln(sigma) / 4 encodes).
    """
    sigma = scheduler.sigmas[scheduler.step_index]
    sigma_data = scheduler.config.sigma_data
    total = (sigma**2 + sigma_data**2) ** 0.5
    x = model_input / (1 / total)  # undo scale_model_input, which multiplies by c_in = 1 / total
    c_skip, c_out = sigma_data**2 / (sigma**2 + sigma_data**2), sigma * sigma_data / total
    denoised = denoiser(x, sigma.to(x.dtype).expand(x.shape[0]))
    return (denoised - c_skip * x) / c_out


def run_vp_scheduler(scheduler, denoiser: Denoiser, noise: Tensor, steps: int, fresh_noise: bool) -> Tensor:
    scheduler.set_timesteps(steps)
    if fresh_noise:
        # step() builds its Brownian tree only while noise_sampler is None; set_timesteps resets it.
        scheduler.noise_sampler = lambda sigma, sigma_next: torch.randn_like(noise)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = vp_epsilon_output(denoiser, scheduler, scheduler.scale_model_input(x, t))
        x = scheduler.step(output, t, x).prev_sample
    return x


def vp_sigma(scheduler) -> Tensor:
    """The sigma DPMSolverSDEScheduler evaluates at now: the step's start, or the midpoint on its second stage."""
    return scheduler.sigmas[scheduler.step_index] if scheduler.state_in_first_order else scheduler.mid_point_sigma


def vp_epsilon_output(denoiser: Denoiser, scheduler, model_input: Tensor) -> Tensor:
    """The epsilon a VP network predicts, eps = (x - D(x, sigma)) / sigma, given x / sqrt(sigma^2 + 1).

    sqrt(sigma^2 + 1) is computed in float32 as scale_model_input computes it, so x comes back exactly.
    """
    sigma = vp_sigma(scheduler)
    x = model_input * ((sigma**2 + 1) ** 0.5)
    return (x - denoiser(x, sigma.to(x.dtype).expand(x.shape[0]))) / sigma


# ---------------------------------------------------------------- running


def import_peer(module: str):
    """The peer library, or None with one line saying why."""
    try:
        with warnings.catch_warnings():  # clip-anytorch warns that pkg_resources is deprecated
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as error:
        print(f"bench_samplers: {module} is not importable ({error}); benchmarking without it", flush=True)
        return None


def all_entries(problem: Problem, kdiff, diffusers) -> list[Entry]:
    entries = fewstep_entries(problem.sigma_data)
    if kdiff is not None:
        entries += kdiff_entries(kdiff, problem)
    if diffusers is not None:
        entries += diffusers_entries(diffusers, problem)
    return entries


def run_once(entry: Entry, problem: Problem, noise: Tensor, setting: int) -> tuple[Tensor, int, float]:
    """Samples, counted NFE and wall seconds of one run, its SDE noise seeded."""
    counter = CountingDenoiser(problem.denoiser)
    torch.manual_seed(SDE_SEED)
    start = time.perf_counter()
    samples = entry.run(counter, noise, setting)
    return samples, counter.nfe, time.perf_counter() - start


def benchmark_problem(problem: Problem, entries: list[Entry], n: int, nfes: tuple[int, ...]) -> dict:
    noise = torch.randn(n, problem.dim, dtype=torch.float64, generator=seeded(NOISE_SEED))
    reference = problem.draw(n, seeded(REFERENCE_SEED))
    floor = noise_floor(problem, reference)
    print(
        f"\n{problem.name}: n={n}, floor " + ", ".join(f"{k}={statistics.mean(v):.3g}" for k, v in floor.items()),
        flush=True,
    )
    rows = []
    for entry in entries:
        for budget in nfes:
            setting = entry.plan(budget) if entry.nfes is None or budget in entry.nfes else None
            if setting is None:
                continue
            samples, nfe, seconds = run_once(entry, problem, noise, setting)
            row = {
                "problem": problem.name,
                "solver": entry.name,
                "family": entry.family,
                "nfe_budget": budget,
                "nfe": nfe,
                "setting": setting,
                "wall_s": seconds,
                **scores(samples, problem, reference),
            }
            rows.append(row)
            print(
                f"  {entry.name:42s} budget {budget:3d} nfe {nfe:3d} {seconds:7.2f}s  "
                + " ".join(f"{m}={row[m]:.3g}" for m in problem.metrics),
                flush=True,
            )
    return {
        "name": problem.name,
        "title": problem.title,
        "n": n,
        "sigma_data": problem.sigma_data,
        "metrics": list(problem.metrics),
        "main_metric": problem.main_metric,
        "floor": floor,
        "rows": rows,
        "notes": {entry.name: entry.note for entry in entries if entry.note},
        "failures": {
            entry.name: {str(k): v for k, v in entry.plan.failures.items()}
            for entry in entries
            if getattr(entry.plan, "failures", None)
        },
        "families": {entry.name: entry.family for entry in entries},
    }


# ---------------------------------------------------------------- adapter verification


def verify_adapters(diffusers, kdiff, problem: Problem, entries: list[Entry], n: int, budget: int) -> list[dict]:
    """Each diffusers adapter: its conversion round trip, its k-diffusion twin, and its error at a high NFE.

    The round trip feeds the adapter's output back through the scheduler's own x0 formula; the twin
    runs k-diffusion's implementation of the same method on the scheduler's own sigma grid with the same
    noise (twins should agree to float32-sigma rounding); the high-NFE error is compared with the floor.
    """
    checks = []
    reference = problem.draw(n, seeded(REFERENCE_SEED))
    floor = statistics.mean(noise_floor(problem, reference)["frechet"])
    noise = torch.randn(n, problem.dim, dtype=torch.float64, generator=seeded(NOISE_SEED))
    for entry in entries:
        if entry.family != "diffusers":
            continue
        setting = entry.plan(budget)
        samples, nfe, seconds = run_once(entry, problem, noise, setting)
        frechet = scores(samples, problem, reference)["frechet"]
        checks.append(
            {
                "solver": entry.name,
                "n": n,
                "nfe": nfe,
                "frechet": frechet,
                "floor": floor,
                "ratio": frechet / floor,
                "round_trip": round_trip_error(diffusers, entry, problem),
                "twin": twin_difference(diffusers, kdiff, entry, problem),
                "wall_s": seconds,
            }
        )
        print(
            f"  verify {entry.name:40s} nfe {nfe}: frechet {frechet:.3g} = {frechet / floor:.2f} x floor; "
            f"round trip {checks[-1]['round_trip']}; twin {checks[-1]['twin']}",
            flush=True,
        )
    return checks


def round_trip_error(diffusers, entry: Entry, problem: Problem) -> str:
    """Largest |x0 the scheduler reconstructs from the adapter's output - D(x, sigma)| on one step."""
    x = problem.draw(64, seeded(0)) + 5 * torch.randn(64, problem.dim, dtype=torch.float64, generator=seeded(1))
    if entry.name.startswith("df.EDM"):
        scheduler = diffusers.EDMDPMSolverMultistepScheduler(
            sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=problem.sigma_data, prediction_type="epsilon"
        )
        scheduler.set_timesteps(10)
        t = scheduler.timesteps[3]
        model_input = scheduler.scale_model_input(x, t)  # finds step 3 from the timestep
        sigma = scheduler.sigmas[scheduler.step_index]
        x0 = scheduler.convert_model_output(edm_epsilon_output(problem.denoiser, scheduler, model_input), x)
        timestep_error = abs(math.exp(4 * float(t)) / float(sigma) - 1)
        error = float((x0 - problem.denoiser(x, sigma.to(x.dtype).expand(64))).abs().max())
        return f"x0 error {error:.1e}; sigma from timestep: rel. error {timestep_error:.1e}"
    scheduler = diffusers.DPMSolverSDEScheduler(use_karras_sigmas=True, prediction_type="epsilon")
    scheduler.set_timesteps(10)
    scheduler.noise_sampler = lambda sigma, sigma_next: torch.zeros_like(x)
    errors = []
    for t in scheduler.timesteps[:2]:  # a first stage, then a midpoint stage
        output = vp_epsilon_output(problem.denoiser, scheduler, scheduler.scale_model_input(x, t))
        sigma = vp_sigma(scheduler)
        x0 = scheduler.step(output, t, x).pred_original_sample
        errors.append(float((x0 - problem.denoiser(x, sigma.to(x.dtype).expand(64))).abs().max()))
    return f"x0 error {max(errors):.1e}"


def twin_difference(diffusers, kdiff, entry: Entry, problem: Problem, steps: int = 12, n: int = 512) -> str:
    """Max |diffusers - k-diffusion| / max |k-diffusion| over n samples, same grid and noise; '-' without a twin."""
    twins = {"df.EDMDPMSolverMultistep": "sample_dpmpp_2m_sde", "df.DPMSolverSDE": "sample_dpmpp_sde"}
    twin = next((fn for prefix, fn in twins.items() if entry.name.startswith(prefix)), None)
    if kdiff is None or twin is None or "brownian" in entry.name:
        return "-"  # Brownian trees of the two libraries draw different paths from the same seed
    noise = torch.randn(n, problem.dim, dtype=torch.float64, generator=seeded(NOISE_SEED))
    torch.manual_seed(SDE_SEED)
    ours = entry.run(problem.denoiser, noise, steps)
    grid = scheduler_grid(diffusers, entry, problem, steps)
    torch.manual_seed(SDE_SEED)
    theirs = getattr(kdiff.sampling, twin)(
        problem.denoiser, noise * grid[0], grid, disable=True, noise_sampler=kdiff.sampling.default_noise_sampler(noise)
    )
    return f"{twin}: {float((ours - theirs).abs().max() / theirs.abs().max()):.1e}"


def scheduler_grid(diffusers, entry: Entry, problem: Problem, steps: int) -> Tensor:
    """The distinct noise levels a diffusers entry steps through, as float64, ending at 0."""
    if entry.name.startswith("df.EDM"):
        scheduler = diffusers.EDMDPMSolverMultistepScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
    else:
        betas = None if "default betas" in entry.name else betas_spanning(SIGMA_MIN, SIGMA_MAX)
        scheduler = diffusers.DPMSolverSDEScheduler(trained_betas=betas, use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    return torch.unique_consecutive(scheduler.sigmas).to(torch.float64)


# ---------------------------------------------------------------- timing: fewstep against its k-diffusion twin

# (fewstep solver, its options, k-diffusion function, how exact the match is)
TIMING_PAIRS = (
    ("euler", {}, "sample_euler", "same method; kd draws (unused) churn noise every step"),
    ("heun", {}, "sample_heun", "same method; kd draws (unused) churn noise every step"),
    ("dpmpp_2m", {}, "sample_dpmpp_2m", "same method"),
    ("ddim", {"eta": 1.0}, "sample_euler_ancestral", "same method (ancestral step)"),
    ("seeds2", {}, "sample_dpmpp_sde", "same stages (r = 1/2); noise chained vs fresh per stage"),
    ("seeds1", {}, "sample_dpmpp_2m_sde", "not exact: 2M-SDE adds a multistep correction to SEEDS-1's step"),
    ("seeds3", {}, "sample_dpmpp_3m_sde", "not exact: 3 stages per step vs 3rd-order multistep, 1 NFE per step"),
)


class MLPDenoiser(nn.Module):
    """A fixed random MLP (64 -> 512 -> 512 -> 64, SiLU) behind EDM preconditioning: a denoiser of realistic cost."""

    def __init__(self, dim: int, width: int = 512, sigma_data: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.sigma_data = sigma_data
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    @torch.no_grad()
    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1)
        total = (sigma**2 + self.sigma_data**2).sqrt()
        features = torch.cat([x / total, sigma.log().expand(x.shape[0], 1) / 4], dim=1)
        return self.sigma_data**2 / total**2 * x + sigma * self.sigma_data / total * self.net(features)


def time_pairs(kdiff, batch: int, budget: int, repeats: int) -> list[dict]:
    """Per-NFE wall time of each fewstep solver and its k-diffusion twin, alternating, median of repeats (float32)."""
    dim = 64
    denoisers = {
        "exact Gaussian (two 64x64 matmuls)": Gaussian.benchmark(dim=dim).to(torch.float32).denoiser,
        "MLP 65-512-512-64": MLPDenoiser(dim).to(torch.float32),
    }
    noise = torch.randn(batch, dim, generator=seeded(NOISE_SEED))
    rows = []
    for label, denoiser in denoisers.items():
        for name, options, function, match in TIMING_PAIRS:
            if name not in SOLVERS:
                print(f"  timing: {name} is not in SOLVERS yet; skipped", flush=True)
                continue
            ours = fewstep_entry(name, options)
            theirs = peer_entry(
                function, "k-diffusion", kdiff_runner(kdiff, function, "fresh" if function in KDIFF_SDE else None), dim
            )
            times = {"fewstep": [], "k-diffusion": []}
            nfes = {}
            for _ in range(repeats + 1):  # the first round warms up and is dropped
                for side, entry in (("fewstep", ours), ("k-diffusion", theirs)):
                    counter = CountingDenoiser(denoiser)
                    setting = entry.plan(budget)
                    start = time.perf_counter()
                    entry.run(counter, noise, setting)
                    times[side].append((time.perf_counter() - start) / counter.nfe)
                    nfes[side] = counter.nfe
            per_nfe = {side: statistics.median(values[1:]) for side, values in times.items()}
            rows.append(
                {
                    "denoiser": label,
                    "fewstep": name,
                    "k_diffusion": function,
                    "match": match,
                    "nfe_fewstep": nfes["fewstep"],
                    "nfe_k_diffusion": nfes["k-diffusion"],
                    "ms_per_nfe_fewstep": 1e3 * per_nfe["fewstep"],
                    "ms_per_nfe_k_diffusion": 1e3 * per_nfe["k-diffusion"],
                    "ratio": per_nfe["fewstep"] / per_nfe["k-diffusion"],
                }
            )
            print(f"  timing {label:36s} {name:9s} vs {function:24s} {rows[-1]['ratio']:.3f}", flush=True)
    return rows


# ---------------------------------------------------------------- reports


def environment(args: argparse.Namespace, command: str) -> dict:
    return {
        "command": command,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "torch_threads": torch.get_num_threads(),
        "versions": {
            pkg: package_version(pkg)
            for pkg in ("torch", "numpy", "k-diffusion", "diffusers", "torchsde", "matplotlib")
        },
        "python": platform.python_version(),
        "quick": args.quick,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


METRIC_TITLES = {
    "frechet": "Frechet distance to the exact moments",
    "sliced_w2": "sliced W2^2 to a fresh true sample",
    "mode_tv": "mode-mass total variation",
}


def strict_json(value):
    """NaN (a diverged run) as null, so that the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


def metric_table(result: dict, metric: str, nfes: tuple[int, ...]) -> list[str]:
    cells = {(row["solver"], row["nfe_budget"]): row[metric] for row in result["rows"]}
    solvers = list(dict.fromkeys(row["solver"] for row in result["rows"]))
    floor = result["floor"][metric]
    lines = ["| solver | " + " | ".join(str(nfe) for nfe in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for solver in solvers:
        lines.append(
            f"| {solver} | "
            + " | ".join(fmt(cells[solver, nfe]) if (solver, nfe) in cells else "-" for nfe in nfes)
            + " |"
        )
    lines.append(
        f"| *noise floor* | {fmt(statistics.mean(floor))} (fresh true samples: "
        + ", ".join(fmt(v) for v in floor)
        + ")"
        + " |" * len(nfes)
    )
    return lines


def nfe_table(results: list[dict], nfes: tuple[int, ...]) -> list[str]:
    """Counted NFE where it differs from the budget (the same on every problem)."""
    counted = {}
    for result in results:
        for row in result["rows"]:
            counted.setdefault(row["solver"], {})[row["nfe_budget"]] = row["nfe"]
    lines = ["| solver | " + " | ".join(str(nfe) for nfe in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for solver, by_budget in counted.items():
        if any(nfe != budget for budget, nfe in by_budget.items()):
            lines.append(f"| {solver} | " + " | ".join(str(by_budget.get(nfe, "-")) for nfe in nfes) + " |")
    return lines


def markdown(
    env: dict, results: list[dict], checks: list[dict], timing: list[dict], nfes: tuple[int, ...], images: dict
) -> str:
    lines = header_section(env)
    for result in results:
        lines += problem_section(result, nfes, images[result["name"]])
    lines += ["## NFE counted where it differs from the budget", ""] + nfe_table(results, nfes) + [""]
    lines += failures_section(results) + verification_section(checks) + timing_section(timing)
    return "\n".join(lines)


def header_section(env: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return [
        "# Sampler benchmark: fewstep against k-diffusion and diffusers on analytic problems",
        "",
        f"`{env['command']}`, {env['date']}, {env['machine']} (torch threads {env['torch_threads']}), "
        f"Python {env['python']}, {versions}; {env['wall_minutes']:.1f} min wall clock.",
        "",
        "Every number below comes from that run (`bench_samplers.json`, beside this file, holds the raw rows). "
        f"All samplers start from the same noise (seed {NOISE_SEED}) on the EDM Karras grid "
        f"(sigma {SIGMA_MIN} to {SIGMA_MAX}, rho {RHO:g}) unless a note says otherwise, call the same exact float64 "
        "denoiser, and run with the most steps whose *counted* NFE fits each budget; SDE noise comes from torch's "
        f"global generator seeded with {SDE_SEED} before each run. A `-` marks a budget a sampler cannot fit (or, "
        "for Brownian-tree rows, a budget not run). Rows: fewstep's solvers (names as in "
        "`fewstep.samplers.SOLVERS`), `kd.` k-diffusion, `df.` diffusers.",
        "",
        "Noise floor: the same scores for fresh true samples of the same size (three seeds; their mean is shown "
        "and plotted as a horizontal line). A sampler cannot be told apart from exact below it.",
        "",
    ]


def problem_section(result: dict, nfes: tuple[int, ...], image: str) -> list[str]:
    lines = [
        f"## {result['name']}: {result['title']}",
        "",
        f"n = {result['n']} samples; data RMS std (sigma_data for the lazy solvers and the EDM scheduler) "
        f"{result['sigma_data']:.4g}.",
        "",
        f"![{result['name']}]({image})",
        "",
    ]
    for metric in [result["main_metric"]] + [m for m in result["metrics"] if m != result["main_metric"]]:
        lines += [f"### {METRIC_TITLES[metric]}" + (" (main)" if metric == result["main_metric"] else ""), ""]
        lines += metric_table(result, metric, nfes) + [""]
    lines += [f"### Settings on {result['name']}", ""]
    return lines + [f"- `{name}`: {note}" for name, note in result["notes"].items()] + [""]


def failures_section(results: list[dict]) -> list[str]:
    failures = {}
    for result in results:
        failures.update(result["failures"])
    if not failures:
        return []
    lines = ["## Step counts at which a peer raised (skipped)", ""]
    for name, by_steps in failures.items():
        lines += [f"- `{name}` at {steps} step(s): `{message}`" for steps, message in by_steps.items()]
    return lines + [""]


def verification_section(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    lines = [
        "## Adapter verification (diffusers hand loops, on gaussian64)",
        "",
        "Round trip: the largest error of the x0 that the scheduler rebuilds from the adapter's output, against "
        "the denoiser's. Twin: largest difference from k-diffusion's implementation of the same method on the "
        "scheduler's own sigma grid with the same noise (12 steps, 512 samples), relative to the samples' scale. "
        "Convergence: the Frechet distance at a high NFE against the floor of a fresh sample of the same size.",
        "",
        "| adapter | round trip | twin | n | NFE | Frechet | floor | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c['solver']} | {c['round_trip']} | {c['twin']} | {c['n']} | {c['nfe']} | {fmt(c['frechet'])} "
            f"| {fmt(c['floor'])} | {c['ratio']:.2f} |"
        )
    return lines + [""]


def timing_section(timing: list[dict]) -> list[str]:
    if not timing:
        return []
    lines = [
        "## Solver overhead: fewstep against its k-diffusion twin",
        "",
        "Per-NFE wall time, float32, one run, the two sides alternating, median of the repeats after a "
        "warm-up round; both sides on the same denoiser and batch (k-diffusion's SDE samplers with fresh noise, "
        "as fewstep's). Ratio = fewstep / k-diffusion.",
        "",
        "| denoiser | fewstep | k-diffusion | match | NFE (fewstep / kd) | ms/NFE fewstep | ms/NFE kd | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in timing:
        lines.append(
            f"| {t['denoiser']} | {t['fewstep']} | {t['k_diffusion']} | {t['match']} "
            f"| {t['nfe_fewstep']} / {t['nfe_k_diffusion']} | {t['ms_per_nfe_fewstep']:.3g} "
            f"| {t['ms_per_nfe_k_diffusion']:.3g} | {t['ratio']:.3f} |"
        )
    return lines + [""]


def solver_colors(solvers: list[str], families: dict[str, str], plt) -> dict[str, tuple]:
    """Distinct colours within each family (fewstep: tab20, peers: tab20b): no two lines of one style match."""
    palettes = {"fewstep": plt.get_cmap("tab20"), "peer": plt.get_cmap("tab20b")}
    counts = {"fewstep": 0, "peer": 0}
    colors = {}
    for solver in solvers:
        family = "fewstep" if families[solver] == "fewstep" else "peer"
        colors[solver] = palettes[family](counts[family] % 20)
        counts[family] += 1
    return colors


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 3, 5.5), squeeze=False)
    solvers = list(dict.fromkeys(row["solver"] for row in result["rows"]))
    color = solver_colors(solvers, result["families"], plt)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for solver in solvers:
            rows = [r for r in result["rows"] if r["solver"] == solver and math.isfinite(r[metric]) and r[metric] > 0]
            if not rows:
                continue
            style = "-" if result["families"][solver] == "fewstep" else "--"
            ax.plot(
                [r["nfe"] for r in rows],
                [r[metric] for r in rows],
                style,
                marker="o",
                markersize=3,
                color=color[solver],
                label=solver,
            )
        ax.axhline(statistics.mean(result["floor"][metric]), color="black", linestyle=":", label="noise floor")
        ax.set(xscale="log", yscale="log", xlabel="NFE (counted)", title=METRIC_TITLES[metric])
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64], labels=["1", "2", "4", "8", "16", "32", "64"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"{result['name']}: n = {result['n']} (fewstep solid, peers dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: three budgets, small n, short timing")
    parser.add_argument(
        "--n", type=int, default=None, help=f"samples for gaussian64 (default {FULL.n}; quick {QUICK.n})"
    )
    parser.add_argument(
        "--n-gmm", type=int, default=None, help=f"samples for gmm (default {FULL.n_gmm}; quick {QUICK.n_gmm})"
    )
    parser.add_argument(
        "--nfes",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=None,
        help="comma-separated NFE budgets (default 1,2,3,4,6,8,12,16,24,32,48,64; quick 2,8,32)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the markdown, JSON and images go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python tools/bench_samplers.py" + "".join(f" {a}" for a in argv)
    settings = QUICK if args.quick else FULL
    nfes = args.nfes or settings.nfes
    kdiff, diffusers = import_peer("k_diffusion"), import_peer("diffusers")
    started = time.perf_counter()

    results, checks = [], []
    for problem, size in ((gaussian_problem(), args.n or settings.n), (gmm_problem(), args.n_gmm or settings.n_gmm)):
        entries = all_entries(problem, kdiff, diffusers)
        results.append(benchmark_problem(problem, entries, size, nfes))
        if problem.name == "gaussian64" and diffusers is not None:
            checks = verify_adapters(
                diffusers, kdiff, problem, entries, min(size, settings.verify_n), settings.verify_budget
            )
    timing = time_pairs(kdiff, settings.timing_batch, budget=16, repeats=settings.timing_repeats) if kdiff else []

    images = {r["name"]: f"images/bench_samplers_{r['name']}.png" for r in results}
    for result in results:
        plot(result, args.out / images[result["name"]])
    env = environment(args, command)
    env["wall_minutes"] = (time.perf_counter() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"environment": env, "problems": results, "verification": checks, "timing": timing}
    (args.out / "bench_samplers.json").write_text(json.dumps(strict_json(raw), indent=1, allow_nan=False))
    (args.out / "bench_samplers.md").write_text(markdown(env, results, checks, timing, nfes, images))
    print(
        f"\nwrote {args.out / 'bench_samplers.md'}, bench_samplers.json and {len(images)} images "
        f"in {env['wall_minutes']:.1f} min",
        flush=True,
    )


if __name__ == "__main__":
    main()
