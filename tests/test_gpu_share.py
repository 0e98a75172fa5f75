"""Trials that share a GPU: `train.gpus_per_worker` may be a fraction; the concurrency rule and
Ray's scheduling fit that many trials on one GPU.

The real run uses a local Ray cluster that declares one fake GPU. Its trials train on the CPU
(`train.device=cpu`) while reserving their GPU fraction (`train.reserve_gpus_on_cpu=true`): the
run says where it trains, and Ray's scheduling sees GPU trials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmray.config import ConfigError
from mmray.pipeline_support import SMOKE_OVERRIDES
from mmray.tracking.mlflow_log import TRIAL_TAG
from mmray.train.experiment import load_experiment

from ray_procs import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["0.25", "0.5", "1", "2", "8"])
def test_gpus_per_worker_takes_fractions_up_to_one_and_whole_numbers(value):
    assert load_experiment(None, [f"train.gpus_per_worker={value}"]).train.gpus_per_worker == float(value)


@pytest.mark.parametrize("value, error", [
    ("1.5", "fraction above 1"), ("0", "gpus_per_worker"), ("-0.25", "gpus_per_worker"),
    ("16", "gpus_per_worker"), ("quarter", "gpus_per_worker"),
])
def test_gpus_per_worker_refuses_what_ray_cannot_place(value, error):
    with pytest.raises(ConfigError, match=error):
        load_experiment(None, [f"train.gpus_per_worker={value}"])


def concurrency_of(resources: dict, overrides: list[str], n_trials: int = 16) -> int:
    from mmray.tune.grid import load_ablation
    from mmray.tune.sweep import concurrency

    return concurrency(load_ablation(ROOT / "configs/ablations/demo.yaml", overrides), n_trials,
                       resources)


def test_trials_per_gpu_follow_the_gpu_fraction():
    res = {"CPU": 64.0, "GPU": 2.0, "trial_slot": 64.0}
    cuda = ["train.device=cuda"]
    assert concurrency_of(res, cuda) == 2  # a whole GPU a worker (the default)
    assert concurrency_of(res, [*cuda, "train.gpus_per_worker=0.25"]) == 8
    assert concurrency_of(res, [*cuda, "train.gpus_per_worker=0.5", "train.num_workers=2"]) == 2
    # Float fractions that sum to a whole: 3 trials of 3 workers at 0.1 GPU fit 0.9 GPUs.
    assert concurrency_of({**res, "GPU": 0.9}, [*cuda, "train.gpus_per_worker=0.1",
                                                "train.num_workers=3"]) == 3
    assert concurrency_of(res, [*cuda, "train.gpus_per_worker=2"]) == 1
    # The other bounds still hold: trial slots, CPUs, the grid size.
    assert concurrency_of({**res, "trial_slot": 3.0}, [*cuda, "train.gpus_per_worker=0.25"]) == 3
    assert concurrency_of({**res, "CPU": 4.0}, [*cuda, "train.gpus_per_worker=0.25"]) == 4
    assert concurrency_of(res, [*cuda, "train.gpus_per_worker=0.25"], n_trials=5) == 5


def test_gpu_fractions_count_only_for_runs_that_reserve_gpus():
    res = {"CPU": 64.0, "GPU": 1.0, "trial_slot": 64.0}
    quarter = "train.gpus_per_worker=0.25"
    assert concurrency_of(res, ["train.device=auto", "train.gpus_per_worker=0.5"]) == 2
    assert concurrency_of(res, ["train.device=cpu", quarter]) == 16  # no GPU taken
    assert concurrency_of(res, ["train.device=cpu", quarter, "train.reserve_gpus_on_cpu=true"]) == 4
    assert concurrency_of({"CPU": 64.0, "trial_slot": 64.0}, ["train.device=auto", quarter]) == 16


def test_resources_the_cluster_has_none_of_yet_are_left_to_the_autoscaler():
    # A head with trial slots and no CPU or GPU, its GPU workers scaled to 0: the slots decide.
    head_only = {"trial_slot": 8.0}
    assert concurrency_of(head_only, ["train.device=cuda", "train.gpus_per_worker=0.25"]) == 8
    assert concurrency_of({**head_only, "CPU": 0.0}, ["train.device=cpu"]) == 8
    # A GPU sweep on a head with CPUs (cluster.yaml's) and no GPU node up yet: the slots decide.
    assert concurrency_of({**head_only, "CPU": 8.0}, ["train.device=cuda", "train.cpus_per_worker=2",
                                                      "train.gpus_per_worker=0.25"]) == 8
    # Nodes already up do count: one GPU node of 1 GPU up bounds quarter-GPU trials to 4.
    assert concurrency_of({**head_only, "GPU": 1.0, "CPU": 8.0},
                          ["train.device=cuda", "train.gpus_per_worker=0.25"]) == 4


@pytest.fixture
def one_fake_gpu():
    """A one-node local Ray cluster declaring 2 CPUs, 1 (fake) GPU and 4 trial slots."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="mmray-gpu-", dir="/tmp")  # socket paths must stay short
    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "resources": {"trial_slot": 4}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "temp_dir": temp,
        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()})
    c.wait_for_nodes()
    try:
        yield c.address
    finally:
        c.shutdown()


@pytest.mark.ray
def test_four_quarter_gpu_trials_run_at_once_on_one_gpu(one_fake_gpu, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": one_fake_gpu, "MLFLOW_TRACKING_URI": uri}
    args = [sys.executable, "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
            "--report-dir", str(tmp_path / "reports"), *SMOKE_OVERRIDES,
            f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
            f"storage_path={tmp_path / 'runs'}", "name=share",  # demo grid: 2 fusions x 2 seeds
            "train.device=cpu", "train.reserve_gpus_on_cpu=true", "train.gpus_per_worker=0.25",
            "train.num_workers=1", "train.cpus_per_worker=0.5"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("share")
    kids = [r for r in client.search_runs([exp.experiment_id]) if TRIAL_TAG in r.data.tags]
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    # Each trial's worker held a quarter of the one GPU in Ray's scheduling, and trained on the CPU.
    assert [k.data.tags["train_gpus"] for k in kids] == ["0.25"] * 4
    assert {k.data.tags["train_device"] for k in kids} == {"cpu"}
    # All four trained at the same time: the last to start started before the first ended.
    assert max(k.info.start_time for k in kids) < min(k.info.end_time for k in kids)
