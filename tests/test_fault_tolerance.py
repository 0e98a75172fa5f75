"""Fault tolerance, tested by doing it: a Train worker process killed mid-run, and the run resumes
from its last checkpoint and ends exactly as an uninterrupted run. (A driver killed mid-sweep and
finished by `ablate.py --resume`: tests/test_ablate_ray.py.)"""

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

from ray_procs import group_and_descendants, stop_group

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray
EPOCHS = 10


def _run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("mmray")
    if exp is None:
        return None
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    return runs[0] if runs else None


def _registered_checkpoints(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def _train_workers(pgid: int) -> list[int]:
    pids = []
    for pid in group_and_descendants(pgid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::RayTrainWorker"):
            pids.append(pid)
    return pids


def test_a_killed_train_worker_resumes_from_its_checkpoint_with_the_same_result(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "pipelines/train.py", "--config", "configs/base.yaml",
           "--storage-path", str(tmp_path / "runs"), *SMOKE_OVERRIDES,
           f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
           "data.synthetic.num_samples=400", f"train.epochs={EPOCHS}", "train.device=cpu",
           "train.max_failures=2"]
    full = subprocess.run([*cmd, "--name", "full"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    client = MlflowClient(uri)
    proc = subprocess.Popen([*cmd, "--name", "killed"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not killed:
            time.sleep(0.25)
            # Ray Train's controller registers a reported checkpoint when it next polls the
            # workers (every 2 s) and records it in this snapshot; one that a worker reported but
            # the controller never collected dies with the worker.
            if _registered_checkpoints(tmp_path / "runs" / "killed"):
                killed = _train_workers(proc.pid)
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
        assert killed, "no Train worker found to kill before the run ended"
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            stop_group(proc.pid)
    stop_group(proc.pid)  # what the driver's embedded Ray left behind

    a, b = _run(client, "full"), _run(client, "killed")
    assert b.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(b.info.run_id, "val/acc")]
    # Resumed from a checkpoint, not from scratch: epoch 0 ran once; every epoch was logged.
    assert steps.count(0) == 1 and sorted(set(steps)) == list(range(EPOCHS)), steps
    for key in ("train/loss", "val/loss", "val/acc", "test/acc", "test/loss", "test/acc_audio"):
        assert b.data.metrics[key] == a.data.metrics[key], key
