"""The autoscaler reacting to an ablation, for real: Ray's fake multi-node provider starts worker
nodes (raylets on this machine) when a sweep submitted with `ray job submit` asks for resources
the cluster does not have, and stops them once they have been idle for the idle timeout.

The head offers no training resources (no CPU; the trial slots the trial drivers take); the one
worker node type scales from 0 and declares 1 CPU (the training worker's) and a fake GPU.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmray.pipeline_support import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import PARENT_TAG, TRIAL_TAG

from ray_procs import BIN, fake_autoscaling, ray_head, submit_job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

IDLE_TIMEOUT_MIN = 0.2  # 12 s; cloud clusters use minutes (cluster.yaml: 10)
WORKER = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 2**20},
          "min_workers": 0, "max_workers": 2}


def _nodes(env: dict, address: str) -> list[dict]:
    """Every node the cluster has had (alive and dead), from the State API."""
    out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", address, "--format",
                          "json", "--limit", "100"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_a_submitted_sweep_scales_workers_up_and_they_go_when_idle(tmp_path):
    autoscaling = fake_autoscaling({"trial_slot": 2}, {"worker": WORKER}, IDLE_TIMEOUT_MIN)
    with ray_head(num_cpus=0, trial_slots=2, autoscaling=autoscaling) as (address, env):
        assert [n["is_head_node"] for n in _nodes(env, address)] == [True]  # scales from 0
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        # No working dir upload: the fake nodes are raylets on this machine that share one
        # runtime_resources folder, and a node the autoscaler stops deletes the uploaded package,
        # the job's working dir included. The job names the checkout's files instead.
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
        entrypoint = ["python", str(ROOT / "pipelines/ablate.py"),
                      "--config", str(ROOT / "configs/ablations/demo.yaml"),
                      "--report-dir", str(tmp_path / "reports"), *SMOKE_OVERRIDES,
                      f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
                      f"storage_path={tmp_path / 'runs'}", "name=autoscale",
                      "grid={method.fusion: [concat, sum]}", "train.device=cpu",
                      "train.num_workers=1", "train.cpus_per_worker=1"]
        out = submit_job(address, env, entrypoint, ROOT, runtime_env, timeout_s=420,
                         upload=False)
        assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, (
            out.stdout[-4000:] + out.stderr[-4000:])

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("autoscale")
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
        kids = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
        assert sorted(k.data.tags[TRIAL_TAG] for k in kids) == ["fusion=concat", "fusion=sum"]
        assert all(k.info.status == "FINISHED" for k in kids)
        # Tune may keep the whole grid pending, so the autoscaler sees all of its demand.
        assert parent.data.tags["tune_max_pending_trials"] == "2"

        nodes = _nodes(env, address)
        launched = {n["node_id"] for n in nodes if not n["is_head_node"]}
        assert 1 <= len(launched) <= WORKER["max_workers"], nodes
        # The training ran on the launched nodes (the head has no CPU for it).
        assert {k.data.tags["train_nodes"] for k in kids} <= launched

        # Idle workers are released after the idle timeout (plus the autoscaler's polling).
        deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 90
        while (alive := [n for n in _nodes(env, address)
                         if not n["is_head_node"] and n["state"] == "ALIVE"]):
            assert time.monotonic() < deadline, f"workers still up after the idle timeout: {alive}"
            time.sleep(3)
