"""Which step of a sampler's grid loses the quality (issue 17: SEEDS-3's dip at 8 NFE)? Swap steps for a fine solver.

    python tools/seeds_split.py TEACHER.ckpt [--nfe 8] [--split 1] [--routes seeds3>seeds3 seeds3>fine ...] [--n 1000]

The sampler's own grid at ``--nfe`` (Karras, rho = 7; or ``--levels 80 0.4 0.002 0``) is cut at its level
``--split`` (sigma_k). A route
``A>B`` runs A from sigma_max down to sigma_k and B from sigma_k to 0. A and B are a solver of the table
(run on that part of the sampler's own grid) or ``fine``: ``--fine`` (default heun) on its own Karras grid of
``--fine-steps`` levels over the same part, an accurate reference for that part. So ``seeds3>fine`` keeps only
SEEDS-3's first steps and ``fine>seeds3`` only its last ones: whichever route keeps the loss holds the step
that causes it. Every route draws the same seeds; each is scored by fid_domain on two disjoint sets of n
(seeds 0..n-1 and n..2n-1) against the first n training images, as ``python -m fewstep.evaluate`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fewstep.checkpoints import load_method
from fewstep.evaluate import training_config
from fewstep.images import to_uint8
from fewstep.metrics.diversity import dark_pixel_stats
from fewstep.metrics.score import feature_extractor, reference_key, score
from fewstep.run_config import build_data
from fewstep.samplers import SOLVERS, CountingDenoiser, SeededNoise, karras_sigmas


def pieces(route: str, grid: torch.Tensor, split: int, fine: str, fine_steps: int):
    """[(solver name, sigmas)] for ``A>B``: A on grid[: split + 1], B on grid[split:] (fine: its own Karras grid)."""
    first, _, second = route.partition(">")
    sigma_k = float(grid[split])
    out = []
    for name, part in ((first, grid[: split + 1]), (second, grid[split:])):
        if name == "fine":
            high, low = float(part[0]), float(part[-1])
            part = karras_sigmas(fine_steps, 0.002, high) if low == 0 else karras_sigmas(fine_steps, low, high)[:-1]
            name = fine
        elif name not in SOLVERS:
            raise SystemExit(f"unknown solver '{name}' in route '{route}': choose fine or one of {', '.join(SOLVERS)}")
        out.append((name, part))
    assert abs(float(out[0][1][-1]) - sigma_k) < 1e-9 * sigma_k and abs(float(out[1][1][0]) - sigma_k) < 1e-9 * sigma_k
    return out


@torch.no_grad()
def draw(method, route_pieces, n: int, seed: int, batch_size: int) -> tuple[torch.Tensor, int]:
    """n samples from seeds seed..seed+n-1 through the route's pieces, one SeededNoise per batch: (uint8, NFE)."""
    out, nfe = [], 0
    for start in range(0, n, batch_size):
        noise = SeededNoise(range(seed + start, seed + min(n, start + batch_size)), method.device)
        counted = CountingDenoiser(method.denoiser)
        x = noise.randn(tuple(method.hparams.data_shape)) * float(route_pieces[0][1][0])
        for name, sigmas in route_pieces:
            x = SOLVERS[name].fn(counted, x, sigmas.to(x.dtype), noise=noise)
        out.append(to_uint8(x))
        nfe = counted.nfe
    return torch.cat(out), nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--sampler", default="seeds3")
    parser.add_argument("--nfe", type=int, default=8)
    parser.add_argument("--split", type=int, default=1, help="index of the grid level where the route switches")
    parser.add_argument("--levels", type=float, nargs="+", help="the grid itself (e.g. 80 0.4 0.002 0) instead of Karras's")
    parser.add_argument("--routes", nargs="+", default=["seeds3>seeds3", "seeds3>fine", "fine>seeds3", "fine>fine"])
    parser.add_argument("--fine", default="heun")
    parser.add_argument("--fine-steps", type=int, default=18)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/fewstep").expanduser())
    parser.add_argument("--out", type=Path, default=Path("outputs/seeds_split"))
    args = parser.parse_args()

    train_cfg = training_config(str(args.ckpt), None)
    datamodule = build_data(train_cfg.data)
    real = datamodule.real_images(args.n)
    data_name = train_cfg.data._target_.rpartition(".")[2]
    extractor = feature_extractor("fid_domain", datamodule, data_name, args.cache_dir)
    key = reference_key(data_name, datamodule.shape, "fid_domain", len(real))
    method = load_method(args.ckpt)
    grid = torch.tensor(args.levels, dtype=torch.float64) if args.levels else karras_sigmas(SOLVERS[args.sampler].steps_for_nfe(args.nfe))
    print(f"{args.sampler} grid at {args.nfe} NFE: {[round(float(s), 4) for s in grid]}; split at sigma = {float(grid[args.split]):.4g}")
    rows = []
    for route in args.routes:
        route_pieces = pieces(route, grid, args.split, args.fine, args.fine_steps)
        values, first, nfe = [], None, 0
        for seed in (0, args.n):
            images, nfe = draw(method, route_pieces, args.n, seed, args.batch_size)
            values.append(score("fid_domain", extractor, real, images, key, args.cache_dir, args.batch_size))
            first = images if first is None else first
        rows.append({"route": route, "pieces": [(name, [round(float(s), 4) for s in sig]) for name, sig in route_pieces],
                     "nfe": nfe, "values": values, "mean": statistics.fmean(values), **dark_pixel_stats(first)})
        print(json.dumps(rows[-1]), flush=True)
    split = f"{float(grid[args.split]):.3g}"
    lines = [f"| route (sigma_max -> {split} > {split} -> 0) | NFE | fid_domain, two sets of {args.n} | mean | dark fraction |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['route']} | {r['nfe']} | {', '.join(f'{v:.3g}' for v in r['values'])} | {r['mean']:.3g} | "
              f"{r['dark_fraction']:.3f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds_split.md").write_text(table)
    (args.out / "seeds_split.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
