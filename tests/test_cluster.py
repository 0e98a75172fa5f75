"""cluster.yaml: valid against the Ray autoscaler's own schema (offline), and mmray's contracts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(cfg: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(cfg))  # fills the provider's defaults, as `ray up` does
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_autoscaler_schema():
    prepared = _validate(CLUSTER)
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="zero"), "not of type"),
    (lambda c: c.update(head_node_type="cpu_head"), "head_node_type"),
    (lambda c: c.update(max_wrokers=3), "Additional properties are not allowed"),
])
def test_the_schema_check_would_catch_a_broken_file(break_it, error):
    broken = copy.deepcopy(CLUSTER)
    break_it(broken)
    with pytest.raises(Exception, match=error):
        _validate(broken)


def test_gpu_workers_scale_from_zero_and_the_head_declares_trial_slots():
    gpu = CLUSTER["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= CLUSTER["max_workers"]
    assert re.match(r"g\d", gpu["node_config"]["InstanceType"])  # a GPU instance family
    head_start = " ".join(CLUSTER["head_start_ray_commands"])
    slots = re.search(r"--resources='(\{.*?\})'", head_start)
    assert slots and json.loads(slots.group(1))["trial_slot"] >= 1
    assert "mlflow server" in head_start and "MLFLOW_TRACKING_URI" in head_start
    assert "MLFLOW_TRACKING_URI" in " ".join(CLUSTER["worker_start_ray_commands"])


def test_every_node_runs_this_ray_and_installs_this_project():
    ray_pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert ray_pin and ray_pin.group(1) == ray.__version__
    assert CLUSTER["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    (remote,) = [r for r, local in CLUSTER["file_mounts"].items() if local == "."]
    assert any(f"pip install -q -e {remote}" in c for c in CLUSTER["setup_commands"])
    for excluded in (".venv", "data", "runs", "mlflow.db"):
        assert excluded in CLUSTER["rsync_exclude"]
