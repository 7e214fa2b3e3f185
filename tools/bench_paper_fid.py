"""Throughput of the papers' FID protocol on a published-size teacher: sampling and Inception images per second.

    python tools/bench_paper_fid.py [--device cuda] [--batch 512] [--nfe 35] [--samplers heun seeds3]

EDM's CIFAR-10 DDPM++ (``model=edm_ddpmpp_cifar``, 56M parameters, random weights: throughput does not
depend on the weights) is sampled at ``--batch`` with each sampler at ``--nfe`` network evaluations (counted),
and the FID Inception network (2015-12-05, 299 x 299 input) scores uint8 32 x 32 images at the same batch.
From both: the time of one 50,000-sample FID (sampling plus features) and of the papers' best of three.
Medians of ``--repeats`` timed batches after one warm-up batch. Prints a markdown table naming the device,
torch and CUDA versions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from omegaconf import OmegaConf

from fewstep.cli import CONF_DIR
from fewstep.images import to_uint8
from fewstep.metrics.inception import InceptionFeatures
from fewstep.networks.edm import edm_denoiser
from fewstep.samplers import CountingDenoiser, SeededNoise, sample

PAPER_N = 50_000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, caches
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--nfe", type=int, default=35)
    parser.add_argument("--samplers", nargs="+", default=["heun", "seeds3"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="edm_ddpmpp_cifar", help="a model config of conf/model")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    config.pop("_target_")
    torch.manual_seed(0)
    net = edm_denoiser([3, 32, 32], 0, **config).to(device).eval()
    parameters = sum(p.numel() for p in net.parameters())

    rows = []
    for name in args.samplers:
        counted = CountingDenoiser(lambda x, sigma: net(x, sigma))
        noise = SeededNoise(range(args.batch), device=device)

        @torch.no_grad()
        def draw():
            counted.nfe = 0
            return sample(counted, noise.randn((3, 32, 32)), name, args.nfe, generator=noise)

        seconds = median_seconds(draw, device, args.repeats)
        rows.append((name, counted.nfe, args.batch / seconds))

    inception = InceptionFeatures().to(device).eval()
    images = to_uint8(torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1)
    inception_ips = args.batch / median_seconds(lambda: inception(images), device, args.repeats)

    print(f"\n{args.model} ({parameters / 1e6:.1f}M parameters, random weights), batch {args.batch}, {device_name(device)}\n")
    print("| sampler | NFE (counted) | images/s | 50k FID (s) | best of 3 (min) |")
    print("|---|---|---|---|---|")
    for name, nfe, ips in rows:
        one = PAPER_N / ips + PAPER_N / inception_ips
        print(f"| {name} | {nfe} | {ips:.1f} | {one:.0f} | {3 * one / 60:.1f} |")
    print(f"| Inception features | - | {inception_ips:.1f} | {PAPER_N / inception_ips:.0f} (features alone) | - |")


if __name__ == "__main__":
    main()
