"""`ray job submit` of the ablation against a real head started with `ray start --head`, logging
to a real `mlflow server` on 127.0.0.1, whose REST API returns the sweep's parent and child runs."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from mmray.pipeline_support import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import PARENT_TAG, SWEEP_TAG, TRIAL_TAG

from ray_procs import mlflow_server, submit_job
from ray_procs import ray_head as start_head

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture
def ray_head():
    with start_head() as head:
        yield head


def _api(uri: str, path: str, body: dict | None = None) -> dict:
    """A call to the MLflow REST API (POST with a JSON body, else GET)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_job_submit_runs_the_ablation_and_logs_to_an_mlflow_server(ray_head, tmp_path):
    address, env = ray_head
    with mlflow_server(tmp_path / "mlflow") as uri:
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "MMRAY_GIT_COMMIT": "test-commit"},
                       "excludes": [".venv", "data", "runs", "mlruns", "mlartifacts", "reports", "*.db"]}
        overrides = [*SMOKE_OVERRIDES, f"data.root={tmp_path / 'raw'}",
                     f"data.data_dir={tmp_path / 'shards'}", f"storage_path={tmp_path / 'runs'}",
                     "name=job", "grid={method.fusion: [concat, sum]}"]
        entrypoint = ["python", "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
                      "--report-dir", str(tmp_path / "reports"), *overrides]
        out = submit_job(address, env, entrypoint, ROOT, runtime_env)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "succeeded" in out.stdout + out.stderr, out.stdout[-2000:]

        exp = _api(uri, "experiments/get-by-name?experiment_name=job")["experiment"]
        runs = _api(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if SWEEP_TAG in t and PARENT_TAG not in t]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        kids = [(r, t) for r, t in zip(runs, tags) if t.get(PARENT_TAG) == parent_id]
        assert sorted(t[TRIAL_TAG] for _, t in kids) == ["fusion=concat", "fusion=sum"]
        for run, t in kids:
            assert run["info"]["status"] == "FINISHED" and t["git_commit"] == "test-commit"
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"test/acc", "val/acc_audio", "cost/flops_per_sample"} <= metrics
        # The report went through the server's artifact proxy onto its artifact store.
        listed = _api(uri, f"artifacts/list?run_id={parent_id}&path=report")["files"]
        assert {"report/report.md", "report/report.html"} <= {f["path"] for f in listed}
        assert list((tmp_path / "mlflow" / "artifacts").rglob("report.html"))
