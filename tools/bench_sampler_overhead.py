"""Solver overhead per network evaluation, with a real UNet denoiser, on CPU or GPU.

    python tools/bench_sampler_overhead.py [--device cuda] [--model small|cifar] [--batch 64] [--nfe 32]

For each fewstep solver: wall time of ``fewstep.samplers.sample`` at the given NFE, against the
wall time of the same number of bare denoiser calls on the same batch (the least any solver can
cost). Overhead = solver / bare - 1, the cost of the solver's own arithmetic, noise and
bookkeeping. SDE solvers are timed twice: noise from torch's global generator, and per-sample
seeded noise (``SeededNoise``, one generator per image, what ``fewstep.sample`` uses so that a
sample does not depend on its batch). Runs alternate bare/solver; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.networks import UNet, edm_denoise
from fewstep.samplers import SOLVERS, CountingDenoiser, SeededNoise, sample

MODELS = {  # the presets of conf/model
    "small": dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attn_levels=(2,)),
    "cifar": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,)),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--resolution", type=int, default=None, help="default: 28 (small), 32 (cifar)")
    parser.add_argument("--channels", type=int, default=None, help="default: 1 (small), 3 (cifar)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    resolution = args.resolution or (28 if args.model == "small" else 32)
    channels = args.channels or (1 if args.model == "small" else 3)
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
    settings = [(name, None) for name in SOLVERS] + [(name, "seeded") for name, solver in SOLVERS.items() if solver.stochastic]
    for name, generator in settings:
        counted = CountingDenoiser(denoiser)
        options = {"eta": 1.0} if name == "ddim" else {}
        make = (lambda: SeededNoise(seeds, device)) if generator else (lambda: None)
        sample(counted, noise, name, args.nfe, generator=make(), **options)  # warm-up, and the NFE it uses
        nfe = counted.nfe
        bare(nfe)
        solver_times, bare_times = [], []
        for _ in range(args.repeats):
            bare_times.append(timed(lambda: bare(nfe), device))
            solver_times.append(timed(lambda: sample(denoiser, noise, name, args.nfe, generator=make(), **options), device))
        s, b = statistics.median(solver_times), statistics.median(bare_times)
        label = name + (" (seeded noise)" if generator else "")
        rows.append((label, nfe, s / nfe * 1e3, b / nfe * 1e3, s / b - 1))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params), batch {args.batch}, "
          f"{'x'.join(map(str, shape))}, budget {args.nfe} NFE, {name}, torch {torch.__version__}, "
          f"median of {args.repeats}")
    print("| solver | NFE | ms per NFE | bare denoiser ms per call | overhead |")
    print("|---|---|---|---|---|")
    for label, nfe, per_nfe, per_call, overhead in rows:
        print(f"| {label} | {nfe} | {per_nfe:.3f} | {per_call:.3f} | {overhead:+.1%} |")


if __name__ == "__main__":
    main()
