"""The end-of-run summary of a staged distillation (kac_endpoint's stages, progressive's rounds).

The teacher and every stage's student are scored alike, each with its own sampler at its own steps: fid_domain
against the run's training images, its ratio to the teacher's, and the share of noisy images (``noisy_share``),
beside each stage's training time. The rows are printed as one table at the end of the run and written to the run
directory as ``summary.json`` and ``summary.md``; ``stages.png`` shows the same seeds drawn by every model, one row
each. TensorBoard gets the table as text and the figure (``<run>/tensorboard``). ``summary=false`` skips it all.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fewstep import layout, rundir
from fewstep.atomic import atomic_write
from fewstep.errors import ConfigError, FewstepError
from fewstep.progress import duration

METRIC = "fid_domain"
DEFAULTS = {"n": 1000, "seeds": 8, "seed": 0}
DEBUG_N = 32  # trainer=debug checks that the summary runs, and scores this many images at most
COLUMNS = ("stage", "steps", "sampler", METRIC, "ratio", "noisy_share", "train_time")


@dataclass
class Model:
    """One row's model: the teacher or a stage's student, drawn with ``sampler`` (name and options) at ``steps``."""

    name: str
    steps: int
    sampler: dict
    ckpt: Path
    seconds: float | None  # its training time in this run; None: reused from an earlier run


def settings(cfg: DictConfig) -> dict | None:
    """The ``summary`` node with its defaults (n, seeds, seed), or None when ``summary=false``; checked, so that a bad
    value fails before the stages train, not after."""
    node = cfg.get("summary", True)
    if node is False or node is None:
        return None
    chosen = {**DEFAULTS, **(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {})}
    for key, least in (("n", 2), ("seeds", 1), ("seed", 0)):
        if isinstance(chosen[key], bool) or not isinstance(chosen[key], int) or chosen[key] < least:
            raise ConfigError(f"summary.{key}={chosen[key]}: use a whole number >= {least} (or summary=false: no summary)")
    if cfg.get("debug"):
        chosen["n"] = min(int(chosen["n"]), DEBUG_N)
    return chosen


def summarise(cfg: DictConfig, models: list[Model], data_shape: list[int], num_classes: int) -> dict | None:
    """Score ``models`` (the teacher first), print the table and write the summary files; None when switched off,
    or on data fid_domain cannot score (vectors, or images without class labels: its features are a classifier's).

    Any failure to score or write (a model whose samples are not finite, a full disk, a data set fid_domain cannot
    read) is one warning line naming the error: the summary is a report on work already saved, as every stage's
    checkpoint is written by then, and each can still be scored with ``python -m fewstep.evaluate``.
    """
    chosen = settings(cfg)
    if chosen is None or not rundir.is_rank_zero():
        return None
    if len(data_shape) != 3 or not num_classes:
        what = f"{list(data_shape)} vectors" if len(data_shape) != 3 else "images without class labels"
        rundir.info(f"no end-of-run summary: {METRIC} scores images of labelled classes, and this data holds {what}")
        return None
    run = Path(cfg.paths.output_dir)
    rundir.info(f"summary: scoring the teacher and {len(models) - 1} stages ({METRIC}, n = {chosen['n']}; summary=false "
                "skips it)")
    start, figure = time.perf_counter(), None
    try:
        # every row against the same training images: those of the run (a stage's saved config names them)
        data_config = layout.saved_config(layout.stage_dir(run, 1, models[1].steps))
        rows = [teacher_row(models[0], chosen, data_config), *(score(model, chosen, data_config) for model in models[1:])]
        figure = comparison_figure(models, chosen)
        summary = build(rows, chosen, seconds=time.perf_counter() - start)
        written = write(run, summary, figure)
        log_to_tensorboard(cfg, summary, figure)
    except Exception as error:  # any failure: a report on saved work (see the docstring)
        reason = str(error) if isinstance(error, FewstepError) else f"{type(error).__name__}: {error}"
        rundir.warn(f"the end-of-run summary failed ({reason}): the stages are trained; score one with "
                    f"python -m fewstep.evaluate ckpt=PATH metric={METRIC}, or skip the summary with summary=false")
        return None
    finally:
        if figure is not None:
            from matplotlib import pyplot as plt

            plt.close(figure)
    print_summary(summary, written)
    return summary


def score(model: Model, chosen: dict, data_config: Path) -> dict:
    """One row: ``model`` scored with its sampler at its steps (``fewstep.evaluate.evaluate_checkpoint``)."""
    from fewstep.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        model.ckpt, sampler=model.sampler, nfe=model.steps, n=chosen["n"], metric=METRIC, seed=chosen["seed"],
        data_config=str(data_config),
    )
    return {
        "stage": model.name, "steps": model.steps, "nfe": result["nfe"], "sampler": result["sampler"],
        METRIC: result["value"], "noisy_share": result.get("noisy_share"), "train_seconds": model.seconds,
        "n": result["n"], "ckpt": str(model.ckpt),
    }


def teacher_row(teacher: Model, chosen: dict, data_config: Path) -> dict:
    """``score`` of the teacher, kept in the cache directory: a later run that reuses the teacher (the same checkpoint
    file, sampler, steps, images and data) reads its row instead of sampling it again at the teacher's many steps."""
    from fewstep.evaluate import evaluate_config

    ckpt = Path(teacher.ckpt).resolve()
    data = OmegaConf.to_container(OmegaConf.load(data_config).data, resolve=True)
    key = [str(ckpt), ckpt.stat().st_mtime_ns, ckpt.stat().st_size, teacher.sampler, teacher.steps, chosen["n"],
           chosen["seed"], data]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(evaluate_config(ckpt).cache_dir).expanduser() / "stage_summary" / f"teacher_{digest}.json"
    try:
        row = json.loads(path.read_text())
        if row.get("ckpt") == str(teacher.ckpt) and isinstance(row.get(METRIC), float):
            rundir.info(f"summary: the teacher's row as scored by an earlier run ({path})")
            return {**row, "train_seconds": teacher.seconds}
    except (OSError, ValueError):  # not scored yet (or an unreadable file): score it
        pass
    row = score(teacher, chosen, data_config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(row).encode()))
    except OSError:  # a cache that cannot be written costs the next run the scoring, nothing else
        pass
    return row


