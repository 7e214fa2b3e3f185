"""Training throughput: fewstep's Lightning step against a bare PyTorch loop, or with bf16 and torch.compile.

Default (overhead): both sides train the same method (network, EDM loss), on the same batches, with
the same Adam, learning-rate schedule and EMA update; the Lightning side runs the Trainer with
fewstep's default EMAWeightAveraging, LR monitor and TensorBoard logging (no validation, no
checkpoints). Runs alternate (bare, lightning, bare, ...) so that machine noise hits both alike.

``--speedups``: the Lightning step on the best device here (a GPU if there is one) in four settings,
fp32 / bf16-mixed precision x eager / ``compile=true`` (``torch.compile`` of the network, as
``python -m fewstep.train compile=true`` does), in images per second and as ratios to fp32 eager,
measured in one run (settings interleaved across repeats) with the device named.

    python tools/bench_train.py [--model unet_small] [--steps 100] [--repeats 3] [--batch-size 32]
    python tools/bench_train.py --speedups --model unet_cifar --data cifar10 --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from fewstep.bench import cpu_name
from fewstep.cli import CONF_DIR
from fewstep.methods import BatchNoise


class StopWatch(L.Callback):
    """Times the training steps after ``warmup`` (so both sides skip start-up the same way)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.warmup


def build(cfg):
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    method = instantiate(cfg.method, net=cfg.model, data_shape=datamodule.shape, num_classes=datamodule.num_classes)
    datamodule.setup("fit")
    return datamodule, method


def bare_loop(cfg, steps: int, warmup: int) -> float:
    datamodule, method = build(cfg)
    optimizer, scheduler = (lambda c: (c["optimizer"], c["lr_scheduler"]["scheduler"]))(method.configure_optimizers())
    # The same per-parameter EMA update that EMAWeightAveraging does, so only the loop machinery differs.
    ema = AveragedModel(method, avg_fn=get_ema_avg_fn(cfg.callbacks.ema.decay), use_buffers=True)
    method.train()
    batches = iter(())
    loader = datamodule.train_dataloader()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        try:
            x0, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x0, y = next(batches)
        rng = BatchNoise(len(x0), x0.device)  # torch's global generator, as the Lightning loop's own draws cost the same
        loss = method.loss(x0, method.training_labels(y, rng), rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(method)
    return steps / (time.perf_counter() - start)


def lightning_loop(cfg, steps: int, warmup: int, accelerator: str = "cpu", precision: str = "32-true",
                   compiled: bool = False) -> float:
    datamodule, method = build(cfg)
    if compiled:
        method.net.compile()  # what fit() does for compile=true; compiling happens in the untimed warm-up steps
    watch = StopWatch(warmup)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, precision=precision, max_steps=warmup + steps, limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=cfg.trainer.log_every_n_steps,
            logger=TensorBoardLogger(logdir), callbacks=[EMAWeightAveraging(decay=cfg.callbacks.ema.decay),
                                                        LearningRateMonitor("step"), watch],
        )
        trainer.fit(method, datamodule=datamodule)
    return watch.steps / watch.seconds


SETTINGS = [("32-true", False), ("bf16-mixed", False), ("32-true", True), ("bf16-mixed", True)]


def device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def speedups(cfg, args) -> None:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 rows, as a GPU user would run them
    rates = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for precision, compiled in SETTINGS:
            steps_per_second = lightning_loop(cfg, args.steps, args.warmup, accelerator, precision, compiled)
            rates[(precision, compiled)].append(steps_per_second * args.batch_size)
    base = statistics.median(rates[SETTINGS[0]])
    print(f"{device_name(accelerator)}; torch {torch.__version__}, lightning {L.__version__}; {args.method}, "
          f"{args.model}, {args.data}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, "
          f"median of {args.repeats}")
    print("| precision | torch.compile | images/s | vs fp32 eager |")
    print("|---|---|---|---|")
    for (precision, compiled), values in rates.items():
        rate = statistics.median(values)
        print(f"| {precision} | {'yes' if compiled else 'no'} | {rate:.1f} | {rate / base:.2f}x |")
    print("all runs (images/s):", {f"{p} {'compiled' if c else 'eager'}": [round(v, 1) for v in vs]
                                   for (p, c), vs in rates.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet_small")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--method", default="edm_teacher")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speedups", action="store_true", help="fp32/bf16 x eager/compiled on the best device here")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"model={args.model}", f"data={args.data}", f"method={args.method}",
            f"data.batch_size={args.batch_size}", "paths.output_dir=.",
        ])
    if args.speedups:
        return speedups(cfg, args)
    rates = {"bare": [], "lightning": []}
    for _ in range(args.repeats):
        rates["bare"].append(bare_loop(cfg, args.steps, args.warmup))
        rates["lightning"].append(lightning_loop(cfg, args.steps, args.warmup))
    bare, lit = statistics.median(rates["bare"]), statistics.median(rates["lightning"])
    print("| setting | bare PyTorch steps/s | fewstep Lightning steps/s | overhead |")
    print("|---|---|---|---|")
    print(f"| {args.method}, {args.model}, {args.data}, batch {args.batch_size}, {torch.get_num_threads()} threads "
          f"| {bare:.3f} | {lit:.3f} | {100 * (bare / lit - 1):+.1f}% |")
    print("all runs (steps/s):", {k: [round(v, 3) for v in vs] for k, vs in rates.items()})


if __name__ == "__main__":
    main()
