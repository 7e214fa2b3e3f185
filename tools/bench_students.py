"""FID and diversity of distilled students at 1, 2 and 4 steps beside their teacher at ~35 NFE.

    python tools/bench_students.py --teacher CKPT LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--n 1000] [--out DIR]
    python tools/bench_students.py --rows A/students.json B/students.json --out DIR   # one table from earlier runs

Each RUN_DIR is a ``python -m fewstep.train method=...`` run of progressive, consistency or dmd2 (ddil=default or not):
a staged run (progressive rounds ``stage<i>_<N>steps``) gives its N-step students at N in --steps, a
consistency student is sampled at every N in --steps (``sampler=consistency``), a DMD2 student at its
own step count. Every row goes through ``fewstep.evaluate`` with metric=fid_domain (the same numbers as
``python -m fewstep.evaluate``), which also reports precision, recall and class coverage. Writes
``students.md`` (the table), ``students.json`` (the rows) and ``students.png`` (FID and recall against
steps) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from fewstep.checkpoints import read_checkpoint  # noqa: E402
from fewstep.cli import CONF_DIR  # noqa: E402
from fewstep.evaluate import evaluate  # noqa: E402


def jobs_of(label: str, run: Path, steps: list[int]) -> list[tuple[str, Path, str, int]]:
    """(label, checkpoint, sampler, NFE) for the students of one run."""
    stages = sorted(run.glob("stage*_*steps/checkpoints/last.ckpt"))
    if stages:
        by_steps = {int(p.parts[-3].split("_")[1][: -len("steps")]): p for p in stages}
        return [(label, by_steps[n], "euler", n) for n in steps if n in by_steps]
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"no checkpoints/last.ckpt or stage checkpoints under {run}")
    hparams = read_checkpoint(ckpt)["hyper_parameters"]
    if "student_steps" in hparams and "critic_steps" in hparams:  # DMD2: its own number of steps
        return [(label, ckpt, "consistency", int(hparams["student_steps"]))]
    return [(label, ckpt, "consistency", n) for n in steps]


def measure(ckpt: Path, sampler: str, nfe: int, n: int, out: Path) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"ckpt={ckpt}", f"sampler={sampler}", f"nfe={nfe}", f"n={n}", "metric=fid_domain", f"paths.output_dir={out}",
        ])
    return evaluate(cfg)


def figure(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    teacher = [r for r in rows if r["what"] == "teacher"]
    labels = sorted({r["what"] for r in rows} - {"teacher"})
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r["what"] == label), key=lambda r: r["nfe"])
        style = "--" if label.startswith("ddil") else "-"
        for ax, key in zip(axes, ("value", "recall")):
            ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], style, marker="o", color=f"C{i % 10}", label=label)
    for ax, key, name in zip(axes, ("value", "recall"), ("fid_domain", "recall")):
        for r in teacher:
            ax.axhline(r[key], color="grey", lw=0.8, ls=":")
            ax.annotate(f"teacher {r['sampler']} {r['nfe']} NFE", (1, r[key]), fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4])
        ax.set_xticklabels(["1", "2", "4"])
        ax.set_xlabel("student steps (NFE)")
        ax.set_ylabel(name)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="LABEL=RUN_DIR")
    parser.add_argument("--teacher", type=Path, default=None, help="the teacher's checkpoint (its rows come first)")
    parser.add_argument("--rows", type=Path, nargs="*", default=[], help="students.json files of earlier runs to include")
    parser.add_argument("--teacher-samplers", default="heun:35,seeds3:34")
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_students"))
    args = parser.parse_args()

    steps = [int(s) for s in args.steps.split(",")]
    jobs = [("teacher", args.teacher, *spec.split(":")) for spec in args.teacher_samplers.split(",") if args.teacher]
    for item in args.runs:
        label, _, run = item.partition("=")
        jobs += jobs_of(label, Path(run), steps)
    rows = [row for path in args.rows for row in json.loads(path.read_text())]
    for i, (what, ckpt, sampler, nfe) in enumerate(jobs):
        rows.append({"what": what, **measure(ckpt, sampler, int(nfe), args.n, args.out / f"{i:02d}")})
    lines = [
        f"| model | sampler | NFE | fid_domain (n = {args.n}) | precision | recall | class entropy | rarest class share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['sampler']} | {r['nfe']} | {r['value']:.4g} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['class_entropy']:.4f} | {r['min_class_share']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "students.md").write_text(table)
    (args.out / "students.json").write_text(json.dumps(rows, indent=2))
    figure(rows, args.out / "students.png")


if __name__ == "__main__":
    main()
