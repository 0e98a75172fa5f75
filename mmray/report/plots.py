"""The report's figures as PNG files (matplotlib's Agg backend, imported only when drawing).

Each function draws one figure from series that `mmray.report.compare` computed and returns the
file it wrote. Error bars are the 95% confidence intervals of the mean over seeds; a point with
n = 1 has none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mmray.report.compare import Line, Point
from mmray.report.stats import Summary

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _err(s: Summary | None) -> tuple[float, float]:
    """(below, above) the mean: the CI's half-widths, zero where the CI is undefined."""
    if s is None or s.ci is None or s.mean is None:
        return 0.0, 0.0
    return s.mean - s.ci[0], s.ci[1] - s.mean


def _errorbar(ax, points: list[Point], label: str, **kw) -> None:
    ys = [p.y.mean for p in points]
    yerr = [[_err(p.y)[0] for p in points], [_err(p.y)[1] for p in points]]
    ax.errorbar([p.x for p in points], ys, yerr=yerr, label=label, capsize=3, marker="o", **kw)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")  # then renamed: never a half-written figure
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path


def _grid(n: int, width: float = 4.0, height: float = 3.0):
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def curves(per_cell: dict[str, dict[str, tuple[list[int], list[float]]]], ylabel: str,
           path: Path) -> Path:
    """One panel per cell: the fused and each modality's validation metric against epoch."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _grid(len(per_cell))
    for ax, (cell, series) in zip(axes, per_cell.items()):
        for name, (steps, means) in series.items():
            ax.plot(steps, means, marker=".", label=name)
        ax.set_title(cell, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{ylabel} (mean over seeds)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def against_rate(panels: dict[str, list[Line]], metric: str, path: Path) -> Path:
    """One panel per missing type (or one for the grid axis), one line per cell, CI error bars."""
    fig, axes = _grid(len(panels), width=5.0, height=3.5)
    for ax, (title, lines) in zip(axes, panels.items()):
        for line in lines:
            _errorbar(ax, line.points, line.label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("missing rate")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    return _save(fig, path)


def against_flops(points: list[Point], metric: str, path: Path) -> Path:
    """One labelled point per cell: FLOPs per sample against the metric, CI error bars on both."""
    fig, axes = _grid(1, width=6.0, height=4.5)
    ax = axes[0]
    for p in points:
        xerr = [[_err(p.x_summary)[0]], [_err(p.x_summary)[1]]]
        yerr = [[_err(p.y)[0]], [_err(p.y)[1]]]
        ax.errorbar([p.x], [p.y.mean], xerr=xerr, yerr=yerr, marker="o", capsize=3)
        ax.annotate(p.label, (p.x, p.y.mean), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("FLOPs per sample")
    ax.set_ylabel(metric)
    return _save(fig, path)
