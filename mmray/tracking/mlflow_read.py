"""A sweep read back from MLflow for the report: its parent and child runs, their metric
histories, and the report's files attached to the parent run.

`mmray.report` calls only these functions with a `Client` it is handed and never imports mlflow,
so what the report needs from a tracking store is listed here. Runs are found by the tags
`mlflow_log` writes (`mmray.sweep` on a parent, the parent's id on each child).
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from mmray.tracking.mlflow_log import PARENT_TAG, SWEEP_TAG

Client = MlflowClient  # what the functions below read through; built from a tracking URI


def latest_parent(client: Client, experiment: str) -> tuple[str, str]:
    """(experiment id, run id) of the most recent sweep in an MLflow experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise KeyError(f"no MLflow experiment {experiment!r}; known: {names}")
    runs = [r for r in client.search_runs([exp.experiment_id],
                                          order_by=["attributes.start_time DESC"])
            if SWEEP_TAG in r.data.tags and PARENT_TAG not in r.data.tags]
    if not runs:
        raise KeyError(f"experiment {experiment!r} has no sweep (parent) run")
    return exp.experiment_id, runs[0].info.run_id


def child_runs(client: Client, experiment_id: str, parent_id: str) -> list:
    """Every child run of a sweep (MLflow `Run`s: `.info.status`, `.data.params/metrics/tags`)."""
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50_000)


def run_name(client: Client, run_id: str) -> str:
    return client.get_run(run_id).info.run_name


def metric_history(client: Client, run_id: str, metric: str) -> dict[int, float]:
    """{step (epoch): value} of one metric of a run; empty if the run never logged it."""
    return {int(m.step): float(m.value) for m in client.get_metric_history(run_id, metric)}


def attach_files(client: Client, run_id: str, paths: list[Path], artifact_dir: str) -> None:
    """Upload files as artifacts of a run, under `artifact_dir`."""
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_dir)
