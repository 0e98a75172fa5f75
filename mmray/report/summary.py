"""The results table of a sweep, read back from MLflow: one row per grid cell, mean ± std over seeds.

Protocol: within a (cell, seed) the trial with the best validation value of the search metric is
kept (with `search.num_samples == 1` that is the only trial); its final-epoch metrics are then
aggregated over seeds. Test metrics are never used for selection.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from mmray.tracking.mlflow_log import PARENT_TAG, TRIAL_TAG

SEED_KEY = "seed"


@dataclass
class CellResult:
    cell: dict[str, str]
    seeds: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        xs = self.values.get(metric, [])
        if not xs:
            return math.nan, math.nan, 0
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return mean, std, len(xs)


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50_000)


def summarize(runs: list, select_metric: str = "val/acc", mode: str = "max") -> list[CellResult]:
    """Group finished child runs by grid cell (grid.* params without the seed axis)."""
    best: dict[tuple, tuple[float, object]] = {}
    for run in runs:
        if run.info.status != "FINISHED" or TRIAL_TAG not in run.data.tags:
            continue
        grid = {k[len("grid."):]: v for k, v in run.data.params.items() if k.startswith("grid.")}
        seed = grid.pop(SEED_KEY, run.data.params.get("seed", "0"))
        key = (tuple(sorted(grid.items())), seed)
        score = run.data.metrics.get(select_metric, math.nan)
        score = score if mode == "max" else -score
        if key not in best or (not math.isnan(score) and score > best[key][0]):
            best[key] = (score, run)
    cells: dict[tuple, CellResult] = {}
    for (cell_key, seed), (_, run) in sorted(best.items(), key=lambda kv: kv[0]):
        res = cells.setdefault(cell_key, CellResult(dict(cell_key)))
        res.seeds.append(seed)
        for name, value in run.data.metrics.items():
            res.values.setdefault(name, []).append(value)
    return list(cells.values())


def default_metrics(results: list[CellResult]) -> list[str]:
    """Fused and per-modality test metrics (val if the sweep has no test split)."""
    names = sorted({m for r in results for m in r.values})
    for split in ("test/", "val/"):
        chosen = [m for m in names if m.startswith(split) and not m.endswith("/loss")]
        if chosen:
            return chosen
    return names


def markdown_table(results: list[CellResult], metrics: list[str] | None = None) -> str:
    if not results:
        return "(no finished runs)"
    metrics = metrics or default_metrics(results)
    axes = list(defaultdict(None, {k: None for r in results for k in r.cell}))
    head = "| " + " | ".join([*axes, "seeds", *metrics]) + " |"
    sep = "|" + "---|" * (len(axes) + 1 + len(metrics))
    rows = [head, sep]
    for r in results:
        cells = [r.cell.get(a, "") for a in axes] + [str(len(r.seeds))]
        for m in metrics:
            mean, std, n = r.mean_std(m)
            cells.append("–" if n == 0 else f"{mean:.4f} ± {std:.4f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