def build(rows: list[dict], chosen: dict, seconds: float) -> dict:
    """summary.json's content: the rows (the teacher's first), each with its ratio to the teacher's score."""
    teacher = rows[0][METRIC]
    rows = [{**row, "ratio": row[METRIC] / teacher if teacher else None} for row in rows]
    return {"metric": METRIC, "n": chosen["n"], "seed": chosen["seed"], "scoring_seconds": seconds, "rows": rows}


def cells(row: dict) -> list[str]:
    """A row as the table shows it, in COLUMNS' order."""
    def number(value, form):
        return "-" if value is None else format(value, form)

    trained = "reused" if row["train_seconds"] is None else duration(row["train_seconds"])
    noisy = "-" if row.get("noisy_share") is None else f"{100 * row['noisy_share']:.1f}%"
    return [row["stage"], str(row["steps"]), row["sampler"], number(row[METRIC], ".2f"),
            number(row["ratio"], ".2f") + ("x" if row["ratio"] is not None else ""), noisy, trained]


def markdown(summary: dict) -> str:
    """summary.md: the table, with what was scored and how."""
    header = ["stage", "steps (NFE)", "sampler", f"{METRIC} (n = {summary['n']})", "ratio to teacher", "noisy images",
              "training time"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in summary["rows"]]
    note = (f"{METRIC} against the training images, seeds {summary['seed']} to {summary['seed'] + summary['n'] - 1} for "
            f"every model; scoring took {duration(summary['scoring_seconds'])}.")
    return "\n".join(lines + ["", note]) + "\n"


def table(summary: dict) -> Table:
    """The rich table printed at the end of the run."""
    out = Table(title=f"stages: {METRIC} at n = {summary['n']} against the training images")
    for column in COLUMNS:
        out.add_column(column, justify="left" if column in ("stage", "sampler") else "right")
    for row in summary["rows"]:
        out.add_row(*cells(row))
    return out


def comparison_figure(models: list[Model], chosen: dict):
    """The same seeds drawn by every model, one row each (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from torchvision.utils import make_grid

    from fewstep.checkpoints import load_method
    from fewstep.generate import generate

    count, rows = int(chosen["seeds"]), []
    for model in models:
        options = {key: value for key, value in model.sampler.items() if key != "name"}
        samples, _, _ = generate(load_method(model.ckpt), count, model.sampler["name"], model.steps, chosen["seed"], **options)
        rows.append(make_grid((samples.float().clamp(-1, 1) + 1) / 2, nrow=count, padding=1, pad_value=1.0))
    height = 0.9  # inches per row; the labels take the left 1.3
    fig, axes = plt.subplots(len(models), 1, squeeze=False,
                             figsize=(1.3 + height * rows[0].shape[2] / rows[0].shape[1], height * len(models) + 0.4))
    for axis, model, row in zip(axes[:, 0], models, rows):
        axis.imshow(row.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(f"{model.name}\n{model.steps} step{'s' * (model.steps != 1)}", rotation=0, ha="right", va="center",
                        fontsize=8)
    fig.suptitle(f"the same seeds ({chosen['seed']} to {chosen['seed'] + count - 1}) drawn by each model", fontsize=9)
    fig.tight_layout()
    return fig


def write(run: Path, summary: dict, figure) -> list[Path]:
    """summary.json, summary.md and stages.png in the run directory, each whole or not at all."""
    written = [atomic_write(run / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode())),
               atomic_write(run / "summary.md", lambda f: f.write(markdown(summary).encode()))]
    if figure is not None:
        written.append(atomic_write(run / "stages.png", lambda f: figure.savefig(f, format="png", dpi=120)))
    return written


def log_to_tensorboard(cfg: DictConfig, summary: dict, figure) -> None:
    """The table as text and the figure, through the run's TensorBoard logger (guarded: a full disk is a warning)."""
    for node in (cfg.get("logger") or {}).values():
        target = rundir.logger_target(node) if node is not None else {}
        if not target:
            continue
        logger = instantiate(node, **target)
        logger.experiment.add_text("summary/stages", markdown(summary))
        if figure is not None:
            logger.experiment.add_figure("summary/stages", figure, close=False)
        logger.finalize("success")


def print_summary(summary: dict, written: list[Path]) -> None:
    console = Console(soft_wrap=True)  # the paths stay whole, to be copied
    console.print(table(summary))
    console.print(f"[bold]summary[/]: scored in {duration(summary['scoring_seconds'])} (summary=false skips it): "
                  + ", ".join(escape(str(path)) for path in written))
