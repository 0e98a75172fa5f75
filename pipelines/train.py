"""Train one configuration as a Ray Train run (or in this process with --local).

    python pipelines/train.py --config configs/base.yaml method.fusion=sum train.epochs=5

The run is named from its config hash (or --name), so running the same command again after a
failure resumes from the latest checkpoint. Metrics go to MLflow (experiment `tracking.experiment`,
default "mmray").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mmray.config import config_hash, flatten, to_dict
from mmray.pipeline_support import ConfigError, config_parser, fail, prepare_data, smoke_overrides
from mmray.train.experiment import ExperimentConfig, load_experiment, preflight


def run(cfg: ExperimentConfig, name: str, storage_path: str, local: bool) -> dict:
    prepared = prepare_data(cfg.data)
    if local:
        from mmray.train.loop import run_local

        history = run_local(cfg, prepared.version_dir, Path(storage_path) / name)
        return history[-1]

    from mlflow.tracking import MlflowClient

    from mmray.ray_utils import init_ray
    from mmray.tracking import mlflow_log as ml
    from mmray.train.ray_train import build_trainer, fit_trainer

    init_ray()
    uri = ml.resolve_tracking_uri(cfg.tracking.uri)
    client = MlflowClient(uri)
    exp_id = ml.ensure_experiment(client, cfg.tracking.experiment or "mmray", ml.artifact_root_for(uri))
    sources = ml.source_tags(commit=ml.git_commit())
    parent = ml.start_parent(client, exp_id, f"train:{name}", "train", params={}, tags=sources)
    run_id, status = ml.child_run(
        client, exp_id, parent, name, flatten(to_dict(cfg)),
        {**sources, **ml.run_tags(cfg, prepared.manifest["version"], ml.git_commit())})
    if status == "FINISHED":
        print(f"run {name} already finished; metrics from MLflow run {run_id}")
        return ml.final_metrics(client, run_id)
    ml.log_dataset_input(client, run_id, cfg.data.dataset, str(prepared.version_dir),
                         prepared.manifest["version"])
    trainer = build_trainer(cfg, prepared.version_dir, name, str(Path(storage_path).resolve()),
                            tracking={"uri": uri, "run_id": run_id})
    try:
        result = fit_trainer(trainer)
    except BaseException:
        ml.finish(client, run_id, ok=False)
        raise
    ml.finish(client, run_id, ok=True)
    ml.finish(client, parent, ok=True)
    print(f"MLflow: {uri} experiment {cfg.tracking.experiment or 'mmray'} run {run_id}")
    return dict(result.metrics)


def main(argv: list[str] | None = None) -> int:
    p: argparse.ArgumentParser = config_parser(__doc__.splitlines()[0], "configs/base.yaml")
    p.add_argument("--name", default=None, help="run name (default: derived from the config hash)")
    p.add_argument("--storage-path", default="runs/train", help="checkpoints and Train results")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmray-smoke-") as tmp:
        overrides = list(args.overrides)
        storage = args.storage_path
        if args.smoke:
            overrides = smoke_overrides(tmp) + overrides
            storage = str(Path(tmp) / "runs")
        try:
            cfg = load_experiment(args.config, overrides)
            if problems := preflight(cfg):  # files and names, before any work starts
                raise ConfigError(problems, args.config)
        except ConfigError as e:
            return fail(e)
        name = args.name or f"{cfg.method.name}-{config_hash(cfg)}"
        metrics = run(cfg, name, storage, args.local)
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "/" in k}
    print(json.dumps(shown, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
