"""An ablation sweep: the grid through Ray Tune, each trial a Ray Train run, all in MLflow.

Each Tune trial is a small function (the trial "driver") that reserves one `trial_slot` custom
resource rather than a CPU, builds a `TorchTrainer` named after the trial and calls `fit()`;
`TuneReportCallback` forwards the Train run's metrics to Tune. `Tuner(TorchTrainer(...))` is not
supported by Ray Train V2, hence this pattern.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mmray.config import config_hash, flatten, to_dict
from mmray.ray_utils import TRIAL_SLOT
from mmray.tracking import mlflow_log as ml
from mmray.tune.grid import AblationConfig, expand_grid, trial_experiment, value_label
from mmray.tune.progress import SweepProgress
from mmray.tune.search import CellSearcher

# Tune's cap on pending trials, read when the Tuner starts (`tune_controller.py`).
PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


def run_trial(config: dict, context: dict) -> None:
    """The Tune function trainable: one grid cell sample, trained as one Ray Train run."""
    from mmray.train.ray_train import build_trainer, fit_trainer  # in the trial process only

    trial = config["trial"]
    cfg = trial_experiment(context["base"], config["cell"], config["params"], context["workdir"])
    client = MlflowClient(context["tracking_uri"])
    params = flatten(to_dict(cfg))
    params.update({f"grid.{k}": value_label(v) for k, v in config["cell"].items()})
    run_id, status = ml.child_run(client, context["experiment_id"], context["parent_id"], trial,
                                  params, {ml.TRIAL_TAG: trial, **context["source_tags"],
                                           **ml.run_tags(cfg, context["data_version"],
                                                         context["git_commit"])})
    if status == "FINISHED":
        # Finished before an interruption: report what MLflow holds, train nothing again.
        tune.report({**ml.final_metrics(client, run_id), "mlflow_run_id": run_id})
        return
    ml.log_dataset_input(client, run_id, cfg.data.dataset, context["version_dir"],
                         context["data_version"])
    # The sweep prints a line per epoch (SweepProgress): Ray Train's per-report INFO records
    # go to its log files only.
    trainer = build_trainer(cfg, context["version_dir"], name=trial,
                            storage_path=context["train_storage"],
                            tracking={"uri": context["tracking_uri"], "run_id": run_id},
                            callbacks=[TuneReportCallback()], train_log_level="WARNING")
    try:
        fit_trainer(trainer)
    except BaseException:
        ml.finish(client, run_id, ok=False)
        raise
    ml.finish(client, run_id, ok=True)


def progress(abl: AblationConfig, n_trials: int) -> SweepProgress:
    """Console lines: the search metric per epoch, the report's main test metric at the end."""
    final = (abl.report.metrics[0] if abl.report.metrics
             else re.sub(r"^val/", "test/", abl.search.metric))
    return SweepProgress(abl.search.metric, final, n_trials)


def concurrency(abl: AblationConfig, n_trials: int, res: dict[str, float]) -> int:
    """Trials at once: the config's cap, else what the cluster's resources `res` (CPUs, GPUs,
    trial slots) fit with the config's workers per trial and their CPUs and GPUs: with
    gpus_per_worker 0.25 and one worker a trial, four trials per GPU.

    A resource the cluster has none of yet (CPUs on an autoscaling cluster whose head trains
    nothing and whose workers scale from 0) is left to the autoscaler: the trial slots bound the
    trials then; so do they for GPU runs while no GPU node is up (the CPUs up then, the head's,
    are not where their workers go). Nodes already up do count, so set
    resources.max_concurrent_trials on a cluster that has only some of its workers up."""
    if abl.resources.max_concurrent_trials:
        return min(abl.resources.max_concurrent_trials, n_trials)
    t = abl.experiment.train
    per_trial = {"CPU": t.num_workers * t.cpus_per_worker}
    if t.reserves_gpus(res.get("GPU", 0)):
        per_trial["GPU"] = t.num_workers * t.gpus_per_worker
    # + 1e-9: 0.9 GPUs / (3 × 0.3) is 0.9999999999999999 in floats, yet the trials fit.
    fits = [math.floor(res[k] / need + 1e-9) for k, need in per_trial.items() if res.get(k, 0) > 0]
    if "GPU" in per_trial and not res.get("GPU", 0):
        fits = []
    return max(1, min(n_trials, int(res.get(TRIAL_SLOT, 1)), *fits))


