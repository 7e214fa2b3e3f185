"""Is there a covariate shift for DDIL to correct? A student's own training loss on the states it visits when
sampling, against the forward-diffused states it trained on (issue 17: DDIL better at 1-2 steps).

    python tools/ddil_shift.py STUDENT.ckpt [STUDENT.ckpt ...] [--sample-steps 1 2 4] [--n 512] [--out DIR]
    python tools/ddil_shift.py --summarise DIR/seed*/ddil_shift.json     # mean and std over training seeds

DDIL (Garrepalli et al., arXiv 2410.11971) trains on the student's own backward rollouts because a student trained
on forward-diffused data x0 + sigma n meets other states when it samples, and its errors compound there (DAgger).
That premise is measurable: at each level the student visits, its training loss (``state_loss``, the quantity it
minimises) on n states of each source, with the same randomness for every source:

- ``fwd``: forward-diffused training images (images 0..n-1); ``fwd2``: images n..2n-1 with other noise, so
  ``fwd2 / fwd`` is the sampling spread of the ratio;
- ``teacher``: the teacher's DDIM rollouts; ``student``: the student's own rollouts (its sampler and grid), as
  DDIL's buffers fill them (``DistilledStudent.rollout``, seeds 2^62 + i).

``student / fwd`` well above ``fwd2 / fwd`` is a covariate shift; near 1 there is none for DDIL's student rollouts
to correct. Consistency students are measured at each ``--sample-steps`` (their rollouts follow it); progressive and
DMD2 students at their own steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import instantiate

from fewstep.checkpoints import load_method
from fewstep.evaluate import training_config
from fewstep.methods.noise import BatchNoise
from fewstep.methods.student import level_index

SOURCES = ("fwd", "fwd2", "teacher", "student")


def attached(ckpt: Path):
    """The student of ``ckpt`` with its frozen teacher attached, and every saved weight kept (attaching resets the
    consistency target and DMD2's critic)."""
    student = load_method(ckpt)
    saved = {name: value.clone() for name, value in student.state_dict().items()}
    student.attach_teacher(load_method(student.hparams.teacher_ckpt), init_student=False)
    student.load_state_dict(saved)
    return student.eval()


@torch.no_grad()
def source_states(method, x0: torch.Tensor, n: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per source, n states at each level the student's rollouts visit: {source: (x [L n, ...], level index [L n])}."""
    x_student, sigma_student, _ = method.rollout("student", n)
    levels = method.state_sigmas
    visited = sorted(set(level_index(sigma_student, levels).tolist()))
    x_teacher, sigma_teacher, _ = method.rollout("teacher", n)
    out = {}
    generator = torch.Generator().manual_seed(seed)
    for name, images in (("fwd", x0[:n]), ("fwd2", x0[n: 2 * n])):
        noise = torch.randn((len(visited), *images.shape), generator=generator)
        out[name] = (torch.cat([images + levels[k] * noise[i] for i, k in enumerate(visited)]),
                     torch.tensor(visited).repeat_interleave(n))
    for name, x, sigma in (("teacher", x_teacher, sigma_teacher), ("student", x_student, sigma_student)):
        k = level_index(sigma, levels)
        keep = torch.isin(k, torch.tensor(visited))
        out[name] = (x[keep], k[keep])
    return out


@torch.no_grad()
def level_losses(method, states: dict, seed: int, batch_size: int = 256) -> list[dict]:
    """Per visited level: sigma and the mean ``state_loss`` on each source's states, every source with the same draws."""
    levels = method.state_sigmas
    rows = []
    for k in sorted(set(states["fwd"][1].tolist())):
        row = {"level": k, "sigma": float(levels[k])}
        for name, (x, index) in states.items():
            xs = x[index == k]
            total = 0.0
            for start in range(0, len(xs), batch_size):
                batch = xs[start: start + batch_size]
                rng = BatchNoise.fixed(seed + start, len(batch), batch.device)
                total += float(method.state_loss(batch, torch.full((len(batch),), k), None, rng)) * len(batch)
            row[name] = total / len(xs)
        rows.append(row)
    return rows


def measure(ckpt: Path, sample_steps: list[int], n: int, seed: int) -> list[dict]:
    """The rows of one student checkpoint (one per sample-step count and visited level)."""
    method = attached(ckpt)
    cfg = training_config(str(ckpt), None)
    x0 = instantiate(cfg.data).real_images(2 * n).float() / 127.5 - 1
    consistency = "sample_steps" in method.hparams
    rows = []
    for steps in sample_steps if consistency else [len(method.student_sigmas) - 1]:
        if consistency:
            method.hparams.sample_steps = steps
        for row in level_losses(method, source_states(method, x0, n, seed), seed):
            rows.append({"ckpt": str(ckpt), "method": type(method).__name__.lower(), "steps": steps,
                         "ddil": method.hparams.ddil is not None, **row,
                         **{f"{s}/fwd": row[s] / row["fwd"] if row["fwd"] else float("nan") for s in SOURCES[1:]}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows: list[dict]) -> list[str]:
    """One line per (method, steps, DDIL, level): each ratio's mean and std over the checkpoints (training seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["steps"], row["ddil"], round(row["sigma"], 4)), []).append(row)
    lines = ["| student | steps | DDIL | sigma | seeds | fwd2 / fwd | teacher / fwd | student / fwd |", "|---|---|---|---|---|---|---|---|"]
    for (name, steps, ddil, sigma), group in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2], -g[0][3])):
        cells = []
        for key in ("fwd2/fwd", "teacher/fwd", "student/fwd"):
            values = torch.tensor([r[key] for r in group], dtype=torch.float64)
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}")
        lines.append(f"| {name} | {steps} | {'yes' if ddil else 'no'} | {sigma:.3g} | {len(group)} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpts", type=Path, nargs="*")
    parser.add_argument("--summarise", type=Path, nargs="+", help="instead: the table over these ddil_shift.json files")
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[1, 2, 4], help="consistency students only")
    parser.add_argument("--n", type=int, default=512, help="states per source and level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/ddil_shift"))
    args = parser.parse_args()
    if args.summarise:
        lines = summarise([row for path in args.summarise for row in json.loads(path.read_text())])
        print("\n".join(lines))
        return
    torch.manual_seed(args.seed)
    rows = [row for ckpt in args.ckpts for row in measure(ckpt, args.sample_steps, args.n, args.seed)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddil_shift.json").write_text(json.dumps(rows, indent=2))
    lines = ["| checkpoint | steps | sigma | loss on fwd | fwd2 / fwd | teacher / fwd | student / fwd |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ckpt']} | {r['steps']} | {r['sigma']:.3g} | {r['fwd']:.3g} | {r['fwd2/fwd']:.3f} | "
              f"{r['teacher/fwd']:.3f} | {r['student/fwd']:.3f} |" for r in rows]
    print("\n".join(lines))
    (args.out / "ddil_shift.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
