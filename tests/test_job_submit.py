"""`ray job submit` of the ablation against a real head started with `ray start --head`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmray.cli import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import TRIAL_TAG

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    temp = tempfile.mkdtemp(prefix="mmray-head-", dir="/tmp")
    gcs, dash = _free_port(), _free_port()
    # The job's `python` must be this environment's, so the head starts with it first on PATH.
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    "--num-cpus=2", '--resources={"trial_slot": 2}', f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_runs_the_ablation_and_logs_to_mlflow(ray_head, tmp_path):
    address, env = ray_head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "MMRAY_GIT_COMMIT": "test-commit"},
                   "excludes": [".venv", "data", "runs", "mlruns", "mlartifacts", "reports", "*.db"]}
    overrides = [*SMOKE_OVERRIDES, f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
                 f"storage_path={tmp_path / 'runs'}", "name=job", "grid={seed: [0]}"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
           "--report-dir", str(tmp_path / "reports"), *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr, out.stdout[-2000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("job")
    runs = client.search_runs([exp.experiment_id])
    kids = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert [k.data.tags[TRIAL_TAG] for k in kids] == ["seed=0"]
    assert kids[0].info.status == "FINISHED" and kids[0].data.tags["git_commit"] == "test-commit"
    assert "test/acc" in kids[0].data.metrics
