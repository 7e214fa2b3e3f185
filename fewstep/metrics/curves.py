"""Metric-against-NFE curves: tables (markdown) and figures, for fewstep.report, the SamplerBenchmark callback and
the tools alike (the one place that draws them). A curve maps NFE to a value: a number, or a summary over seeds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection
from math import isfinite
from pathlib import Path


def setting(row: dict) -> str:
    """What tells two curves apart: the sampler, its grid, the guidance scale, the guide (autoguidance) and the
    guidance interval when not the defaults."""
    label = row["sampler"]
    if row.get("grid") not in (None, "karras"):  # None: the model's default grid
        label += f" ({row['grid']})"
    if row.get("guidance"):
        label += f", w={row['guidance']:g}"
    if row.get("guide"):
        label += f", guide {Path(row['guide']).name}"
    if row.get("guidance_interval"):
        low, high = row["guidance_interval"]
        label += f", sigma in ({low:g}, {high:g}]"
    return label


def tables(rows: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> setting -> NFE -> value."""
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[row["metric"]][setting(row)][row["nfe"]] = row["value"]
    return out


def grid(
    curves: dict[str, dict], cell: Callable = "{:.4g}".format, columns: list | None = None, sort: bool = True
) -> tuple[list, list[list[str]]]:
    """The columns (every NFE, or ``columns``) and one row of cells per setting (a dash where it has no value)."""
    nfes = columns or sorted({nfe for curve in curves.values() for nfe in curve})
    items = sorted(curves.items()) if sort else curves.items()
    rows = [[name, *(cell(curve[k]) if k in curve else "-" for k in nfes)] for name, curve in items]
    return nfes, rows


def markdown_table(corner: str, columns: list, rows: list[list[str]]) -> list[str]:
    """A markdown table: ``corner`` and the columns as its header, then the rows."""
    lines = [f"| {corner} | " + " | ".join(map(str, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(metric: str, nfes: list[int], rows: list[list[str]], n: int) -> str:
    lines = [f"### {metric} against NFE (n = {n} generated images)", "", *markdown_table("sampler", nfes, rows)]
    return "\n".join(lines) + "\n"


def figure(
    metric: str, curves: dict[str, dict], title: str | None = None, xlabel: str = "NFE (counted)", xscale: str = "log",
    floor: float | None = None, dashed: Collection[str] = (), axes=None, sort: bool = True,
):
    """A matplotlib figure of ``metric`` against NFE, one line per setting (log-log unless told otherwise).

    A value is a number, or a summary over seeds with ``mean``, ``std`` and ``per_seed`` (drawn with error bars).
    ``floor``: a dotted line (the score of true samples); ``dashed``: the settings drawn dashed (peers); ``axes``:
    draw into these instead of a new figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(figsize=(6, 4)) if axes is None else (axes.figure, axes)
    for i, (name, curve) in enumerate(sorted(curves.items()) if sort else curves.items()):
        nfes = sorted(k for k in curve if isfinite(mean(curve[k])))
        if not nfes:
            continue
        # past the colour cycle's 10 colours, change the line style so that no two curves look alike
        style = {"linestyle": "--" if name in dashed else ("-", "--", ":", "-.")[i // 10 % 4], "marker": "os^D"[i // 10 % 4]}
        spread = [getattr(curve[k], "std", 0) if len(getattr(curve[k], "per_seed", ())) > 1 else 0 for k in nfes]
        axes.errorbar(nfes, [mean(curve[k]) for k in nfes], yerr=spread if any(spread) else None, label=name, capsize=3,
                      markersize=4, color=f"C{i % 10}", **style)
    if floor is not None:
        axes.axhline(floor, color="black", linestyle=":", label="noise floor")
    axes.set(xscale=xscale, yscale="log", xlabel=xlabel, ylabel=metric, title=title or f"{metric} against NFE")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mean(value) -> float:
    """A value, or the mean of a summary over seeds."""
    value = getattr(value, "mean", value)
    return float("nan") if value is None else float(value)


def plot(metric: str, curves: dict[str, dict], path: Path, **options) -> None:
    """``figure`` written to ``path`` (its folder made if needed)."""
    from matplotlib import pyplot as plt

    fig = figure(metric, curves, **options)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
