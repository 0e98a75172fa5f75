"""An ablation through Ray Tune + Optuna + Ray Train, its MLflow runs, and --resume.

These start real Ray runtimes and trials (each ~20-30 s on 2 cores), so they are few and tiny.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmray.pipeline_support import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import PARENT_TAG, SWEEP_TAG, TRIAL_TAG

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return [*SMOKE_OVERRIDES, f"data.root={tmp / 'raw'}", f"data.data_dir={tmp / 'shards'}",
            f"storage_path={tmp / 'runs'}", "train.epochs=2", *extra]


def _children(client: MlflowClient, name: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if SWEEP_TAG in r.data.tags and PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    return parents[0], kids


def test_ablation_logs_parent_and_children_with_tuned_params(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    args = [sys.executable, "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
            "--report-dir", str(tmp_path / "reports"), "name=t1",
            "grid={method.fusion: [concat, sum]}",
            "search.space={train.lr: {type: loguniform, low: 0.0001, high: 0.05}}",
            *_overrides(tmp_path)]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The console: a line per trial event, not Ray Train's metrics dict per report
    console = out.stdout + out.stderr
    assert "Reporting training result" not in console
    for trial in ("fusion=concat", "fusion=sum"):
        assert f"{trial}: started" in console and f"{trial}: epoch 1  val/acc=" in console
        assert f"{trial}: done  test/acc=" in console
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t1")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table
    parent, kids = _children(client, "t1")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.name"] == str(ROOT / "pipelines" / "ablate.py")
    assert sorted(k.data.tags[TRIAL_TAG] for k in kids) == ["fusion=concat", "fusion=sum"]
    for kid in kids:
        assert kid.info.status == "FINISHED"
        p, t = kid.data.params, kid.data.tags
        assert p["method.fusion"] == kid.data.tags[TRIAL_TAG].split("=")[1] == p["grid.method.fusion"]
        lr = float(p["train.lr"])
        assert 1e-4 <= lr <= 0.05 and lr != 0.002  # chosen by Optuna, not the base config
        assert t["method"] == "normal" and t["dataset"] == "synthetic" and t["seed"] == "0"
        assert len(t["git_commit"]) > 0 and len(t["config_hash"]) == 12 and t["data_version"]
        assert t["mlflow.source.name"] == str(ROOT / "pipelines" / "ablate.py")
        assert t["mlflow.source.type"] == "LOCAL"
        (data,) = client.get_run(kid.info.run_id).inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest) == ("synthetic", t["data_version"])
        shards = tmp_path / "shards" / "synthetic" / t["data_version"]
        assert json.loads(data.dataset.source) == {"uri": str(shards)} and shards.is_dir()
        history = client.get_metric_history(kid.info.run_id, "val/acc")
        assert [m.step for m in history] == [0, 1]
        for key in ("train/loss", "val/acc_audio", "val/acc_image", "test/acc"):
            assert key in kid.data.metrics
    report = (tmp_path / "reports" / "t1" / "report.md").read_text()
    assert "| method.fusion | seeds | test/acc |" in report
    assert "| concat | 1 |" in report and "| sum | 1 |" in report
    assert (tmp_path / "reports" / "t1" / "curves.png").is_file()


def test_resume_after_killed_driver_runs_only_missing_trials(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    args = [sys.executable, "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
            "--report-dir", str(tmp_path / "reports"), "name=t2", "grid={seed: [0, 1]}",
            "resources.max_concurrent_trials=1", *_overrides(tmp_path)]
    client = MlflowClient(uri)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            exp = client.get_experiment_by_name("t2") if (tmp_path / "mlflow.db").exists() else None
            done = [r for r in client.search_runs([exp.experiment_id])
                    if TRIAL_TAG in r.data.tags and r.info.status == "FINISHED"] if exp else []
            if done:
                first = done[0]
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    assert first is not None, "no trial finished before the deadline"
    _, kids = _children(client, "t2")
    assert sum(k.info.status == "FINISHED" for k in kids) == 1

    out = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, kids = _children(client, "t2")
    names = sorted(k.data.tags[TRIAL_TAG] for k in kids)
    assert names == ["seed=0", "seed=1"]  # none lost, none duplicated
    assert all(k.info.status == "FINISHED" for k in kids)
    again = client.get_run(first.info.run_id)
    assert again.info.end_time == first.info.end_time  # the finished trial was not run again
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val/acc")] == [0, 1]
