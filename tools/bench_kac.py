"""FID of a Kac teacher against its kac_endpoint students, each at its own step count.

    python tools/bench_kac.py RUN_DIR [--direct RUN_DIR] [--n 2000] [--metric fid_domain]

RUN_DIR is a ``python -m fewstep.train method=kac_endpoint`` run: its stages' checkpoints are
``RUN_DIR/stage<i>_<M>steps/checkpoints/last.ckpt`` and the teacher is the one its first stage
names. ``--direct`` adds another such run (e.g. ``method.stages=[100,1]``: a student distilled to
one step without intermediate stages). Every row goes through ``fewstep.evaluate`` (the same
numbers as ``python -m fewstep.evaluate``); the table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fewstep.checkpoints import read_checkpoint
from fewstep.cli import CONF_DIR
from fewstep.evaluate import evaluate


def stage_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(student steps, checkpoint) of each stage of a staged run, in stage order."""
    stages = sorted(run.glob("stage*_*steps/checkpoints/last.ckpt"), key=lambda p: int(p.parts[-3][5:].split("_")[0]))
    return [(int(p.parts[-3].split("_")[1][: -len("steps")]), p) for p in stages]


def measure(ckpt: Path, sampler: str, nfe: int, n: int, metric: str, out: Path) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"ckpt={ckpt}", f"sampler={sampler}", f"nfe={nfe}", f"n={n}", f"metric={metric}", f"paths.output_dir={out}",
        ])
    return evaluate(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--direct", type=Path, default=None)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--metric", default="fid_domain")
    parser.add_argument("--teacher-samplers", default="kac_euler,kac_ab2")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_kac"))
    args = parser.parse_args()

    stages = stage_checkpoints(args.run)
    if not stages:
        raise SystemExit(f"no stage checkpoints under {args.run}: pass the directory of a method=kac_endpoint run")
    first = read_checkpoint(stages[0][1])["hyper_parameters"]
    teacher, teacher_steps = Path(first["teacher_ckpt"]), first["teacher_steps"]
    jobs = [("teacher", teacher, s, teacher_steps) for s in args.teacher_samplers.split(",")]
    jobs += [(f"stage {i} student", ckpt, "kac_euler", steps) for i, (steps, ckpt) in enumerate(stages, start=1)]
    if args.direct:
        jobs += [(f"direct {steps}-step student", ckpt, "kac_euler", steps) for steps, ckpt in stage_checkpoints(args.direct)[-1:]]

    rows = []
    for i, (what, ckpt, sampler, nfe) in enumerate(jobs):
        row = measure(ckpt, sampler, nfe, args.n, args.metric, args.out / f"{i:02d}")
        rows.append({"what": what, **row})
    teacher_value = min(r["value"] for r in rows if r["what"] == "teacher")
    lines = [
        f"| model | sampler | NFE | {args.metric} (n = {args.n}) | / best teacher | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['sampler']} | {r['nfe']} | {r['value']:.4g} | {r['value'] / teacher_value:.2f} | "
            f"{r['images_per_second']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kac.md").write_text(table)
    (args.out / "bench_kac.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
