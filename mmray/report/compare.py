"""The numbers of the comparison report, from the selected runs of each cell (no MLflow, no plots).

- per cell and metric: `stats.describe` over seeds;
- per main metric: every cell that differs from its baseline cell only in the baseline axis,
  paired with it by seed (`stats.paired_test`), Holm-adjusted over that metric's comparisons;
- the series the plots draw: validation curves over epochs, the metric against the missing
  rate (a grid axis, or the robustness metrics `test_miss_<type>_<rate>/<metric>`), and the
  metric against `cost/flops_per_sample`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from mmray.report import stats
from mmray.tune.grid import short_keys

SEED_KEY = "seed"  # the grid axis of seeds: aggregated over, never a column or a comparison
RATE_AXIS = "data.missing.test_rate"
FLOPS = "cost/flops_per_sample"
# test_miss_<type>_<rate>/<metric>; <type> may hold underscores, <rate> is Python's %g.
_MISS = re.compile(r"^test_miss_(?P<type>.+)_(?P<rate>[0-9.eE+-]+)/(?P<metric>.+)$")


def seed_order(seed: str) -> tuple:
    """Numeric seeds in numeric order, then any others by name."""
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


@dataclass
class CellResult:
    """One grid cell (grid.* params without the seed axis) and its selected run per seed."""

    cell: dict[str, str]
    run_ids: dict[str, str] = field(default_factory=dict)  # seed -> selected MLflow run id
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> seed -> value
    # The cell's method and its modality option (`summary.CELL_PARAMS`), from its runs' params.
    params: dict[str, str] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str]:
        return sorted(self.run_ids, key=seed_order)

    def values(self, metric: str) -> dict[str, float]:
        """seed -> final value of `metric` (seeds whose run did not log it are absent)."""
        per_seed = self.metrics.get(metric, {})
        return {s: per_seed[s] for s in self.seeds if s in per_seed}


@dataclass(frozen=True)
class ReportOptions:
    """What to report: the selection metric, the grid's axes, the baseline and the main metrics."""

    # Validation metric that selected the best trial per (cell, seed), and its direction.
    search_metric: str = "val/acc"
    mode: str = "max"
    # The grid's axes in the order of the ablation file (labels and tables follow it).
    axes: tuple[str, ...] = ()
    # Value labels of each axis in the ablation file's order (rows follow it).
    values: dict[str, list[str]] = field(default_factory=dict)
    # (axis, value label) every other value of that axis is tested against; None: no tests.
    baseline: tuple[str, str] | None = None
    # Further (axis, value label) baselines, each tested like `baseline`.
    also_against: tuple[tuple[str, str], ...] = ()
    # Main metrics (tested, plotted); empty: the search metric with val/ replaced by test/.
    metrics: tuple[str, ...] = ()
    # Which epoch of a run its test metrics come from (train.select): best_val or last.
    epoch_select: str = "best_val"

    @property
    def main_metrics(self) -> list[str]:
        if self.metrics:
            return list(self.metrics)
        return [re.sub(r"^val/", "test/", self.search_metric)]


@dataclass
class Comparison:
    """One cell against its baseline cell on one metric."""

    cell: CellResult
    baseline: CellResult
    test: stats.PairedTest
    p_holm: float | None = None


@dataclass
class Point:
    """One point of a plotted line: x, and the summary of y over seeds (xerr from `x_summary`)."""

    x: float
    y: stats.Summary
    x_summary: stats.Summary | None = None
    label: str = ""


@dataclass
class Line:
    label: str
    points: list[Point] = field(default_factory=list)


def cell_axes(results: list[CellResult], options: ReportOptions) -> list[str]:
    """Non-seed axes: the ablation file's order first, then any others the runs carry."""
    seen = [a for a in options.axes if a != SEED_KEY]
    extra = sorted({k for r in results for k in r.cell} - set(seen))
    return [a for a in [*seen, *extra] if any(a in r.cell for r in results)]


def order_cells(results: list[CellResult], axes: list[str],
                values: dict[str, list[str]]) -> list[CellResult]:
    """Rows in the ablation file's order: axis by axis, values as the grid lists them."""
    def key(r: CellResult) -> tuple:
        out = []
        for a in axes:
            known = values.get(a, [])
            v = r.cell.get(a, "")
            out.append((known.index(v), "") if v in known else (len(known), v))
        return tuple(out)

    return sorted(results, key=key)


def with_available_metrics(results: list[CellResult],
                           options: ReportOptions) -> tuple[ReportOptions, str]:
    """Without a test split no run logs the default test metric: report the selection metric
    itself (optimistically biased, it chose the trials) and say so."""
    main = options.main_metrics
    if options.metrics or any(r.values(m) for r in results for m in main):
        return options, ""
    note = (f"No run logged `{main[0]}` (no test split?): the validation `{options.search_metric}` "
            "that selected the trials is reported instead; it is optimistically biased.")
    return replace(options, metrics=(options.search_metric,)), note


