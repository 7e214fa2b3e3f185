"""The cost of DistillKac's student rollouts (``method.rollout_share``, issue 17): training steps per second with
and without them, per stage, measured in one run (settings interleaved across repeats).

    python tools/bench_kac_rollouts.py KAC_TEACHER.ckpt [--shares 0 1] [--stages 20 4] [--steps 20] [--repeats 3]

Each setting times ``--steps`` full training steps (the loss with the teacher's sub-steps and jumps, the
rollouts, backward and Adam) of a student made from the teacher, on batches of the teacher's data, after
two warm-up steps. Prints steps per second and the ratio to the first share.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.checkpoints import load_method
from fewstep.evaluate import training_config
from fewstep.methods import BatchNoise, KacEndpoint
from fewstep.methods.kac_teacher import KAC_HPARAMS
from fewstep.run_config import build_data


def student(teacher, teacher_steps: int, steps: int, share: float) -> KacEndpoint:
    model = KacEndpoint(
        net=teacher.hparams.net, data_shape=list(teacher.hparams.data_shape), student_steps=steps,
        teacher_steps=teacher_steps, rollout_share=share, **{key: teacher.hparams[key] for key in KAC_HPARAMS},
    )
    model.attach_teacher(teacher)
    return model


def time_steps(model: KacEndpoint, batches: list[torch.Tensor], steps: int) -> float:
    """Seconds per training step (loss, backward, Adam) over ``steps`` steps after two warm-up steps."""
    optimizer = torch.optim.Adam(model.net.parameters(), lr=2e-4)
    start = None
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        x0 = batches[i % len(batches)]
        loss = model.loss(x0, None, BatchNoise(len(x0), "cpu", torch.Generator().manual_seed(i)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher", help="a method=kac_teacher checkpoint")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--stages", type=int, nargs="+", default=[20, 4], help="student steps; the teacher takes 100")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    teacher = load_method(args.teacher).eval()
    data = build_data(training_config(args.teacher, None).data)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader)[0][: args.batch_size] for _ in range(4)]
    seconds = {(m, s): [] for m in args.stages for s in args.shares}
    for _ in range(args.repeats):
        for m in args.stages:
            for s in args.shares:
                seconds[(m, s)].append(time_steps(student(teacher, args.teacher_steps, m, s), batches, args.steps))
    print(f"| student steps | rollout_share | steps/s (median of {args.repeats}) | time per step / share {args.shares[0]:g} |")
    print("|---|---|---|---|")
    for m in args.stages:
        base = statistics.median(seconds[(m, args.shares[0])])
        for s in args.shares:
            median = statistics.median(seconds[(m, s)])
            print(f"| {m} | {s:g} | {1 / median:.2f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
