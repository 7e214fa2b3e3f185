"""Issue 17's sampler claims on a 16-d anisotropic Gaussian mixture: SEEDS against k-diffusion, and the lazy solvers.

    pip install --no-deps "k-diffusion==0.1.1.post1" "dctorch==0.1.2" torchsde torchdiffeq trampoline
    OMP_NUM_THREADS=1 python tools/bench_mixture.py [--quick] [--n N] [--out docs] [--from-json FILE]

About 10 minutes on one thread of a busy 2-core CPU at the default n = 10,000 (k-diffusion's Brownian tree
takes a third of it); --quick (n = 1,000, two budgets) is a smoke test of under a minute. --from-json
rewrites the markdown tables from a results file without rerunning.

The problem (float64, CPU, fixed seeds, exact denoiser ``GaussianMixture.denoiser``): 8 equal-weight modes in
16 dimensions, means N(0, I) (seed 0), per-mode diagonal standard deviations log-uniform in [0.05, 1] (the same
generator), sigma in [0.002, 80], EDM's Karras grid (rho = 7) unless a row says otherwise. Score: squared
sliced W2 (``fewstep.metrics.sliced_wasserstein2``'s estimator, 256 fixed directions) between n samples and n
fresh true samples; the noise floor is the same score of n other true samples. Every sampler starts from the
same unit noise; its SDE noise comes from torch's global generator seeded alike; NFE is counted.

Only k-diffusion's ``sampling`` module is imported (its package ``__init__`` pulls in scikit-image and more,
which the samplers do not need). Without it, the peer rows are left out with one line saying so.

Sections: (A) the issue's rows; (B) the SEEDS ablations: time grid, stage placement and weights, the
coupling of a step's stage noise with its final noise, the noise-prediction form, eta, and the NFE budget;
(C) the lazy solvers against DPM-Solver++(2M) at 1-24 NFE. Writes <out>/bench_mixture.md and .json, and
<out>/images/bench_mixture.png when matplotlib is there.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fewstep.data import GaussianMixture
from fewstep.metrics.analytic import random_directions
from fewstep.samplers import SOLVERS, CountingDenoiser, sample
from fewstep.samplers.grids import GRIDS
from fewstep.samplers.solvers import _phi2, _sigma

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
MIXTURE_SEED, NOISE_SEED, SDE_SEED, REFERENCE_SEED, PROJECTION_SEED, FLOOR_SEEDS = 0, 1, 2, 3, 4, (10, 11, 12)
SEEDS_NFES = (4, 7, 10, 11, 12, 16, 23, 24, 46)
LAZY_NFES = (1, 2, 3, 4, 6, 8, 12, 16, 24)
Run = Callable[[Callable, Tensor, int], Tensor]  # (counted denoiser, unit noise [n, d], NFE budget) -> samples


# ---------------------------------------------------------------- problem and score


def mixture() -> GaussianMixture:
    generator = torch.Generator().manual_seed(MIXTURE_SEED)
    means = torch.randn(8, 16, dtype=torch.float64, generator=generator)
    log_stds = torch.empty(8, 16, dtype=torch.float64).uniform_(math.log(0.05), math.log(1.0), generator=generator)
    return GaussianMixture(means, log_stds.exp())


class SlicedW2:
    """Squared sliced W2 to one fixed reference sample, its projections sorted once."""

    def __init__(self, reference: Tensor, n_projections: int = 256):
        self.directions = random_directions(reference.shape[1], n_projections, torch.Generator().manual_seed(PROJECTION_SEED))
        self.reference = torch.sort(self.directions @ reference.T, dim=1).values

    def __call__(self, samples: Tensor) -> float:
        if not bool(torch.isfinite(samples).all()):
            return math.nan
        projected = torch.sort(self.directions @ samples.to(torch.float64).T, dim=1).values
        return float((projected - self.reference).square().mean())


# ---------------------------------------------------------------- samplers


def fewstep_run(name: str, grid: str = "karras", **options) -> Run:
    def run(denoiser, noise, budget):
        return sample(denoiser, noise, name, budget, SIGMA_MIN, SIGMA_MAX, rho=RHO, grid=grid, **options)

    return run


def grid_sigmas(steps: int, grid: str) -> Tensor:
    if grid in ("karras", "nested"):
        return GRIDS[grid](steps, SIGMA_MIN, SIGMA_MAX, RHO)
    return GRIDS[grid](steps, SIGMA_MIN, SIGMA_MAX)


def stages_run(step_fn, stages: int, grid: str = "karras") -> Run:
    """A one-step method of ``stages`` NFE per step, 1 on the step to 0, as fewstep budgets its SEEDS solvers."""

    def run(denoiser, noise, budget):
        sigmas = grid_sigmas((budget - 1) // stages + 1, grid).to(noise.dtype)
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoiser(x, _sigma(x, sigma))
            x = denoised if sigma_next == 0 else step_fn(denoiser, x, denoised, sigma, sigma_next)
        return x

    return run


def seeds2_variant(c2: float = 0.5, weights: str = "phi1", coupling: str = "exact") -> Callable:
    """SEEDS-2 in data prediction with knobs; at c2 = 1/2 and the exact coupling it is fewstep's sample_seeds2
    with the same ``weights`` (``check_reference`` asserts it).

    weights: "phi1", D_s + (D_2 - D_s) / (2 c2) with weight 1 - e^{-2h} (the paper's SEEDS-2, DPM-Solver-2's
    form); "phi2", the exponential weights b2 = h phi_2(-2h) / c2 (as fewstep's SEEDS-3 uses).
    coupling: the correlation of the final step's unit noise with the stage's: "exact" (the SDE's own, from
    one Brownian path in tau = 1 / sigma^2), "sigma" (k-diffusion's BrownianTreeNoiseSampler, a Brownian path in
    sigma itself), "zero" (independent draws).
    """

    def step(denoiser, x, d_s, sigma, sigma_next):
        h = math.log(sigma / sigma_next)
        sigma_2 = sigma * math.exp(-c2 * h)
        z_2 = torch.randn_like(x)
        x_2 = math.exp(-2 * c2 * h) * x - math.expm1(-2 * c2 * h) * d_s + sigma_2 * math.sqrt(-math.expm1(-2 * c2 * h)) * z_2
        d_2 = denoiser(x_2, _sigma(x, sigma_2))
        if weights == "phi1":
            effective = d_s + (d_2 - d_s) / (2 * c2)
            mixed = -math.expm1(-2 * h) * effective
        else:
            b2 = _phi2(-2 * h) / c2
            mixed = -(math.expm1(-2 * h) - b2) * d_s - b2 * d_2
        rho = {
            "exact": math.exp(-(1 - c2) * h) * math.sqrt(-math.expm1(-2 * c2 * h) / -math.expm1(-2 * h)),
            "sigma": math.sqrt((sigma - sigma_2) / (sigma - sigma_next)),
            "zero": 0.0,
        }[coupling]
        z = rho * z_2 + math.sqrt(1 - rho**2) * torch.randn_like(x)
        return math.exp(-2 * h) * x + mixed + sigma_next * math.sqrt(-math.expm1(-2 * h)) * z

    return step


def seeds2_noise_prediction(denoiser, x, d_s, sigma, sigma_next):
    """SEEDS-2 (c2 = 1/2) in the noise-prediction form for alpha = 1: dx = -2 sigma eps dlambda + sqrt(2) sigma dB.

    No linear part to integrate exactly when alpha = 1; the noise is Brownian in sigma^2, split exactly.
    """
    sigma_2 = math.sqrt(sigma * sigma_next)
    eps_s = (x - d_s) / sigma
    z_2 = torch.randn_like(x)
    x_2 = x - 2 * (sigma - sigma_2) * eps_s + math.sqrt(sigma**2 - sigma_2**2) * z_2
    eps_2 = (x_2 - denoiser(x_2, _sigma(x, sigma_2))) / sigma_2
    noise = math.sqrt(sigma**2 - sigma_2**2) * z_2 + math.sqrt(sigma_2**2 - sigma_next**2) * torch.randn_like(x)
    return x - 2 * (sigma - sigma_next) * eps_2 + noise


def import_kdiffusion_sampling():
    """k_diffusion.sampling without the package's __init__, or None with one line saying why."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        print("bench_mixture: k-diffusion is not installed; the peer rows are left out", flush=True)
        return None
    if "k_diffusion" not in sys.modules:  # the package from its own spec, its __init__ not run: others find it intact
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as error:
        print(f"bench_mixture: k_diffusion.sampling is not importable ({error}); the peer rows are left out", flush=True)
        return None


def kdiff_run(kd, function: str, per_step: int, noise: str = "fresh", grid: str = "karras", **options) -> Run:
    """A k-diffusion sampler; ``per_step`` NFE per step and 1 on the step to 0 (budget as fewstep's).

    noise: "fresh" (default_noise_sampler: the same law as a Brownian tree for samplers that query disjoint
    steps), "brownian" (its BrownianTreeNoiseSampler, Brownian in sigma), "brownian_tau" (the same tree in
    tau = 1 / sigma^2, the time in which the SDE's noise is Brownian).
    """
    sampler = getattr(kd, function)

    def run(denoiser, x_unit, budget):
        sigmas = grid_sigmas((budget - 1) // per_step + 1, grid).to(x_unit.dtype)
        x = x_unit * sigmas[0]
        low, high = sigmas[sigmas > 0].min(), sigmas.max()
        if noise == "fresh":
            options["noise_sampler"] = kd.default_noise_sampler(x)
        elif noise == "brownian":
            options["noise_sampler"] = kd.BrownianTreeNoiseSampler(x, low, high)
        elif noise == "brownian_tau":
            options["noise_sampler"] = kd.BrownianTreeNoiseSampler(x, low, high, transform=lambda s: 1 / s**2)
        return sampler(denoiser, x, sigmas, disable=True, **options)

    return run


def seeds_rows(kd) -> list[tuple[str, str, Run]]:
    """(section, label, run) for sections A and B."""
    rows = [
        ("A", "seeds1", fewstep_run("seeds1")),
        ("A", "seeds2 before (weights=phi1)", fewstep_run("seeds2", weights="phi1")),
        ("A", "seeds2 now (weights=phi2)", fewstep_run("seeds2")),
        ("A", "seeds3", fewstep_run("seeds3")),
    ]
    if kd is not None:
        rows += [
            ("A", "kd.euler_ancestral", kdiff_run(kd, "sample_euler_ancestral", 1)),
            ("A", "kd.dpmpp_sde (brownian)", kdiff_run(kd, "sample_dpmpp_sde", 2, "brownian")),
            ("A", "kd.dpmpp_2m_sde", kdiff_run(kd, "sample_dpmpp_2m_sde", 1)),
            ("A", "kd.dpmpp_3m_sde", kdiff_run(kd, "sample_dpmpp_3m_sde", 1)),
        ]
    rows += [("A", "dpmpp_2m (ODE)", fewstep_run("dpmpp_2m"))]
    # B1: the time grid
    rows += [
        ("B1 grid", "seeds2 log_snr", fewstep_run("seeds2", grid="log_snr")),
        ("B1 grid", "seeds3 log_snr", fewstep_run("seeds3", grid="log_snr")),
    ]
    if kd is not None:
        rows += [
            ("B1 grid", "kd.dpmpp_sde (brownian) log_snr", kdiff_run(kd, "sample_dpmpp_sde", 2, "brownian", "log_snr")),
            ("B1 grid", "kd.dpmpp_2m_sde log_snr", kdiff_run(kd, "sample_dpmpp_2m_sde", 1, grid="log_snr")),
        ]
    # B2: stage placement and weights of SEEDS-2; B3: the noise coupling; B4: the noise-prediction form
    rows += [
        ("B2 stages", "seeds2 c2=1/2 phi1 (reference)", stages_run(seeds2_variant(), 2)),
        ("B2 stages", "seeds2 c2=1/3", stages_run(seeds2_variant(c2=1 / 3), 2)),
        ("B2 stages", "seeds2 c2=2/3", stages_run(seeds2_variant(c2=2 / 3), 2)),
        ("B2 stages", "seeds2 c2=1", stages_run(seeds2_variant(c2=1.0), 2)),
        ("B2 stages", "seeds2 c2=1/3 phi2", stages_run(seeds2_variant(c2=1 / 3, weights="phi2"), 2)),
        ("B2 stages", "seeds2 c2=2/3 phi2", stages_run(seeds2_variant(c2=2 / 3, weights="phi2"), 2)),
        ("B3 coupling", "seeds2 coupling=sigma (k-diffusion's)", stages_run(seeds2_variant(coupling="sigma"), 2)),
        ("B3 coupling", "seeds2 coupling=zero", stages_run(seeds2_variant(coupling="zero"), 2)),
        ("B3 coupling", "seeds2 phi2 coupling=sigma", stages_run(seeds2_variant(weights="phi2", coupling="sigma"), 2)),
        ("B4 noise form", "seeds2 noise prediction", stages_run(seeds2_noise_prediction, 2)),
    ]
    if kd is not None:
        rows += [
            ("B3 coupling", "kd.dpmpp_sde (fresh)", kdiff_run(kd, "sample_dpmpp_sde", 2, "fresh")),
            ("B3 coupling", "kd.dpmpp_sde (brownian in tau)", kdiff_run(kd, "sample_dpmpp_sde", 2, "brownian_tau")),
            ("B5 eta", "kd.dpmpp_2m_sde eta=0.5", kdiff_run(kd, "sample_dpmpp_2m_sde", 1, eta=0.5)),
            ("B5 eta", "kd.dpmpp_2m_sde heun", kdiff_run(kd, "sample_dpmpp_2m_sde", 1, solver_type="heun")),
        ]
    return rows


def lazy_rows(sigma_data: float) -> list[tuple[str, str, Run]]:
    rows = [("C", name, fewstep_run(name, sigma_data=sigma_data)) for name in ("lazy_ode", "lazy_2m") if name in SOLVERS]
    return rows + [("C", "dpmpp_2m", fewstep_run("dpmpp_2m")), ("C", "heun", fewstep_run("heun"))]


# ---------------------------------------------------------------- running and writing


def check_reference(denoiser, noise) -> None:
    """The tool's SEEDS-2 (seeds2_variant) is fewstep's sample_seeds2 at c2 = 1/2, for both weightings."""
    for weights in ("phi1", "phi2"):
        torch.manual_seed(SDE_SEED)
        ours = stages_run(seeds2_variant(weights=weights), 2)(denoiser, noise, 9)
        torch.manual_seed(SDE_SEED)
        theirs = fewstep_run("seeds2", weights=weights)(denoiser, noise, 9)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def measure(rows, nfes, denoiser, noise, score) -> list[dict]:
    results = []
    for section, label, run in rows:
        start = time.perf_counter()
        for budget in nfes:
            counter = CountingDenoiser(denoiser)
            torch.manual_seed(SDE_SEED)
            samples = run(counter, noise, budget)
            results.append({"section": section, "solver": label, "nfe_budget": budget, "nfe": counter.nfe,
                            "sliced_w2": score(samples)})
        print(f"bench_mixture: {section:12s} {label:40s} {time.perf_counter() - start:6.1f} s", flush=True)
    return results


def strict_json(value):
    """NaN (a diverged run) as null, so that the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    return value


def fmt(value: float | None) -> str:
    if value is None:
        return "nan"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def table(rows: list[dict], nfes, sections) -> list[str]:
    cells = {(r["solver"], r["nfe_budget"]): r for r in rows if r["section"] in sections}
    labels = list(dict.fromkeys(r["solver"] for r in rows if r["section"] in sections))
    lines = ["| solver | " + " | ".join(map(str, nfes)) + " |", "|---|" + "---|" * len(nfes)]
    for label in labels:
        row = []
        for nfe in nfes:
            cell = cells[(label, nfe)]
            used = "" if cell["nfe"] == nfe else f" ({cell['nfe']})"
            row.append(fmt(cell["sliced_w2"]) + used)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


COMPARISONS = (  # (row, against, section): the claims and the new solver's, as ratios per budget
    ("seeds2 now (weights=phi2)", "kd.dpmpp_sde (brownian)", "seeds"),
    ("seeds2 before (weights=phi1)", "kd.dpmpp_sde (brownian)", "seeds"),
    ("seeds3", "kd.dpmpp_2m_sde", "seeds"),
    ("seeds3", "kd.dpmpp_2m_sde log_snr", "seeds"),
    ("lazy_2m", "dpmpp_2m", "lazy"),
    ("lazy_2m", "lazy_ode", "lazy"),
)


def comparison_table(result: dict) -> list[str]:
    """score(row) / score(against) per budget: below 1 the row wins; '~' when both sit within 2x the floor."""
    cells = {(r["solver"], r["nfe_budget"]): r["sliced_w2"] for r in result["rows"]}
    floor = sum(result["floor"]) / len(result["floor"])
    lines = []
    for row, against, kind in COMPARISONS:
        nfes = result[f"{kind}_nfes"]
        if (row, nfes[0]) not in cells or (against, nfes[0]) not in cells:
            continue
        ratios = []
        for nfe in nfes:
            a, b = cells[(row, nfe)], cells[(against, nfe)]
            if a is None or b is None or math.isnan(a) or math.isnan(b):
                ratios.append(f"{nfe}: nan")
                continue
            near_floor = max(a, b) < 2 * floor
            ratios.append(f"{nfe}: {a / b:.2f}" + ("~" if near_floor else ""))
        lines.append(f"- {row} / {against}: " + ", ".join(ratios))
    return lines


def markdown(result: dict) -> str:
    floor = result["floor"]
    lines = [
        "# Issue 17: sampler claims on a 16-d anisotropic Gaussian mixture",
        "",
        f"`{result['command']}` ({result['date']}; {result['machine']}; torch {result['torch']}, "
        f"k-diffusion {result['k_diffusion']}). Written by tools/bench_mixture.py; the analysis is in the "
        "sections after the tables.",
        "",
        f"Problem: 8 equal-weight modes in 16-d, means N(0, I), per-mode diagonal stds log-uniform in [0.05, 1] "
        f"(seed {MIXTURE_SEED}); RMS std (lazy `sigma_data`) {result['sigma_data']:.4f}; sigma in [0.002, 80], "
        f"Karras grid rho = 7 unless the row says otherwise; n = {result['n']} samples. Score: squared sliced W2 "
        "to a fresh true sample (256 fixed directions). A number in parentheses is the NFE actually used when "
        "below the budget.",
        "",
        "Noise floor (squared sliced W2 between two independent true samples of n): "
        + ", ".join(f"{v:.5f}" for v in floor) + f" (mean {sum(floor) / len(floor):.5f}).",
        "",
        "## A. The issue's rows, and B. the SEEDS ablations (NFE budget per column)",
        "",
        *table(result["rows"], result["seeds_nfes"], {"A", "A fix"} | {s for s in result["sections"] if s.startswith("B")}),
        "",
        "## C. Lazy solvers against DPM-Solver++(2M) and Heun (ODE)",
        "",
        *table(result["rows"], result["lazy_nfes"], {"C"}),
        "",
        "## Ratios (score of the first / score of the second; below 1 the first wins; ~ both within 2x the floor)",
        "",
        *comparison_table(result),
        "",
    ]

    return "\n".join(lines)


PLOTTED = (
    ("A", ("seeds2 before (weights=phi1)", "seeds2 now (weights=phi2)", "seeds3", "kd.dpmpp_sde (brownian)",
           "kd.dpmpp_2m_sde", "kd.dpmpp_2m_sde log_snr", "dpmpp_2m (ODE)")),
    ("C", ("lazy_ode", "lazy_2m", "dpmpp_2m")),
)


def plot(result: dict, path: Path) -> bool:
    """Score against counted NFE for the headline rows (left: SEEDS and peers, right: lazy); False without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = sum(result["floor"]) / len(result["floor"])
    for axis, (_, labels), nfes in zip(axes, PLOTTED, (result["seeds_nfes"], result["lazy_nfes"])):
        for label in labels:
            points = sorted({(r["nfe"], r["sliced_w2"]) for r in result["rows"] if r["solver"] == label and r["sliced_w2"] is not None})
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=label)
        axis.axhline(floor, color="gray", linestyle=":", label="noise floor")
        axis.set(xscale="log", yscale="log", xlabel="NFE (counted)", ylabel="sliced W2^2 to the truth")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ticks = [nfe for nfe in nfes if nfe not in (11, 12, 23)]  # neighbours of 10 and 24 crowd the axis
        axis.set_xticks(ticks, [str(nfe) for nfe in ticks])
        axis.legend(fontsize=7)
    axes[0].set_title("SEEDS against k-diffusion (Karras grid unless named)", fontsize=9)
    axes[1].set_title("lazy solvers against DPM-Solver++(2M)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


ANALYSIS_MARKER = "<!-- analysis: kept when the tool rewrites the tables -->"


def write_markdown(path: Path, result: dict) -> None:
    """The tables, then the hand-written analysis kept from an existing file (from ANALYSIS_MARKER on)."""
    kept = ""
    if path.is_file() and ANALYSIS_MARKER in path.read_text():
        kept = path.read_text()[path.read_text().index(ANALYSIS_MARKER):]
    image = path.parent / "images" / "bench_mixture.png"
    figure = [f"![score against NFE](images/{image.name})", ""] if plot(result, image) else []
    path.write_text(markdown(result) + "\n" + "\n".join(figure) + (kept or ANALYSIS_MARKER + "\n"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 1000 and a few budgets (a smoke test)")
    parser.add_argument("--n", type=int, default=None, help="samples per run (default 10000; 1000 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite the markdown from a results file only")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        write_markdown(args.out / "bench_mixture.md", json.loads(args.from_json.read_text()))
        return
    n = args.n or (1000 if args.quick else 10_000)
    seeds_nfes, lazy_nfes = ((4, 7), (1, 4)) if args.quick else (SEEDS_NFES, LAZY_NFES)
    problem = mixture()
    reference = problem.sample(n, torch.Generator().manual_seed(REFERENCE_SEED))[0]
    score = SlicedW2(reference)
    floor = [score(problem.sample(n, torch.Generator().manual_seed(seed))[0]) for seed in FLOOR_SEEDS]
    noise = torch.randn(n, problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(NOISE_SEED))
    sigma_data = math.sqrt(float(torch.trace(problem.covariance())) / problem.dim)
    kd = import_kdiffusion_sampling()
    check_reference(problem.denoiser, noise[:256])
    rows = measure(seeds_rows(kd), seeds_nfes, problem.denoiser, noise, score)
    rows += measure(lazy_rows(sigma_data), lazy_nfes, problem.denoiser, noise, score)
    result = {
        "command": "python tools/bench_mixture.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "k_diffusion": importlib.metadata.version("k-diffusion") if kd is not None else "absent",
        "n": n, "sigma_data": sigma_data, "floor": floor, "seeds_nfes": list(seeds_nfes), "lazy_nfes": list(lazy_nfes),
        "sections": sorted({r["section"] for r in rows}), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_mixture.json").write_text(json.dumps(strict_json(result), indent=1, allow_nan=False) + "\n")
    write_markdown(args.out / "bench_mixture.md", result)
    print(f"bench_mixture: wrote {args.out / 'bench_mixture.md'} and {args.out / 'bench_mixture.json'}", flush=True)


if __name__ == "__main__":
    main()
