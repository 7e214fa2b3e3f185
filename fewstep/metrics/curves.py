"""Metric-against-NFE curves from result rows: tables (markdown) and figures, for fewstep.report and the
SamplerBenchmark callback alike."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


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
