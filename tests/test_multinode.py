"""An ablation on a real local Ray cluster of several nodes: trials spread over the nodes, and the
resources each trial takes come from the config."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmray.pipeline_support import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import TRIAL_TAG

from ray_procs import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture
def cluster():
    """A head with no CPUs that holds the trial slots (the drivers' node, as in cluster.yaml) and
    two worker nodes of 1 CPU each, as separate raylets on this machine."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="mmray-nodes-", dir="/tmp")  # socket paths must stay short
    # Every node gets its own agent ports: the defaults are fixed and would collide with any
    # other Ray on the machine (the test session's own).
    def ports() -> dict:
        return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()}

    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "resources": {"trial_slot": 2}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "temp_dir": temp, **ports()})
    workers = [c.add_node(num_cpus=1, **ports()) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c.address, {w.node_id for w in workers}
    finally:
        c.shutdown()


def concurrency_of(resources: dict, overrides: list[str]) -> int:
    from mmray.tune.grid import load_ablation
    from mmray.tune.sweep import concurrency

    abl = load_ablation(ROOT / "configs/ablations/demo.yaml", overrides)
    return concurrency(abl, 8, resources)


def test_trial_resources_come_from_the_config():
    res = {"CPU": 8.0, "GPU": 2.0, "trial_slot": 8.0}
    assert concurrency_of(res, ["train.device=cpu"]) == 8
    assert concurrency_of(res, ["train.device=cpu", "train.num_workers=2", "train.cpus_per_worker=2"]) == 2
    assert concurrency_of(res, ["train.device=auto"]) == 2  # one GPU per worker
    assert concurrency_of({**res, "trial_slot": 3.0}, ["train.device=cpu"]) == 3
    assert concurrency_of(res, ["train.device=cpu", "resources.max_concurrent_trials=1"]) == 1


def test_an_ablation_spreads_its_trials_over_the_nodes(cluster, tmp_path):
    address, worker_nodes = cluster
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": uri}
    args = [sys.executable, "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
            "--report-dir", str(tmp_path / "reports"), *SMOKE_OVERRIDES,
            f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
            f"storage_path={tmp_path / 'runs'}", "name=nodes", "grid={seed: [0, 1]}",
            "train.device=cpu", "train.num_workers=1", "train.cpus_per_worker=1"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nodes")
    kids = [r for r in client.search_runs([exp.experiment_id]) if TRIAL_TAG in r.data.tags]
    assert sorted(k.data.tags[TRIAL_TAG] for k in kids) == ["seed=0", "seed=1"]
    assert all(k.info.status == "FINISHED" for k in kids)
    nodes = [k.data.tags["train_nodes"] for k in kids]
    # Each trial's one worker took the one CPU of a worker node; running at once, the two trials
    # had to use both nodes (the head has no CPU).
    assert set(nodes) == worker_nodes, (nodes, worker_nodes)
    first, second = sorted(kids, key=lambda k: k.info.start_time)
    assert second.info.start_time < first.info.end_time  # they did run at the same time
