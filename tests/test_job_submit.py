"""`ray job submit` of the ablation against a real head started with `ray start --head`."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmray.cli import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import TRIAL_TAG

from ray_procs import ray_head as start_head
from ray_procs import submit_job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture
def ray_head():
    with start_head() as head:
        yield head


def test_job_submit_runs_the_ablation_and_logs_to_mlflow(ray_head, tmp_path):
    address, env = ray_head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "MMRAY_GIT_COMMIT": "test-commit"},
                   "excludes": [".venv", "data", "runs", "mlruns", "mlartifacts", "reports", "*.db"]}
    overrides = [*SMOKE_OVERRIDES, f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
                 f"storage_path={tmp_path / 'runs'}", "name=job", "grid={seed: [0]}"]
    entrypoint = ["python", "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
                  "--report-dir", str(tmp_path / "reports"), *overrides]
    out = submit_job(address, env, entrypoint, ROOT, runtime_env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr, out.stdout[-2000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("job")
    runs = client.search_runs([exp.experiment_id])
    kids = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert [k.data.tags[TRIAL_TAG] for k in kids] == ["seed=0"]
    assert kids[0].info.status == "FINISHED" and kids[0].data.tags["git_commit"] == "test-commit"
    assert "test/acc" in kids[0].data.metrics
