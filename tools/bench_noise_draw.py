"""The cost of one per-image noise draw: the counter-based SeededNoise against torch.randn and one generator per image.

    python tools/bench_noise_draw.py [--device cuda] [--rounds 3]

For each batch shape: the best time of 30 draws of the whole batch's normals by ``torch.randn`` (global
generator, no per-image seeds), by ``SeededNoise.randn`` (SplitMix64 over seed, draw and element) and by one
``torch.Generator`` per image (what SeededNoise was before 2026-12-02), in interleaved rounds.
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep.samplers import SeededNoise

SHAPES = ((64, (1, 28, 28)), (128, (3, 32, 32)), (512, (3, 32, 32)))


def per_generator(batch: int, device: torch.device):
    generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
    return lambda shape: torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def best_ms(fn, device: torch.device, draws: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(draws):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}; best of 30 draws, best of {args.rounds} interleaved rounds")
    print("| batch | torch.randn (ms) | counter-based (ms) | one generator per image (ms) | counter / randn |")
    print("|---|---|---|---|---|")
    for batch, shape in SHAPES:
        counter, old = SeededNoise(range(batch), device), per_generator(batch, device)
        times = {"randn": [], "counter": [], "old": []}
        for _ in range(args.rounds):
            times["randn"].append(best_ms(lambda: torch.randn(batch, *shape, device=device), device))
            times["counter"].append(best_ms(lambda: counter.randn(shape), device))
            times["old"].append(best_ms(lambda: old(shape), device))
        randn, ours, theirs = (min(times[k]) for k in ("randn", "counter", "old"))
        print(f"| {batch} x {'x'.join(map(str, shape))} | {randn:.3f} | {ours:.3f} | {theirs:.3f} | {ours / randn:.2f} |")


if __name__ == "__main__":
    main()