def cell_label(cell: dict[str, str], axes: list[str], skip: tuple[str, ...] = ()) -> str:
    keys = [a for a in axes if a in cell and a not in skip]
    short = short_keys(keys)
    return ", ".join(f"{short[k]}={cell[k]}" for k in keys) or "all"


def table_metrics(results: list[CellResult], main: list[str]) -> list[str]:
    """Main metrics, then every other test metric (fused and per modality) and FLOPs."""
    names = sorted({m for r in results for m in r.metrics})
    rest = [m for m in names if m.startswith("test/") and not m.endswith("/loss") and m not in main]
    return [*main, *rest, *([FLOPS] if FLOPS in names and FLOPS not in main else [])]


def json_metrics(results: list[CellResult], options: ReportOptions) -> list[str]:
    """Final metrics kept in report.json: test, robustness, cost and the search metric."""
    names = sorted({m for r in results for m in r.metrics})
    keep = [m for m in names if m.startswith(("test/", "test_miss_", "cost/"))
            or m == options.search_metric]
    return [*options.main_metrics, *[m for m in keep if m not in options.main_metrics]]


def describe_cell(result: CellResult, metric: str) -> stats.Summary:
    return stats.describe(list(result.values(metric).values()))


def comparisons(results: list[CellResult], baseline: tuple[str, str] | None,
                metric: str) -> list[Comparison]:
    """Each non-baseline cell against the cell equal but for the baseline axis, Holm-adjusted."""
    if baseline is None:
        return []
    axis, value = baseline
    by_cell = {tuple(sorted(r.cell.items())): r for r in results}
    out = []
    for r in results:
        if axis not in r.cell or r.cell[axis] == value:
            continue
        base = by_cell.get(tuple(sorted({**r.cell, axis: value}.items())))
        if base is not None and r.values(metric) and base.values(metric):
            test = stats.paired_test(r.values(metric), base.values(metric))
            out.append(Comparison(r, base, test))
    tested = [c for c in out if c.test.p is not None]
    for c, p in zip(tested, stats.holm([c.test.p for c in tested])):
        c.p_holm = p
    return out


def mean_curve(per_seed: dict[str, dict[int, float]]) -> tuple[list[int], list[float]]:
    """Steps and the mean over the seeds that logged each step."""
    steps = sorted({s for h in per_seed.values() for s in h})
    means = []
    for step in steps:
        vals = [h[step] for h in per_seed.values() if step in h]
        means.append(sum(vals) / len(vals))
    return steps, means


def curve_metrics(result: CellResult, search_metric: str) -> list[str]:
    """The fused validation metric and its per-modality variants (`val/acc`, `val/acc_<m>`)."""
    return sorted(m for m in result.metrics
                  if m == search_metric or m.startswith(search_metric + "_"))


def missing_rate_lines(results: list[CellResult], axes: list[str], metric: str) -> list[Line]:
    """The metric against the grid axis data.missing.test_rate; a line per cell minus that axis."""
    lines: dict[str, Line] = {}
    for r in results:
        if RATE_AXIS not in r.cell or not r.values(metric):
            continue
        label = cell_label(r.cell, axes, skip=(RATE_AXIS,))
        lines.setdefault(label, Line(label)).points.append(
            Point(float(r.cell[RATE_AXIS]), describe_cell(r, metric)))
    for line in lines.values():
        line.points.sort(key=lambda p: p.x)
    return list(lines.values())


def robustness_lines(results: list[CellResult], axes: list[str],
                     metric: str) -> dict[str, list[Line]]:
    """type -> one line per cell of `test_miss_<type>_<rate>/<metric>` against the rate."""
    want = metric.split("/", 1)[-1]
    out: dict[str, list[Line]] = {}
    for r in results:
        per_type: dict[str, Line] = {}
        for name in r.metrics:
            m = _MISS.match(name)
            if m is None or m["metric"] != want:
                continue
            try:
                rate = float(m["rate"])
            except ValueError:
                continue
            line = per_type.setdefault(m["type"], Line(cell_label(r.cell, axes)))
            line.points.append(Point(rate, describe_cell(r, name)))
        for kind, line in per_type.items():
            line.points.sort(key=lambda p: p.x)
            out.setdefault(kind, []).append(line)
    return dict(sorted(out.items()))


def flops_points(results: list[CellResult], axes: list[str], metric: str) -> list[Point]:
    """One point per cell: mean FLOPs per sample (x) and the metric (y), each over seeds."""
    out = []
    for r in results:
        fl, y = describe_cell(r, FLOPS), describe_cell(r, metric)
        if fl.n and y.n:
            out.append(Point(fl.mean, y, fl, cell_label(r.cell, axes)))
    return out
