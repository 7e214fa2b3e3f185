"""python -m fewstep.report DIR: the result.json rows under DIR (an evaluate multirun) as a table and a plot.

Writes DIR/report.md (one table per metric: a row per sampler setting, a column per NFE actually
used) and DIR/<metric>_vs_nfe.png, and prints the tables.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fewstep.cli import fail


def read_rows(directory: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.rglob("result.json"))]


def setting(row: dict) -> str:
    """What tells two curves apart: the sampler, its grid and the guidance scale when not the defaults."""
    label = row["sampler"]
    if row.get("grid") not in (None, "karras"):  # None: the model's default grid
        label += f" ({row['grid']})"
    if row.get("guidance"):
        label += f", w={row['guidance']:g}"
    return label


def tables(rows: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> setting -> NFE -> value."""
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[row["metric"]][setting(row)][row["nfe"]] = row["value"]
    return out


def grid(curves: dict[str, dict[int, float]]) -> tuple[list[int], list[list[str]]]:
    """The NFE columns and one row of cells per setting (a dash where a setting has no run at that NFE)."""
    nfes = sorted({nfe for curve in curves.values() for nfe in curve})
    rows = [[name, *(f"{curve[k]:.4g}" if k in curve else "-" for k in nfes)] for name, curve in sorted(curves.items())]
    return nfes, rows


def markdown(metric: str, nfes: list[int], rows: list[list[str]], n: int) -> str:
    lines = [f"### {metric} against NFE (n = {n} generated images)", "", "| sampler | " + " | ".join(map(str, nfes)) + " |"]
    lines.append("|---" * (len(nfes) + 1) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(metric: str, curves: dict[str, dict[int, float]]):
    """A matplotlib figure of ``metric`` against NFE, one line per setting (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(figsize=(6, 4))
    for i, (name, curve) in enumerate(sorted(curves.items())):
        nfes = sorted(curve)
        # past the colour cycle's 10 colours, change the line style so that no two curves look alike
        style = {"linestyle": ("-", "--", ":", "-.")[i // 10 % 4], "marker": "os^D"[i // 10 % 4]}
        axes.plot(nfes, [curve[k] for k in nfes], label=name, **style)
    axes.set(xscale="log", yscale="log", xlabel="NFE (counted)", ylabel=metric, title=f"{metric} against NFE")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(metric: str, curves: dict[str, dict[int, float]], path: Path) -> None:
    from matplotlib import pyplot as plt

    fig = figure(metric, curves)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(directory: Path) -> Path:
    rows = read_rows(directory)
    if not rows:
        fail(f"no result.json under '{directory}': pass the directory of a 'python -m fewstep.evaluate -m ...' run")
    console, text = Console(), []
    for metric, curves in tables(rows).items():
        n = max(row["n"] for row in rows if row["metric"] == metric)
        nfes, cells = grid(curves)
        text.append(markdown(metric, nfes, cells, n))
        plot(metric, curves, directory / f"{metric}_vs_nfe.png")
        table = Table(title=f"{metric} against NFE")
        for column in ["sampler", *map(str, nfes)]:
            table.add_column(column)
        for row in cells:
            table.add_row(*row)
        console.print(table)
    path = directory / "report.md"
    path.write_text("\n".join(text))
    console.print(f"{len(rows)} results -> {path}")
    return path


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        fail("usage: python -m fewstep.report DIR (the directory of an evaluate multirun)")
    report(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
