"""The results table, from runs written to a real MLflow store by hand."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from mmray.report import latest_parent, write_report
from mmray.report.summary import child_runs, markdown_table, summarize
from mmray.tracking import mlflow_log as ml


def _store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ml.ensure_experiment(client, "abl", str(tmp_path / "art"))
    parent = ml.start_parent(client, exp, "sweep-a", "abl", {}, {})
    # cell fusion=concat: seeds 0, 1; seed 0 has two tuned trials (best val wins)
    rows = [("concat", 0, 0, 0.9, 0.80), ("concat", 0, 1, 0.7, 0.99), ("concat", 1, 0, 0.8, 0.60),
            ("sum", 0, 0, 0.5, 0.50), ("sum", 1, 0, 0.5, 0.70)]
    for fusion, seed, t, val, test in rows:
        name = f"fusion={fusion},seed={seed},t={t}"
        run_id, _ = ml.child_run(client, exp, parent, name,
                                 {"grid.method.fusion": fusion, "grid.seed": seed}, {})
        client.log_metric(run_id, "val/acc", val)
        client.log_metric(run_id, "test/acc", test)
        ml.finish(client, run_id)
    unfinished, _ = ml.child_run(client, exp, parent, "fusion=sum,seed=2", {"grid.method.fusion": "sum",
                                                                           "grid.seed": 2}, {})
    client.log_metric(unfinished, "test/acc", 0.0)  # still running: must not count
    return client, exp, parent


def test_best_trial_per_seed_then_mean_and_std_over_seeds(tmp_path):
    client, exp, parent = _store(tmp_path)
    results = {r.cell["method.fusion"]: r for r in summarize(child_runs(client, exp, parent))}
    concat = results["concat"]
    assert sorted(concat.values["test/acc"]) == [0.6, 0.8]  # seed 0 -> the val-best trial (0.80)
    mean, std, n = concat.mean_std("test/acc")
    assert n == 2 and math.isclose(mean, 0.7) and math.isclose(std, math.sqrt(0.02))
    mean, std, n = results["sum"].mean_std("test/acc")
    assert n == 2 and math.isclose(mean, 0.6)
    table = markdown_table(list(results.values()), ["test/acc"])
    assert "| method.fusion | seeds | test/acc |" in table
    assert "| concat | 2 | 0.7000 ± 0.1414 |" in table


def test_child_runs_are_not_duplicated_and_report_is_attached(tmp_path):
    client, exp, parent = _store(tmp_path)
    again, status = ml.child_run(client, exp, parent, "fusion=sum,seed=0,t=0", {}, {})
    assert status == "FINISHED"
    assert len(child_runs(client, exp, parent)) == 6
    assert latest_parent(client, "abl") == (exp, parent)
    text = write_report(client, exp, parent, tmp_path / "rep", "val/acc", "max")
    assert "4 finished trials in 2 grid cells" in text
    assert [a.path for a in client.list_artifacts(parent)] == ["results.md"]
