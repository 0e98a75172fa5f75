"""Reports of a sweep's results, read back from MLflow."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from mmray.report.summary import child_runs, markdown_table, summarize
from mmray.tracking.mlflow_log import PARENT_TAG, SWEEP_TAG


def latest_parent(client: MlflowClient, experiment: str) -> tuple[str, str]:
    """(experiment id, run id) of the most recent sweep in an MLflow experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise KeyError(f"no MLflow experiment {experiment!r}; known: {names}")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
            if SWEEP_TAG in r.data.tags and PARENT_TAG not in r.data.tags]
    if not runs:
        raise KeyError(f"experiment {experiment!r} has no sweep (parent) run")
    return exp.experiment_id, runs[0].info.run_id


def write_report(client: MlflowClient, experiment_id: str, parent_id: str, out_dir: str | Path,
                 metric: str = "val/acc", mode: str = "max") -> str:
    """Write results.md into `out_dir`, attach it to the parent run, and return its text."""
    parent = client.get_run(parent_id)
    results = summarize(child_runs(client, experiment_id, parent_id), metric, mode)
    n_runs = sum(len(r.seeds) for r in results)
    text = (f"# {parent.info.run_name}\n\n"
            f"{n_runs} finished trials in {len(results)} grid cells; mean ± std over seeds "
            f"(best `{metric}` per cell and seed).\n\n{markdown_table(results)}\n\n"
            f"MLflow: experiment {experiment_id}, parent run {parent_id}\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    client.log_artifact(parent_id, str(out / "results.md"))
    return text
