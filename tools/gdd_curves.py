"""One-step FID of GDD runs against the number of training images seen, beside the teacher.

    python tools/gdd_curves.py SWEEP_DIR [--teacher-rows students.json] [--out DIR]

SWEEP_DIR is a ``python -m fewstep.train -m hparams_search=gdd_freeze callbacks=benchmark
'callbacks.sampler_benchmark.samplers=[euler]' 'callbacks.sampler_benchmark.nfe=[1]'`` multirun: each
job's ``benchmark/results.jsonl`` holds the one-step FID of its EMA generator at every benchmark step.
Images seen = step x data.batch_size. ``--teacher-rows`` takes the teacher rows of
``tools/bench_students.py`` (same metric, n and seeds) as reference lines. Writes ``gdd_curves.md``
and ``gdd_curves.png`` to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fewstep.checkpoints import method_from_checkpoint, read_checkpoint  # noqa: E402


def runs(sweep: Path) -> list[dict]:
    """Per job: its label, frozen fraction, and (images seen, FID) points."""
    out = []
    for config in sorted(sweep.glob("*/.hydra/config.yaml")):
        job = config.parent.parent
        cfg = OmegaConf.load(config)
        rows = [json.loads(line) for path in job.rglob("benchmark/results.jsonl") for line in path.read_text().splitlines()]
        if not rows:
            continue
        freeze = cfg.method.freeze
        label = f"level {freeze.level}" if freeze.get("ratio") is None else f"ratio {freeze.ratio}"
        ckpt = job / "checkpoints" / "last.ckpt"
        fraction = None
        if ckpt.exists():  # the fraction GDD-I reached, as the method computes it when built
            checkpoint = read_checkpoint(ckpt)
            fraction = method_from_checkpoint(checkpoint, ckpt).frozen_fraction
        points = sorted((r["step"] * int(cfg.data.batch_size), r["value"]) for r in rows)
        out.append({"label": label, "frozen": fraction, "points": points, "metric": rows[0]["metric"], "n": rows[0]["n"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--teacher-rows", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("outputs/gdd_curves"))
    args = parser.parse_args()

    jobs = runs(args.sweep)
    if not jobs:
        raise SystemExit(f"no benchmark/results.jsonl under {args.sweep}: run the multirun with callbacks=benchmark")
    teacher = []
    if args.teacher_rows:
        teacher = [r for r in json.loads(args.teacher_rows.read_text()) if r["what"] == "teacher"]
    seen = sorted({images for job in jobs for images, _ in job["points"]})
    metric, n = jobs[0]["metric"], jobs[0]["n"]
    lines = [
        f"| GDD run | frozen | best {metric} (n = {n}) | at images seen | "
        + " | ".join(f"{images // 1000}k" for images in seen) + " |",
        "|---|---|---|---|" + "---|" * len(seen),
    ]
    for job in jobs:
        values = dict(job["points"])
        best_images, best = min(job["points"], key=lambda p: p[1])
        frozen = f"{job['frozen']:.0%}" if job["frozen"] is not None else ""
        cells = " | ".join(f"{values[i]:.3g}" if i in values else "" for i in seen)
        lines.append(f"| {job['label']} | {frozen} | **{best:.3g}** | {best_images // 1000}k | {cells} |")
    for r in teacher:
        lines.append(f"| teacher, {r['sampler']} at {r['nfe']} NFE | | {r['value']:.3g} | | " + " | " * (len(seen) - 1) + " |")
    table = "\n".join(lines) + "\n"
    print(table)

    fig, axes = plt.subplots(figsize=(7, 4))
    for i, job in enumerate(jobs):
        axes.plot([p[0] for p in job["points"]], [p[1] for p in job["points"]], marker="o", color=f"C{i}", label=f"GDD {job['label']}")
    for r in teacher:
        axes.axhline(r["value"], color="grey", ls=":", lw=1)
        axes.annotate(f"teacher {r['sampler']} {r['nfe']} NFE", (seen[0], r["value"]), fontsize=7, color="grey")
    axes.set(yscale="log", xlabel="training images seen", ylabel=f"one-step {metric}", title="GDD / GDD-I on MNIST-5k")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "gdd_curves.png", dpi=120)
    (args.out / "gdd_curves.md").write_text(table)


if __name__ == "__main__":
    main()
