"""Does FID rank real data correctly? Fashion-MNIST train against test, blurred test and noise.

    python tools/fid_ranking.py [--n-domain 10000] [--n-fid 1000] [--device cpu]

Needs `apt-get install dataset-fashion-mnist` (or a torchvision root via --root) and, for standard
FID, `python -m fewstep.metrics.weights`. Reference: the first n training images. Candidates: the
first n test images, the same blurred (Gaussian, sigma 1 pixel), and uniform noise images. Prints a
markdown table; both metrics must give test << blurred << noise.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torchvision.transforms.functional import gaussian_blur

from fewstep.data import FashionMNIST
from fewstep.metrics import InceptionFeatures, domain_features, fid_against_reference, reference_stats


def uint8_images(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    data = FashionMNIST(split=split, root=root, val_size=0)
    images, labels = data._load()
    return images.to(torch.uint8), labels


def candidates(test: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    blurred = gaussian_blur(test.float(), kernel_size=7, sigma=1.0).round().clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return {"test": test, "blurred test": blurred, "uniform noise": noise}


def scores(extractor, train: torch.Tensor, sets: dict[str, torch.Tensor], key: str, cache: Path) -> dict[str, float]:
    reference = reference_stats(key, extractor, train, cache)
    return {name: fid_against_reference(extractor, reference, images) for name, images in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-domain", type=int, default=10_000)
    parser.add_argument("--n-fid", type=int, default=1_000)
    parser.add_argument("--root", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    train, labels = uint8_images("train", args.root)
    test, _ = uint8_images("test", args.root)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        cache = Path(cache)
        start = time.perf_counter()
        domain = domain_features("FashionMNIST", train, labels, 10, cache).to(args.device)
        n = args.n_domain
        values = scores(domain, train[:n], candidates(test[:n]), "domain", cache)
        rows.append(("fid_domain", n, values, time.perf_counter() - start, domain.accuracy))
        if args.n_fid:
            start = time.perf_counter()
            n = args.n_fid
            inception = InceptionFeatures().to(args.device)
            values = scores(inception, train[:n], candidates(test[:n]), "fid", cache)
            rows.append(("fid (standard)", n, values, time.perf_counter() - start, None))
    print("| metric | n per set | train vs test | train vs blurred test | train vs uniform noise | seconds |")
    print("|---|---|---|---|---|---|")
    for metric, n, values, seconds, accuracy in rows:
        label = metric + (f" (classifier held-out accuracy {accuracy:.3f})" if accuracy is not None else "")
        cells = " | ".join(f"{values[k]:.3g}" for k in ("test", "blurred test", "uniform noise"))
        print(f"| {label} | {n} | {cells} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
