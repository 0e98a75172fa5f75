"""configs/ablations/balance_all.yaml end to end: `ablate.py --smoke` runs every imbalance method,
the unimodal models and their ensemble through Ray Tune and Ray Train, each to a finished MLflow
run with its own diagnostics, and writes the report with both baselines' tests and the costs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mmray.tracking.mlflow_log import PARENT_TAG, TRIAL_TAG
from mmray.tune.grid import value_label

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ablations" / "balance_all.yaml"
pytestmark = pytest.mark.ray
# A metric each method logs of its own (averaged over the epoch's steps or once an epoch).
OWN_DIAGNOSTIC = {
    "ogm_ge": "train/ogm/coeff_audio", "qmf": "train/qmf/conf_image", "mla": "train/loss/audio",
    "mmpareto": "train/pareto/conflict_image", "gblending": "gblend/w_image",
    "agm": "train/agm/coeff_image", "pmr": "train/pmr/proto_samples", "opm": "train/opm/drop_prob_audio",
    "reconboost": "train/recon/active", "greedy": "train/greedy/curation",
    "mmcosine": "train/mmcosine/cos_true_image", "unimodal_ensemble": "train/loss/image",
}


def test_balance_all_smoke_finishes_a_run_per_method_and_reports_both_baselines(tmp_path):
    work = tmp_path / "smoke"
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "pipelines/ablate.py", "--config", str(CONFIG), "--smoke",
                          "--smoke-dir", str(work)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    grid = yaml.safe_load(CONFIG.read_text())["grid"]["method"]
    expected = sorted(f"method={value_label(v)},seed=0" for v in grid)
    assert len(expected) == len(set(expected)) == 16
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("balance_all")
    runs = client.search_runs([exp.experiment_id])
    kids = [r for r in runs if PARENT_TAG in r.data.tags]
    assert sorted(r.data.tags[TRIAL_TAG] for r in kids) == expected
    names = {v["name"] for v in grid}
    assert {"mmpareto", "gblending", "agm", "pmr", "opm", "reconboost", "greedy", "mmcosine"} <= names
    for kid in kids:
        assert kid.info.status == "FINISHED", kid.data.tags[TRIAL_TAG]
        method = kid.data.params["method.name"]
        assert {"test/acc", "cost/train_epoch_s", "cost/flops_per_sample"} <= set(kid.data.metrics)
        own = OWN_DIAGNOSTIC.get(method)
        if own is not None:
            assert own in kid.data.metrics, (method, sorted(kid.data.metrics))
            assert math.isfinite(kid.data.metrics[own]) and math.isfinite(kid.data.metrics["test/acc"])
    report = (work / "balance_all" / "report.md").read_text()
    assert "Paired tests against the baseline `method=normal`" in report
    assert "Paired tests against the baseline `method=unimodal_ensemble`" in report
    assert "## Cost" in report and "time ÷ baseline" in report
