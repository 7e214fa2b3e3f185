"""Exact Kac simulation per training batch: gamma sums (fewstep's) against sorted flip times (the previous way).

    python tools/bench_kac_simulation.py [--batch 32] [--shape 1 28 28] [--repeats 15] [--device cpu]

Both draw K_t exactly for one Kac teacher training batch (a = 9, c = 3, t ~ U(1e-3, 1) per image, as
``KacPath.displacement`` does): N ~ Poisson(a t) flips, then the walk over the N + 1 segments between flips.
"sorted" draws N uniforms on [0, t] and sorts them (fewstep up to 2026-12-01); "gamma sums" uses that the
spacings are t E_j / sum E (Renyi's representation), so the alternating walk is t (G+ - G-) / (G+ + G-) with two
independent gamma draws per coordinate (``KacProcess.sample``): no sort, no padding. Runs alternate; medians of
--repeats; the ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.processes.kac import _CHUNK, KacProcess


def sample_by_sorting(process: KacProcess, t: torch.Tensor, shape, generator) -> torch.Tensor:
    """The previous exact simulation (sorted flip times), kept here as the benchmark's baseline."""
    t = t.to(torch.float64).view((-1,) + (1,) * (len(shape) - 1)).expand(shape).reshape(-1)
    sign0 = 2 * torch.randint(0, 2, t.shape, generator=generator, dtype=torch.float64) - 1
    flips = torch.poisson(process.a * t, generator=generator)
    walk = torch.empty_like(t)
    rows = max(1, _CHUNK // (int(flips.max()) + 1))
    for lo in range(0, t.numel(), rows):
        tc, nc = t[lo:lo + rows, None], flips[lo:lo + rows, None]
        width = int(nc.max())
        u = torch.rand(tc.shape[0], width, generator=generator, dtype=torch.float64) * tc
        slot = torch.arange(width, dtype=torch.float64)
        tau = torch.where(slot < nc, u, tc).sort(dim=1).values
        segments = torch.cat([tau, tc], dim=1).diff(dim=1, prepend=torch.zeros_like(tc))
        alternating = 1 - 2 * (torch.arange(width + 1) % 2).to(torch.float64)
        walk[lo:lo + rows] = segments @ alternating
    cone = process.c * t
    return torch.minimum(torch.maximum(sign0 * process.c * walk, -cone), cone).reshape(shape).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 28, 28])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    process, shape = KacProcess(9.0, 3.0), (args.batch, *args.shape)
    generator = torch.Generator().manual_seed(0)
    t = 1e-3 + (1 - 1e-3) * torch.rand(args.batch, generator=generator, dtype=torch.float64)

    ways = {
        "sorted": lambda: sample_by_sorting(process, t, shape, generator),
        "gamma sums": lambda: process.sample(t, shape, generator=generator),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for name in ways:  # warm-up
        ways[name]()
    for _ in range(args.repeats):
        for name, draw in ways.items():
            start = time.perf_counter()
            draw()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"batch {shape}, {torch.get_num_threads()} threads, medians of {args.repeats}\n")
    print("| simulation | ms per batch | speed-up over sorted |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {medians['sorted'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