@dataclass
class SweepResult:
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    sweep_dir: str
    num_trials: int
    num_errors: int


def run_sweep(abl: AblationConfig, version_dir: str, data_version: str, *, resume: bool = False,
              tracking_uri: str | None = None, workdir: str | Path | None = None) -> SweepResult:
    """Run (or with `resume`, finish) the ablation's sweep; Ray must be initialised."""
    workdir = Path(workdir or ".").resolve()
    storage = abl.storage_path if "://" in abl.storage_path else str((workdir / abl.storage_path).resolve())
    sweep_dir = f"{storage}/{abl.name}"
    uri = tracking_uri or ml.resolve_tracking_uri(abl.experiment.tracking.uri, workdir)
    client = MlflowClient(uri)
    exp_id = ml.ensure_experiment(client, abl.experiment.tracking.experiment or abl.name,
                                  ml.artifact_root_for(uri, workdir))

    exists = "://" not in sweep_dir and Path(sweep_dir).exists()
    if exists and not resume:
        raise FileExistsError(
            f"a sweep named {abl.name!r} already exists at {sweep_dir}; pass --resume to finish it, "
            "or set name=... or storage_path=... to start a new one")
    sources = ml.source_tags(commit=ml.git_commit())  # the script this driver runs
    parent_id = ml.start_parent(client, exp_id, sweep_dir, abl.name,
                                params={**flatten(to_dict(abl.experiment)),
                                        **{f"grid.{k}": [value_label(v) for v in vs]
                                           for k, vs in abl.grid.items()}},
                                tags={"ablation": abl.name, "git_commit": ml.git_commit(),
                                      "data_version": data_version, "config_hash": config_hash(abl),
                                      **sources})
    context = {
        "base": to_dict(abl.experiment), "version_dir": str(version_dir), "data_version": data_version,
        "train_storage": f"{sweep_dir}/train", "tracking_uri": uri, "experiment_id": exp_id,
        "parent_id": parent_id, "git_commit": ml.git_commit(), "workdir": str(workdir),
        "source_tags": sources,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {TRIAL_SLOT: 1})
    cells = expand_grid(abl.grid)
    n_trials = len(cells) * abl.search.num_samples
    # RAY: Tune keeps at most this many trials pending (waiting for resources); by default a
    # handful, so on an autoscaling cluster the queued demand the autoscaler sees stays small
    # and it scales up a few nodes at a time (ray-project/ray#43451). The whole grid may wait.
    os.environ[PENDING_ENV] = str(n_trials)
    client.set_tag(parent_id, "tune_max_pending_trials", str(n_trials))
    if resume and tune.Tuner.can_restore(sweep_dir):
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if exists:  # a folder without a restorable state: an interrupted very first start
            shutil.rmtree(sweep_dir)
        searcher = CellSearcher(cells, abl.search.space, abl.search.num_samples,
                                metric=abl.search.metric, mode=abl.search.mode,
                                seed=abl.experiment.seed)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=n_trials,
                max_concurrent_trials=concurrency(abl, n_trials, ray.cluster_resources()),
                trial_name_creator=lambda t: t.config["trial"],
                trial_dirname_creator=lambda t: t.config["trial"],
            ),
            # verbose=0: no status tables; SweepProgress prints a line per trial event.
            run_config=tune.RunConfig(name=abl.name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=0, callbacks=[progress(abl, n_trials)]),
        )
    grid = tuner.fit()
    errors = sum(1 for r in grid if r.error is not None)
    ml.finish(client, parent_id, ok=errors == 0)
    return SweepResult(exp_id, parent_id, uri, sweep_dir, len(grid), errors)
