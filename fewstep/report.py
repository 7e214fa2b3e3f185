"""python -m fewstep.report DIR: the result.json rows under DIR (an evaluate multirun) as a table and a plot.

Writes DIR/report.md (one table per metric: a row per sampler setting, a column per NFE actually
used) and DIR/<metric>_vs_nfe.png, and prints the tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fewstep.cli import fail, line_buffered_output
from fewstep.metrics.curves import grid, markdown, plot, tables


def read_rows(directory: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.rglob("result.json"))]


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
    line_buffered_output()
    if len(argv) != 1:
        fail("usage: python -m fewstep.report DIR (the directory of an evaluate multirun)")
    report(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
