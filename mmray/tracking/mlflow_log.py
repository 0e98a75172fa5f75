"""MLflow logging: one experiment per ablation, a parent run per sweep, a child run per trial.

Runs are found again by tags, never created twice: the parent by `mmray.sweep` (the sweep's
storage folder), a child by `mmray.trial` (its name from grid cell, seed and sample index). A
resumed sweep reuses an unfinished child run and skips a finished one, so MLflow ends with exactly
one finished child run per trial.

Tracking URIs and artifact locations are made absolute on the driver: trials and `ray job
submit` run in temporary working folders where a relative `sqlite:///mlflow.db` would vanish.

What the MLflow UI shows besides params and metrics: experiments are of the kind that opens on
their runs table (`EXPERIMENT_KIND`; MLflow 3 opens others on its GenAI overview), runs carry
their source (`source_tags`: the pipeline script, a local run or a Ray job) and a trial's run
the shards it trained on as a dataset input (`log_dataset_input`: dataset name, shard folder,
data version as digest).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

SWEEP_TAG = "mmray.sweep"
TRIAL_TAG = "mmray.trial"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# The UI opens an experiment of this kind on its runs table; MLflow 3 opens one without the tag
# on its GenAI overview (traces, evaluations), which an ablation has none of.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
SOURCE_COMMIT_TAG = "mlflow.source.git.commit"
DATASET_CONTEXT_TAG = "mlflow.data.context"
# Ray sets this in the entrypoint of a `ray job submit` (ray/_private/runtime_env/constants.py).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_BATCH = 100  # MLflow's log_batch limit on params per call


def resolve_tracking_uri(uri: str = "", workdir: str | Path | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an absolute sqlite file in `workdir`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    base = Path(workdir or os.getcwd()).resolve()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a bare folder means a file store there
        return str((base / uri).resolve())
    return uri


def artifact_root_for(uri: str, workdir: str | Path | None = None) -> str | None:
    """Local stores keep artifacts in an absolute folder beside the database; servers choose."""
    if uri.startswith("sqlite:") or "://" not in uri:
        return str((Path(workdir or os.getcwd()) / "mlartifacts").resolve())
    return None


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the code that runs; $MMRAY_GIT_COMMIT where the checkout has no .git."""
    if os.environ.get("MMRAY_GIT_COMMIT"):
        return os.environ["MMRAY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_tags(cfg, data_version: str, commit: str) -> dict[str, str]:
    """The tags every training run carries (`cfg`: an ExperimentConfig)."""
    from mmray.config import config_hash

    missing = cfg.data.missing
    return {
        "method": cfg.method.name,
        "fusion": cfg.method.fusion,
        "dataset": cfg.data.dataset,
        "seed": str(cfg.seed),
        "missing_train_rate": f"{missing.train_rate:g}",
        "missing_test_rate": f"{missing.test_rate:g}",
        "missing_type": missing.type,
        "git_commit": commit,
        "config_hash": config_hash(cfg),
        "data_version": data_version,
    }


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The experiment's id, created if needed, of the kind whose UI page is the runs table (a
    kind set by hand in the UI is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def source_tags(script: str | Path | None = None, commit: str = "") -> dict[str, str]:
    """A run's source for the UI: the pipeline script (default: this process's, so call it on
    the driver, not in a trial), JOB under `ray job submit` else LOCAL, and the git commit."""
    path = Path(script or sys.argv[0]).resolve()
    tags = {SOURCE_NAME_TAG: str(path), SOURCE_TYPE_TAG: "JOB" if os.environ.get(RAY_JOB_ENV)
            else "LOCAL"}
    return {**tags, SOURCE_COMMIT_TAG: commit} if commit and commit != "unknown" else tags


def log_dataset_input(client: MlflowClient, run_id: str, name: str, source: str, digest: str,
                      context: str = "training") -> None:
    """Record the shards a run read as an MLflow dataset input: `source` the shard folder (a
    path or URI), `digest` the data version. Only metadata is logged, never the data; logging
    the same input again is a no-op."""
    scheme = source.split("://", 1)[0] if "://" in source else "local"
    dataset = Dataset(name=name, digest=digest, source_type="local" if scheme == "file" else scheme,
                      source=json.dumps({"uri": source}))
    inputs = [DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, context)])]
    for attempt in range(3):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as e:
            # Trials that start together race to create the experiment's one row for this
            # dataset; the loser's insert fails on the unique key (seen with an MLflow server).
            # The row exists then, and logging again links it.
            duplicate = any(k in str(e) for k in ("UNIQUE constraint", "unique constraint", "Duplicate entry"))
            if not duplicate or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def _find_runs(client: MlflowClient, exp_id: str, filters: dict[str, str]) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    return client.search_runs([exp_id], filter_string=query, max_results=1000)


def _safe_param(value: Any) -> str:
    s = str(value)
    return s if len(s) <= 6000 else s[:5997] + "..."


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    existing = client.get_run(run_id).data.params
    items = [Param(k, _safe_param(v)) for k, v in sorted(params.items()) if k not in existing]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i:i + _BATCH])


def start_parent(client: MlflowClient, exp_id: str, sweep_key: str, name: str,
                 params: dict[str, Any], tags: dict[str, str]) -> str:
    """The sweep's parent run: found by its sweep key if it exists, else created."""
    found = [r for r in _find_runs(client, exp_id, {SWEEP_TAG: sweep_key})
             if PARENT_TAG not in r.data.tags]
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=name, tags={SWEEP_TAG: sweep_key, **tags})
        run_id = run.info.run_id
        log_params(client, run_id, params)
    return run_id


def child_run(client: MlflowClient, exp_id: str, parent_id: str, trial: str,
              params: dict[str, Any], tags: dict[str, str]) -> tuple[str, str]:
    """(run_id, status) of the trial's child run; an unfinished one is reused, not duplicated."""
    found = _find_runs(client, exp_id, {PARENT_TAG: parent_id, TRIAL_TAG: trial})
    finished = [r for r in found if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id, "FINISHED"
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, "RUNNING"
    run = client.create_run(exp_id, run_name=trial,
                            tags={PARENT_TAG: parent_id, TRIAL_TAG: trial, **tags})
    log_params(client, run.info.run_id, params)
    return run.info.run_id, "RUNNING"


def finish(client: MlflowClient, run_id: str, ok: bool = True) -> None:
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def final_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics)


class EpochLogger:
    """Logs one epoch's metrics to a run; built on rank 0 of a Train run from plain arguments."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        set_tags(self.client, self.run_id, tags)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
