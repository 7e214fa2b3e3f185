"""Solver overhead per network evaluation, with a real UNet denoiser, on CPU or GPU.

    python tools/bench_sampler_overhead.py [--device cuda] [--model tiny|small|cifar] [--batch 64] [--nfe 32]
                                           [--repeats 5] [--json rows.json]

For each fewstep solver: wall time of ``fewstep.samplers.sample`` at the given NFE, against the
wall time of the same number of bare denoiser calls on the same batch (the least any solver can
cost). Overhead = solver / bare - 1, the cost of the solver's own arithmetic, noise and
bookkeeping. SDE solvers are timed twice: noise from torch's global generator, and per-image
seeded noise (``SeededNoise``, the counter-based generator that ``fewstep.generate`` uses so that a
sample does not depend on its batch). Runs alternate bare, global-noise and per-image-noise calls of
one solver, so that the two noises meet the same machine load; medians of ``--repeats``. ``--json``
also writes the rows as a list of {solver, noise: "global" | "per_image", nfe, ms_per_nfe,
bare_ms_per_call, overhead}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fewstep.bench import synchronize
from fewstep.networks import UNet, edm_denoise
from fewstep.samplers import SOLVERS, CountingDenoiser, SeededNoise, sample

MODELS = {  # the presets of conf/model (tiny: unet_tiny)
    "tiny": dict(model_channels=4, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,)),
    "small": dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attn_levels=(2,)),
    "cifar": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,)),
}


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--resolution", type=int, default=None, help="default: 28 (tiny, small), 32 (cifar)")
    parser.add_argument("--channels", type=int, default=None, help="default: 1 (tiny, small), 3 (cifar)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, noises: dict | None = None) -> list[dict]:
    """The rows; ``noises``: name -> (seeds, device) -> noise source for SDE solvers, besides "global"."""
    noises = {"per_image": SeededNoise} if noises is None else noises
    device = torch.device(args.device)
    resolution = args.resolution or (32 if args.model == "cifar" else 28)
    channels = args.channels or (3 if args.model == "cifar" else 1)
    shape = (channels, resolution, resolution)
    net = UNet(shape, **MODELS[args.model]).to(device).eval()
    torch.manual_seed(0)
    for p in net.parameters():  # non-zero weights everywhere, so no layer is skipped as a no-op
        p.data.normal_(0, 0.02)

    @torch.no_grad()
    def denoiser(x, sigma, **_):
        return edm_denoise(net, x, sigma, None, 0.5)

    seeds = list(range(args.batch))
    noise = SeededNoise(seeds, device).randn(shape)
    x_bare, sigma_bare = noise * 10, torch.full((args.batch,), 10.0, device=device)

    def bare(nfe):
        for _ in range(nfe):
            denoiser(x_bare, sigma_bare)

    rows = []
    for name, solver in SOLVERS.items():
        options = {"eta": 1.0} if name == "ddim" else {}
        kinds = {"global": lambda: None}
        if solver.stochastic:
            kinds.update({kind: (lambda make=make: make(seeds, device)) for kind, make in noises.items()})

        def draw(make, name=name, options=options):
            return sample(denoiser, noise, name, args.nfe, generator=make(), **options)

        counted = CountingDenoiser(denoiser)
        sample(counted, noise, name, args.nfe, generator=None, **options)  # the NFE it uses
        nfe = counted.nfe
        for make in kinds.values():  # warm-up
            draw(make)
        bare(nfe)
        times = {kind: [] for kind in kinds}
        bare_times = []
        for _ in range(args.repeats):
            bare_times.append(timed(lambda: bare(nfe), device))
            for kind, make in kinds.items():
                times[kind].append(timed(lambda make=make: draw(make), device))
        b = statistics.median(bare_times)
        for kind, kind_times in times.items():
            s = statistics.median(kind_times)
            rows.append(dict(solver=name, noise=kind, nfe=nfe, ms_per_nfe=s / nfe * 1e3,
                             bare_ms_per_call=b / nfe * 1e3, overhead=s / b - 1))
    rows.sort(key=lambda row: row["noise"] != "global")  # global rows first, in SOLVERS order (a stable sort)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params), batch {args.batch}, "
          f"{'x'.join(map(str, shape))}, budget {args.nfe} NFE, {name}, torch {torch.__version__}, "
          f"median of {args.repeats}")
    return rows


def report(rows: list[dict], path: str | None = None) -> None:
    print("| solver | NFE | ms per NFE | bare denoiser ms per call | overhead |")
    print("|---|---|---|---|---|")
    for row in rows:
        label = row["solver"] + ("" if row["noise"] == "global" else f" ({row['noise'].replace('_', '-')} noise)")
        print(f"| {label} | {row['nfe']} | {row['ms_per_nfe']:.3f} | {row['bare_ms_per_call']:.3f} | "
              f"{row['overhead']:+.1%} |")
    global_ms = {row["solver"]: row["ms_per_nfe"] for row in rows if row["noise"] == "global"}
    for kind in dict.fromkeys(row["noise"] for row in rows if row["noise"] != "global"):
        gaps = [f"{row['solver']} {row['ms_per_nfe'] / global_ms[row['solver']] - 1:+.1%}" for row in rows
                if row["noise"] == kind]
        print(f"{kind} noise against global noise, time per NFE: {', '.join(gaps)}")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    args = parse_args()
    report(run(args), args.json)


if __name__ == "__main__":
    main()
