"""The comparison report of a sweep: read back from MLflow, written to
`<report_dir>/<ablation>/` as report.md, report.html, report.json and PNG figures, and attached to
the sweep's parent MLflow run (artifact folder `report/`).

    text = write_report(client, experiment_id, parent_run_id, out_dir, report_options(abl))
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmray.report import compare, imbalance, plots, stats
from mmray.report.compare import SEED_KEY, CellResult, Comparison, ReportOptions
from mmray.report.render import Block, Heading, Image, Table, Text, to_html, to_markdown
from mmray.report.summary import histories, summarize
from mmray.tracking.mlflow_read import Client, attach_files, child_runs, run_name
from mmray.tune.grid import AblationConfig, value_label

FILES = ("report.md", "report.html", "report.json")
ARTIFACT_DIR = "report"
CI_NAME = f"{stats.LEVEL:.0%} CI"
ONE_SEED = "(n = 1): a single seed, whose std and confidence interval are undefined."


def _grid_value(abl: AblationConfig, baseline: dict) -> tuple[str, str]:
    """(axis, label of the grid value) a `{axis: value}` mapping of the report config names."""
    key, value = next(iter(baseline.items()))
    match = next(v for v in abl.grid[key] if v == value or value_label(v) == value_label(value))
    return key, value_label(match)


def resolve_baseline(abl: AblationConfig) -> tuple[str, str] | None:
    """(axis, value label) from `report.baseline`, else the first value of the first non-seed
    axis; None when the grid has no non-seed axis."""
    if abl.report.baseline:
        return _grid_value(abl, abl.report.baseline)
    axes = [k for k in abl.grid if k != SEED_KEY]
    return (axes[0], value_label(abl.grid[axes[0]][0])) if axes else None


def report_options(abl: AblationConfig) -> ReportOptions:
    return ReportOptions(search_metric=abl.search.metric, mode=abl.search.mode,
                         axes=tuple(abl.grid), baseline=resolve_baseline(abl),
                         also_against=tuple(_grid_value(abl, b) for b in abl.report.also_against),
                         values={k: [value_label(v) for v in vs] for k, vs in abl.grid.items()},
                         metrics=tuple(abl.report.metrics),
                         epoch_select=abl.experiment.train.select)


# ---------------------------------------------------------------------------------------------
# Numbers as text
# ---------------------------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.4g}" if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3) else f"{x:.4f}"


def fmt_p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3g}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    return "undefined" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def summary_text(s: stats.Summary) -> str:
    """`mean ± std [CI]`, or the mean and why the spread is undefined."""
    if s.n == 0:
        return "–"
    if s.std is None:
        return f"{fmt(s.mean)} (n = 1)"
    return f"{fmt(s.mean)} ± {fmt(s.std)} {fmt_ci(s.ci)}"


def mean_ci_text(s: stats.Summary) -> str:
    """`mean [CI]`, or the mean and why the interval is undefined."""
    if s.n == 0:
        return "–"
    return f"{fmt(s.mean)} (n = 1)" if s.ci is None else f"{fmt(s.mean)} {fmt_ci(s.ci)}"


def slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def cells_table(results: list[CellResult], axes: list[str], metrics: list[str]) -> Table:
    rows = [[r.cell.get(a, "") for a in axes] + [str(len(r.seeds))]
            + [summary_text(compare.describe_cell(r, m)) for m in metrics] for r in results]
    return Table([*axes, "seeds", *metrics], rows, "cells")


def robustness_table(results: list[CellResult], axes: list[str], metric: str) -> Table | None:
    """One row per cell, one column per evaluated missing type and rate: `metric` of the final
    model on the test split there (`test_miss_<type>_<rate>/...`); None when none was logged."""
    lines = compare.robustness_lines(results, axes, metric)
    if not lines:
        return None
    cols = sorted({(kind, p.x) for kind, ls in lines.items() for ln in ls for p in ln.points})
    by_cell: dict[str, dict] = {}
    for kind, ls in lines.items():
        for ln in ls:
            for p in ln.points:
                by_cell.setdefault(ln.label, {})[(kind, p.x)] = p.y
    rows = [[label, *(summary_text(v[c]) if c in v else "–" for c in cols)]
            for label, v in by_cell.items()]
    return Table(["cell", *(f"{kind} η={rate:g}" for kind, rate in cols)], rows, "robustness")


def comparisons_table(comps: list[Comparison], axes: list[str]) -> Table:
    rows = []
    for c in comps:
        t = c.test
        rows.append([compare.cell_label(c.cell.cell, axes),
                     compare.cell_label(c.baseline.cell, axes), str(t.n), fmt(t.mean_diff), fmt_ci(t.ci), fmt(t.t), fmt_p(t.p),
                     fmt_p(c.p_holm), t.note])
    header = ["cell", "baseline", "pairs", "mean diff", CI_NAME, "t", "p", "p (Holm)", "note"]
    return Table(header, rows, "comparisons")


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def curve_series(results: list[CellResult], axes: list[str], search_metric: str,
                 hist: dict[str, dict[str, dict[str, dict[int, float]]]]) -> dict[str, dict]:
    """cell label -> series name (fused, <modality>) -> (epochs, mean over seeds)."""
    out: dict[str, dict] = {}
    for r in results:
        label = compare.cell_label(r.cell, axes)
        for metric, per_seed in hist.get(label, {}).items():
            name = "fused" if metric == search_metric else metric[len(search_metric) + 1:]
            out.setdefault(label, {})[name] = compare.mean_curve(per_seed)
    return out


def metric_plots(results: list[CellResult], axes: list[str], metric: str,
                 out_dir: Path) -> list[Image]:
    """Missing-rate, robustness and FLOPs figures of one metric, where the runs have the data."""
    images = []
    rate_lines = compare.missing_rate_lines(results, axes, metric)
    if rate_lines:
        f = plots.against_rate({compare.RATE_AXIS: rate_lines}, metric,
                               out_dir / f"missing_rate_{slug(metric)}.png")
        images.append(Image(f.name, f"`{metric}` against the grid axis `{compare.RATE_AXIS}`, "
                                    f"one line per cell without that axis; bars: {CI_NAME}."))
    robust = compare.robustness_lines(results, axes, metric)
    if robust:
        f = plots.against_rate({f"missing type: {k}": v for k, v in robust.items()}, metric,
                               out_dir / f"robustness_{slug(metric)}.png")
        images.append(Image(f.name, f"`{metric}` of the final model on the test split at each "
                                    "evaluated missing rate (`test_miss_<type>_<rate>/...`), one "
                                    f"panel per missing type, one line per cell; bars: {CI_NAME}."))
    points = compare.flops_points(results, axes, metric)
    if points:
        f = plots.against_flops(points, metric, out_dir / f"flops_{slug(metric)}.png")
        images.append(Image(f.name, f"`{metric}` against `{compare.FLOPS}`, one point per cell; "
                                    f"bars: {CI_NAME} of both."))
    return images


def draw_plots(results: list[CellResult], options: ReportOptions, axes: list[str],
               curves: dict[str, dict], out_dir: Path) -> list[Image]:
    images = []
    if curves:
        f = plots.curves(curves, options.search_metric, out_dir / "curves.png")
        images.append(Image(f.name, f"Validation `{options.search_metric}` of the fused model and "
                                    "of each modality's logits inside it, against epoch; mean over "
                                    "the seeds' selected runs, one panel per cell."))
    for metric in options.main_metrics:
        images.extend(metric_plots(results, axes, metric, out_dir))
    return images


# ---------------------------------------------------------------------------------------------
# The document and its numbers
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    blocks: list[Block]
    data: dict  # everything report.json holds
    images: list[Image] = field(default_factory=list)


# How a run's reported epoch is chosen (train.select), as the report states it.
EPOCH_RULE = {"best_val": "of its epoch with the best validation `{}` (train.select=best_val)",
              "last": "of its last epoch (train.select=last)"}


def protocol_text(options: ReportOptions, n_trials: int, n_cells: int) -> str:
    return (f"{n_trials} selected runs in {n_cells} grid cells. Protocol: per grid cell and seed, "
            f"the trial with the best validation `{options.search_metric}` ({options.mode}) is "
            f"kept; its test metrics, {EPOCH_RULE[options.epoch_select].format(options.search_metric)}, "
            "are aggregated over seeds: mean ± sample std "
            f"[{CI_NAME} of the mean, Student t with n − 1 df]. Test metrics never select.")


def comparison_blocks(baseline: tuple[str, str] | None, axes: list[str],
                      comps: dict[str, list[Comparison]]) -> list[Block]:
    if baseline is None:
        return [Heading("Paired tests"), Text("No baseline: the grid has no non-seed axis.")]
    axis, value = baseline
    blocks: list[Block] = [Heading(f"Paired tests against the baseline `{axis}={value}`")]
    for metric, cs in comps.items():
        n_tested = sum(c.test.p is not None for c in cs)
        blocks.append(Text(
            f"`{metric}`: each cell minus the cell that differs only in `{axis}` (= `{value}`), "
            "paired by seed (seeds both have); two-sided paired t-test; Holm's step-down "
            f"correction over the {n_tested} comparisons of `{metric}` with a defined p."))
        blocks.append(comparisons_table(cs, axes) if cs else Text("No comparable cells."))
    return blocks


def imbalance_blocks(imb: imbalance.Imbalance, axes: list[str]) -> list[Block]:
    metric, uni = imb.metric, f"`{imbalance.UNIMODAL}`"
    blocks: list[Block] = [Heading("Modality imbalance: each modality inside the model and alone")]
    if not imb.unimodal_cells:
        return blocks + [Text(
            f"No {uni} run in this sweep, so no modality's in-model `{metric}_<m>` can be set "
            f"beside its own model: add `{{name: unimodal, options: {{modality: <m>}}}}` per "
            "modality (and `{name: unimodal_ensemble}`) to the grid's method axis.")]
    blocks.append(Text(
        f"In-model: `{metric}_<m>`, modality m's own logits inside the multimodal model; "
        f"unimodal: the {uni} model of m from the cell of this sweep with the same grid values "
        f"except the method. Paired by seed (seeds both have): mean [{CI_NAME}] of each, the "
        f"gap unimodal − in-model with its interval and a two-sided paired t-test; a positive "
        "gap: m learns less inside the fused model than alone."))
    rows = [[compare.cell_label(r.cell.cell, axes), r.modality, str(len(r.seeds)),
             mean_ci_text(r.in_model), mean_ci_text(r.unimodal), fmt(r.gap.mean_diff),
             fmt_ci(r.gap.ci), fmt_p(r.gap.p),
             "; ".join(filter(None, [f"not unimodal: {r.mixed}" if r.mixed else "", r.gap.note]))]
            for r in imb.rows]
    if rows:
        blocks.append(Table(["cell", "modality", "pairs", "in-model", "unimodal",
                             "gap (unimodal − in-model)", CI_NAME, "p", "note"], rows, "imbalance"))
    blocks += [Text(f"No row for `{s.modality}` in {compare.cell_label(s.cell.cell, axes)}: "
                    f"{s.reason}.") for s in imb.skipped]
    if imb.fused:
        blocks.append(Text(
            f"Fused `{metric}` of each multimodal cell beside its best {uni} model (the "
            f"modality whose model has the best mean) and `{imbalance.ENSEMBLE}` (the mean of "
            "the per-modality unimodal models), matched as above: mean "
            f"[{CI_NAME}] over each cell's seeds."))
        blocks.append(Table(["cell", "fused", "best unimodal", "ensemble"], [
            [compare.cell_label(f.cell.cell, axes), mean_ci_text(f.fused),
             f"{f.best[0]}: {mean_ci_text(f.best[1])}" if f.best else "–",
             mean_ci_text(f.ensemble) if f.ensemble else "–"] for f in imb.fused], "fused"))
    return blocks


COST_COLUMNS = (("cost/train_epoch_s", "s / train epoch"), ("cost/flops_per_sample", "FLOPs / sample"),
                ("cost/params", "params"), ("cost/trainable_params", "trainable params"))


def cost_blocks(results: list[CellResult], options: ReportOptions, axes: list[str]) -> list[Block]:
    """What each cell costs: mean training time per epoch (and its ratio to the baseline cell's,
    matched as the paired tests are), FLOPs per test sample and parameters, mean over seeds."""
    cols = [(m, name) for m, name in COST_COLUMNS if any(r.values(m) for r in results)]
    if not cols:
        return []
    time_key = COST_COLUMNS[0][0]
    base_of = {id(c.cell): c.baseline for c in compare.comparisons(results, options.baseline, time_key)}
    header = ["cell", *(name for _, name in cols)]
    with_ratio = bool(base_of)
    if with_ratio:
        header.insert(2, "time ÷ baseline")
    rows = []
    for r in results:
        row = [compare.cell_label(r.cell, axes)]
        row += [("–" if not r.values(m) else f"{compare.describe_cell(r, m).mean:.0f}"
                 if m.endswith("params") else fmt(compare.describe_cell(r, m).mean)) for m, _ in cols]
        if with_ratio:
            axis, value = options.baseline
            base = r if r.cell.get(axis) == value else base_of.get(id(r))
            own = compare.describe_cell(r, time_key).mean if r.values(time_key) else None
            ref = compare.describe_cell(base, time_key).mean if base and base.values(time_key) else None
            row.insert(2, fmt(own / ref) if own is not None and ref else "–")
        rows.append(row)
    said = {time_key: "training seconds per epoch (wall clock of its workers; trials running "
                      "side by side share the machine)",
            "cost/flops_per_sample": "FLOPs per test sample of the model it reports",
            "cost/params": "parameters", "cost/trainable_params": "trainable parameters"}
    text = "Mean over seeds of each run's " + ", ".join(said[m] for m, _ in cols) + "."
    if with_ratio:
        text += " `time ÷ baseline`: the cell's time over its baseline cell's."
    return [Heading("Cost"), Text(text), Table(header, rows, "cost")]


def build_report(results: list[CellResult], options: ReportOptions, title: str,
                 hist: dict[str, dict], out_dir: Path) -> Report:
    """The document, its numbers and its figures (drawn into `out_dir`); no MLflow."""
    axes = compare.cell_axes(results, options)
    results = compare.order_cells(results, axes, options.values)
    options, note = compare.with_available_metrics(results, options)
    comps = {m: compare.comparisons(results, options.baseline, m) for m in options.main_metrics}
    more = {b: {m: compare.comparisons(results, b, m) for m in options.main_metrics}
            for b in options.also_against}
    curves = curve_series(results, axes, options.search_metric, hist)
    images = draw_plots(results, options, axes, curves, out_dir)
    n_trials = sum(len(r.seeds) for r in results)
    blocks: list[Block] = [Heading(title, 1), Text(protocol_text(options, n_trials, len(results))),
                           *([Text(note)] if note else []), Heading("Results per cell"),
                           cells_table(results, axes, compare.table_metrics(results,
                                                                           options.main_metrics))]
    if any(len(r.seeds) == 1 for r in results):
        blocks.append(Text(ONE_SEED))
    for metric in options.main_metrics:
        if (table := robustness_table(results, axes, metric)) is not None:
            blocks += [Heading(f"Robustness: `{metric}` at other test missing rates"),
                       Text("The final model of each selected run evaluated on the test split "
                            "with η of its samples missing a modality (the type), from the "
                            "same stored tables for every method: mean ± std [95% CI] over "
                            "seeds."), table]
    blocks += comparison_blocks(options.baseline, axes, comps)
    for b, cs in more.items():
        blocks += comparison_blocks(b, axes, cs)
    blocks += cost_blocks(results, options, axes)
    imb = imbalance.imbalance(results, options.main_metrics[0], options.mode)
    blocks += imbalance_blocks(imb, axes)
    blocks += [Heading("Plots"), *(images or [Text("No plots: the runs logged no histories, "
                                                   "missing-rate or cost metrics.")])]
    data = {**report_json(results, options, axes, comps, curves, images),
            "also_against": [{"baseline": {"axis": b[0], "value": b[1]},
                              "comparisons": {m: [_comparison_json(c) for c in cs]
                                              for m, cs in more[b].items()}} for b in more],
            **imbalance.to_json(imb, axes)}
    return Report(blocks, data, images)


def _comparison_json(c: Comparison) -> dict:
    t = c.test
    return {"cell": c.cell.cell, "baseline_cell": c.baseline.cell, "seeds": list(t.seeds),
            "n": t.n, "mean_diff": t.mean_diff, "ci": list(t.ci) if t.ci else None, "t": t.t,
            "p": t.p, "p_holm": c.p_holm, "note": t.note or None}


def report_json(results: list[CellResult], options: ReportOptions, axes: list[str],
                comps: dict[str, list[Comparison]], curves: dict[str, dict],
                images: list[Image]) -> dict:
    metrics = compare.json_metrics(results, options)
    cells = [{"cell": r.cell, "label": compare.cell_label(r.cell, axes), "seeds": r.seeds,
              "run_ids": r.run_ids,
              "metrics": {m: {**compare.describe_cell(r, m).to_json(), "values": r.values(m)}
                          for m in metrics if r.values(m)}} for r in results]
    return {
        "protocol": {"search_metric": options.search_metric, "mode": options.mode,
                     "selection": "best validation search metric per (cell, seed)",
                     "epoch": options.epoch_select,
                     "ci_level": stats.LEVEL, "test": "two-sided paired t-test, Holm per metric"},
        "axes": axes, "main_metrics": options.main_metrics,
        "baseline": dict(zip(("axis", "value"), options.baseline)) if options.baseline else None,
        "cells": cells,
        "comparisons": {m: [_comparison_json(c) for c in cs] for m, cs in comps.items()},
        "curves": {cell: {name: {"epochs": s[0], "mean": s[1]} for name, s in series.items()}
                   for cell, series in curves.items()},
        "plots": [{"file": i.file, "caption": i.caption} for i in images],
    }


# ---------------------------------------------------------------------------------------------
# From MLflow to files
# ---------------------------------------------------------------------------------------------


def fetch_histories(client: Client, results: list[CellResult], options: ReportOptions,
                    axes: list[str]) -> dict[str, dict]:
    """cell label -> metric -> seed -> {epoch: value} of the validation curves."""
    return {compare.cell_label(r.cell, axes):
            histories(client, r, compare.curve_metrics(r, options.search_metric)) for r in results}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place: a reader (or
    a report interrupted mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(client: Client, experiment_id: str, parent_id: str, out_dir: str | Path,
                 options: ReportOptions) -> str:
    """Write report.md/.html/.json and the figures into `out_dir`, attach them to the parent run,
    and return the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = run_name(client, parent_id)
    results = summarize(child_runs(client, experiment_id, parent_id), options.search_metric,
                        options.mode)
    hist = fetch_histories(client, results, options, compare.cell_axes(results, options))
    report = build_report(results, options, title, hist, out)
    source = f"MLflow: experiment {experiment_id}, parent run {parent_id}"
    report.blocks.append(Text(source))
    report.data.update({"title": title, "experiment_id": experiment_id,
                        "parent_run_id": parent_id})
    text = to_markdown(report.blocks)
    write_atomic(out / "report.md", text)
    write_atomic(out / "report.html", to_html(report.blocks, title))
    write_atomic(out / "report.json", json.dumps(report.data, indent=1, allow_nan=False))
    attach_files(client, parent_id, [out / name for name in [*FILES, *(i.file for i in report.images)]],
                 ARTIFACT_DIR)
    return text
