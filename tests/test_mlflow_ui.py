"""What the MLflow UI shows of mmray's runs, read back through MlflowClient from a sqlite store:
the experiment kind that opens the runs table, a run's source, its dataset input (no Ray)."""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient

from mmray.tracking import mlflow_log as ml


def test_experiments_open_on_the_runs_table(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ml.ensure_experiment(client, "new", str(tmp_path / "art"))
    assert client.get_experiment(exp).tags[ml.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("old")  # made before mmray set the kind: it gets it
    assert ml.ensure_experiment(client, "old", None) == old
    assert client.get_experiment(old).tags[ml.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={ml.EXPERIMENT_KIND_TAG: "genai_development"})
    ml.ensure_experiment(client, "chosen", None)  # a kind chosen in the UI is kept
    assert client.get_experiment(chosen).tags[ml.EXPERIMENT_KIND_TAG] == "genai_development"


def test_source_tags_local_or_ray_job(tmp_path, monkeypatch):
    script = tmp_path / "pipelines" / "ablate.py"
    monkeypatch.delenv(ml.RAY_JOB_ENV, raising=False)
    assert ml.source_tags(script, commit="abc123") == {
        "mlflow.source.name": str(script), "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": "abc123"}
    monkeypatch.setenv(ml.RAY_JOB_ENV, "{}")  # set by Ray in a `ray job submit` entrypoint
    assert ml.source_tags(script, commit="unknown")["mlflow.source.type"] == "JOB"
    assert "mlflow.source.git.commit" not in ml.source_tags(script, commit="unknown")
    monkeypatch.setattr(sys, "argv", ["pipelines/train.py"])
    monkeypatch.chdir(tmp_path)
    assert ml.source_tags()["mlflow.source.name"] == str(tmp_path / "pipelines" / "train.py")


def test_dataset_input_names_the_shards_and_their_version(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ml.ensure_experiment(client, "e", str(tmp_path / "art"))
    run = client.create_run(exp).info.run_id
    shards = str(tmp_path / "shards" / "synthetic" / "0123456789abcdef")
    ml.log_dataset_input(client, run, "synthetic", shards, "0123456789abcdef")
    ml.log_dataset_input(client, run, "synthetic", shards, "0123456789abcdef")  # a restart
    s3 = client.create_run(exp).info.run_id
    ml.log_dataset_input(client, s3, "cremad", "s3://bucket/shards/cremad/v1", "v1")
    (inp,) = client.get_run(run).inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("synthetic", "0123456789abcdef")
    assert json.loads(inp.dataset.source) == {"uri": shards}
    assert inp.dataset.source_type == "local"
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    assert client.get_run(s3).inputs.dataset_inputs[0].dataset.source_type == "s3"
