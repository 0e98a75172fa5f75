"""A sweep's results read back from MLflow: per grid cell, the selected run of each seed.

Protocol: within a (cell, seed) the trial with the best validation value of the search metric is
kept (with `search.num_samples == 1` that is the only trial); its final metrics (test metrics,
logged after the last epoch, and costs) are then aggregated over seeds. Test metrics are never
used for selection.
"""

from __future__ import annotations

import math

from mmray.report.compare import SEED_KEY, CellResult
from mmray.tracking.mlflow_log import TRIAL_TAG
from mmray.tracking.mlflow_read import Client, metric_history


def _cell_and_seed(run) -> tuple[tuple, str]:
    grid = {k[len("grid."):]: v for k, v in run.data.params.items() if k.startswith("grid.")}
    seed = grid.pop(SEED_KEY, run.data.params.get(SEED_KEY, "0"))
    return tuple(sorted(grid.items())), seed


# Params of a run kept with its cell: what the imbalance section needs to know of its method.
CELL_PARAMS = ("method.name", "method.options.modality")


def summarize(runs: list, select_metric: str = "val/acc", mode: str = "max") -> list[CellResult]:
    """Finished child runs grouped by grid cell, keeping the val-best trial per (cell, seed)."""
    best: dict[tuple, tuple[float, object]] = {}
    for run in runs:
        if run.info.status != "FINISHED" or TRIAL_TAG not in run.data.tags:
            continue
        key = _cell_and_seed(run)
        score = run.data.metrics.get(select_metric, math.nan)
        score = score if mode == "max" else -score
        if key not in best or (not math.isnan(score) and not score <= best[key][0]):
            best[key] = (score, run)
    cells: dict[tuple, CellResult] = {}
    for (cell_key, seed), (_, run) in sorted(best.items(), key=lambda kv: kv[0][0]):
        res = cells.setdefault(cell_key, CellResult(dict(cell_key)))
        res.run_ids[seed] = run.info.run_id
        res.params.update({k: run.data.params[k] for k in CELL_PARAMS if k in run.data.params})
        for name, value in run.data.metrics.items():
            if math.isfinite(value):  # a NaN or inf is no measurement
                res.metrics.setdefault(name, {})[seed] = value
    return list(cells.values())


def histories(client: Client, result: CellResult,
              metrics: list[str]) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> seed -> {step (epoch): value} of the cell's selected runs."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for metric in metrics:
        for seed, run_id in result.run_ids.items():
            points = metric_history(client, run_id, metric)
            if points:
                out.setdefault(metric, {})[seed] = points
    return out
