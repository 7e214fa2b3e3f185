"""Faint background noise of generated images (issue 17): the dark-pixel fraction and fid_domain per checkpoint.

    python tools/kac_dark_pixels.py KAC.ckpt[:SAMPLER:NFE[:key=value;...]] ... [--n 1000] [--out DIR]

Each argument is a checkpoint, optionally with a sampler, its NFE and sampler options (defaults:
kac_euler at 100 NFE for a Kac model, heun at 35 for an EDM one), e.g.
``outputs/kac_teacher/.../last.ckpt:kac_ab2:100`` or ``'.../last.ckpt:kac_euler:100:denoise=[]'`` (a Kac
model without its final denoising jumps: the sampler before issue 17's fix). Values are YAML.
Every model draws the same seeds (``--seed`` .. ``--seed + n - 1``); a row for the real training
images (the first n) comes first, and the scores go through the same functions as
``python -m fewstep.evaluate metric=fid_domain`` (real statistics of the first n training images).

The dark-pixel fraction needs no reference image: on the uint8 scale 0..255, among the pixels at
most 64 (dark: background and the feet of strokes), the fraction above 8 (faint but visible, not
black). MNIST's backgrounds are exactly 0, so on real images the fraction counts only the
anti-aliased edges of strokes; a sampler that leaves a little noise on a black background raises it.
The table also gives the share of noisy images (over a quarter of their own dark pixels faint: no real digit),
the mean of the dark pixels and the fraction of all pixels that are exactly 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from fewstep.checkpoints import load_method
from fewstep.evaluate import training_config
from fewstep.generate import generate
from fewstep.images import to_uint8
from fewstep.metrics.diversity import DARK, FAINT, NOISY, dark_pixel_stats
from fewstep.metrics.score import feature_extractor, reference_key, score
from fewstep.run_config import build_data


def parse_model(spec: str) -> tuple[Path, str | None, int | None, dict]:
    """PATH[:SAMPLER:NFE[:key=value;...]] -> (path, sampler, nfe, options), each value read as YAML."""
    parts = spec.split(":")
    path, sampler, nfe, options = Path(parts[0]), None, None, {}
    if len(parts) >= 3:
        sampler, nfe = parts[1], int(parts[2])
    if len(parts) >= 4 and parts[3]:
        for item in parts[3].split(";"):
            key, _, value = item.partition("=")
            options[key] = yaml.safe_load(value)
    return path, sampler, nfe, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="CKPT[:SAMPLER:NFE[:key=value;...]]")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--no-fid", action="store_true", help="dark-pixel statistics only")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/fewstep").expanduser())
    parser.add_argument("--out", type=Path, default=Path("outputs/kac_dark_pixels"))
    args = parser.parse_args()

    first = parse_model(args.models[0])[0]
    train_cfg = training_config(str(first), None)
    datamodule = build_data(train_cfg.data)
    real = datamodule.real_images(args.n)
    data_name = train_cfg.data._target_.rpartition(".")[2]
    extractor = key = None
    if not args.no_fid:
        extractor = feature_extractor("fid_domain", datamodule, data_name, args.cache_dir)
        key = reference_key(data_name, datamodule.shape, "fid_domain", len(real))

    def fid(images):
        return None if extractor is None else score("fid_domain", extractor, real, images, key, args.cache_dir, args.batch_size)

    rows = [{"model": "real (training images)", "sampler": "", "nfe": 0, **dark_pixel_stats(real), "fid_domain": fid(real)}]
    for spec in args.models:
        path, sampler, nfe, options = parse_model(spec)
        method = load_method(path)
        kac = hasattr(method, "path")
        sampler = sampler or ("kac_euler" if kac else "heun")
        nfe = nfe or (100 if kac else 35)
        start = time.perf_counter()
        samples, _, used = generate(method, args.n, sampler, nfe, args.seed, batch_size=args.batch_size, **options)
        seconds = time.perf_counter() - start
        images = to_uint8(samples)
        rows.append({
            "model": str(path), "sampler": sampler + "".join(f" {k}={v}" for k, v in options.items()), "nfe": used,
            **dark_pixel_stats(images), "fid_domain": fid(images), "seconds": seconds,
        })
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"| model | sampler | NFE | dark fraction (>{FAINT} among <={DARK}) | noisy images (own > {NOISY}) | mean dark | exact zeros "
        f"| fid_domain (n = {args.n}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fid_text = "" if r["fid_domain"] is None else f"{r['fid_domain']:.3g}"
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['dark_fraction']:.4f} | {r['noisy_share']:.3f} | {r['dark_mean']:.2f} | "
            f"{r['zero_fraction']:.3f} | {fid_text} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kac_dark_pixels.md").write_text(table)
    (args.out / "kac_dark_pixels.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
