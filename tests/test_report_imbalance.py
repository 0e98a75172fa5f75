"""The report's modality-imbalance section, from runs written to a real MLflow store by hand.

The store holds a method axis (normal, unimodal of audio, unimodal of image, the unimodal
ensemble) x data.missing.test_rate (0.0, 0.5) over 3 seeds. The unimodal image model was only
run at rate 0.0 and the ensemble only at 0.0; the unimodal audio model at rate 0.5 lacks seed 2.
Every expected number is computed here with numpy and scipy, not with mmray's helpers.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats as sst

from mmray.report import imbalance
from mmray.report.compare import CellResult, ReportOptions
from mmray.report.render import to_markdown
from mmray.report.writer import build_report, write_report
from mmray.tracking import mlflow_log as ml

AXES = ("method", "data.missing.test_rate", "seed")
METHODS = {"normal": {"method.name": "normal"},
           "unimodal+audio": {"method.name": "unimodal", "method.options.modality": "audio"},
           "unimodal+image": {"method.name": "unimodal", "method.options.modality": "image"},
           "unimodal_ensemble": {"method.name": "unimodal_ensemble"}}
# (method label, rate) -> metric -> value per seed 0, 1, 2 (None: no run of that seed)
RUNS = {
    ("normal", "0.0"): {"test/acc": [0.80, 0.78, 0.83], "test/acc_audio": [0.70, 0.66, 0.72],
                        "test/acc_image": [0.30, 0.41, 0.35]},
    ("normal", "0.5"): {"test/acc": [0.60, 0.55, 0.58], "test/acc_audio": [0.52, 0.50, 0.49],
                        "test/acc_image": [0.20, 0.28, 0.22]},
    ("unimodal+audio", "0.0"): {"test/acc_audio": [0.74, 0.73, 0.71]},
    ("unimodal+audio", "0.5"): {"test/acc_audio": [0.55, 0.58, None]},
    ("unimodal+image", "0.0"): {"test/acc_image": [0.52, 0.49, 0.55]},
    ("unimodal_ensemble", "0.0"): {"test/acc": [0.79, 0.75, 0.80]},
}


def _log(client, run_id: str, metrics: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


def write_store(tmp):
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = ml.ensure_experiment(client, "imb", str(tmp / "art"))
    parent = ml.start_parent(client, exp, "sweep-imb", "imb", {}, {})
    for (method, rate), metrics in RUNS.items():
        for seed in range(3):
            finals = {k: vs[seed] for k, vs in metrics.items() if vs[seed] is not None}
            if not finals:
                continue
            params = {"grid.method": method, "grid.data.missing.test_rate": rate,
                      "grid.seed": seed, **METHODS[method]}
            run, _ = ml.child_run(client, exp, parent, f"{method},{rate},{seed}", params, {})
            # the unimodal model's only logits are its modality's: fused = that modality
            fused = next(iter(finals.values()))
            _log(client, run, {"val/acc": fused, "test/acc": fused, **finals})
            ml.finish(client, run)
    return client, exp, parent


OPTIONS = ReportOptions(axes=AXES, values={"method": list(METHODS),
                                           "data.missing.test_rate": ["0.0", "0.5"]},
                        baseline=("method", "normal"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imbalance")
    client, exp, parent = write_store(tmp)
    out = tmp / "reports" / "imb"
    text = write_report(client, exp, parent, out, OPTIONS)
    data = json.loads((out / "report.json").read_text())
    return {"text": text, "data": data, "html": (out / "report.html").read_text()}


def _mean_ci(xs) -> tuple[float, list[float]]:
    xs = np.asarray(xs, dtype=float)
    half = sst.t.ppf(0.975, xs.size - 1) * xs.std(ddof=1) / np.sqrt(xs.size)
    return float(xs.mean()), [float(xs.mean() - half), float(xs.mean() + half)]


def _row(data, cell: str, modality: str) -> dict:
    rows = [r for r in data["imbalance"] if r["cell"] == cell and r["modality"] == modality]
    assert len(rows) == 1, data["imbalance"]
    return rows[0]


@pytest.mark.parametrize("rate, modality, seeds", [("0.0", "audio", [0, 1, 2]),
                                                   ("0.0", "image", [0, 1, 2]),
                                                   ("0.5", "audio", [0, 1])])
def test_rows_pair_in_model_and_unimodal_by_seed(sweep, rate, modality, seeds):
    row = _row(sweep["data"], f"method=normal, test_rate={rate}", modality)
    inside = [RUNS[("normal", rate)][f"test/acc_{modality}"][s] for s in seeds]
    alone = [RUNS[(f"unimodal+{modality}", rate)][f"test/acc_{modality}"][s] for s in seeds]
    assert row["seeds"] == [str(s) for s in seeds]
    assert row["unimodal_cell"] == f"method=unimodal+{modality}, test_rate={rate}"
    for key, xs in (("in_model", inside), ("unimodal", alone),
                    ("gap", np.subtract(alone, inside))):
        mean, ci = _mean_ci(xs)
        assert row[key]["mean"] == pytest.approx(mean), key
        assert row[key]["ci"] == pytest.approx(ci), key
    assert row["gap"]["p"] == pytest.approx(sst.ttest_rel(alone, inside).pvalue)


def test_known_gap_by_hand(sweep):
    # audio at rate 0.0: gaps 0.04, 0.07, -0.01 -> mean 1/30, sd 0.040415 (by hand)
    gap = _row(sweep["data"], "method=normal, test_rate=0.0", "audio")["gap"]
    assert gap["mean"] == pytest.approx(0.1 / 3)
    sd = np.sqrt(((0.04 - 0.1 / 3) ** 2 + (0.07 - 0.1 / 3) ** 2 + (-0.01 - 0.1 / 3) ** 2) / 2)
    assert sd == pytest.approx(0.040415, abs=1e-6)
    t = (0.1 / 3) / (sd / np.sqrt(3))
    assert gap["p"] == pytest.approx(2 * sst.t.sf(t, 2))


def test_no_unimodal_run_no_row_and_the_report_says_why(sweep):
    data, text = sweep["data"], sweep["text"]
    cells = {(r["cell"], r["modality"]) for r in data["imbalance"]}
    assert ("method=normal, test_rate=0.5", "image") not in cells and len(cells) == 3
    assert not any(r["cell"].startswith("method=unimodal") for r in data["imbalance"])
    assert data["imbalance_skipped"] == [{
        "cell": "method=normal, test_rate=0.5", "modality": "image",
        "reason": "no unimodal run of image has its grid values (the method aside)"}]
    assert ("No row for `image` in method=normal, test_rate=0.5: no `unimodal` run of `image` "
            "has its grid values (the method aside).") in text


def test_fused_beside_best_unimodal_and_ensemble(sweep):
    fused = {f["cell"]: f for f in sweep["data"]["imbalance_fused"]}
    assert sorted(fused) == ["method=normal, test_rate=0.0", "method=normal, test_rate=0.5"]
    at0 = fused["method=normal, test_rate=0.0"]
    assert at0["fused"]["mean"] == pytest.approx(np.mean(RUNS[("normal", "0.0")]["test/acc"]))
    # audio alone (0.7267) beats image alone (0.52)
    assert at0["best_unimodal"]["modality"] == "audio"
    mean, ci = _mean_ci(RUNS[("unimodal+audio", "0.0")]["test/acc_audio"])
    assert at0["best_unimodal"]["mean"] == pytest.approx(mean)
    assert at0["best_unimodal"]["ci"] == pytest.approx(ci)
    mean, ci = _mean_ci(RUNS[("unimodal_ensemble", "0.0")]["test/acc"])
    assert at0["ensemble"]["mean"] == pytest.approx(mean) and at0["ensemble"]["ci"] == pytest.approx(ci)
    assert fused["method=normal, test_rate=0.5"]["ensemble"] is None


def test_section_rendered_in_markdown_and_html(sweep):
    text = sweep["text"]
    section = text.split("## Modality imbalance")[1].split("\n## ")[0]
    assert "In-model: `test/acc_<m>`" in section
    assert ("| cell | modality | pairs | in-model | unimodal | gap (unimodal − in-model) "
            "| 95% CI | p | note |") in section
    # audio at 0.0: in-model 0.6933, alone 0.7267, gap 0.0333
    row = next(ln for ln in section.splitlines()
               if ln.startswith("| method=normal, test_rate=0.0 | audio |"))
    assert "| 3 | 0.6933 [" in row and "| 0.7267 [" in row and "| 0.0333 |" in row
    assert "| cell | fused | best unimodal | ensemble |" in section
    assert "| method=normal, test_rate=0.5 | 0.5767 [" in section
    assert "Modality imbalance" in sweep["html"] and 'class="imbalance"' in sweep["html"]


def _cell(method: str, metrics: dict[str, dict[str, float]], **cell) -> CellResult:
    params = {"method.name": method.split("+")[0]}
    if "+" in method:
        params["method.options.modality"] = method.split("+")[1]
    return CellResult({"method": method, **cell}, {s: f"r{s}" for s in ["0", "1"]}, metrics,
                      params)


def test_a_sweep_without_unimodal_runs_says_so(tmp_path):
    cells = [_cell("normal", {"test/acc": {"0": 0.8, "1": 0.7},
                              "test/acc_audio": {"0": 0.6, "1": 0.7},
                              "test/acc_top5": {"0": 1.0, "1": 1.0}})]
    report = build_report(cells, ReportOptions(axes=("method",)), "t", {}, tmp_path)
    text = to_markdown(report.blocks)
    assert "No `unimodal` run in this sweep" in text
    assert report.data["imbalance"] == [] and report.data["imbalance_fused"] == []
    # top5 is a variant of the fused accuracy, not a modality
    assert [s["modality"] for s in report.data["imbalance_skipped"]] == ["audio"]


def test_matching_prefers_the_cell_agreeing_on_method_axes_and_refuses_ties():
    acc = {"test/acc_audio": {"0": 0.5, "1": 0.6}}
    mm = _cell("normal", acc, **{"method.fusion": "sum"})
    concat = _cell("unimodal+audio", acc, **{"method.fusion": "concat"})
    summed = _cell("unimodal+audio", acc, **{"method.fusion": "sum"})
    assert imbalance.match(mm, [concat, summed]) == [summed]
    tie = [_cell("unimodal+audio", acc), _cell("unimodal+audio", acc)]
    assert len(imbalance.match(_cell("normal", acc), tie)) == 2
    report = imbalance.imbalance([_cell("normal", acc), *tie], "test/acc")
    assert report.rows == [] and report.skipped[0].reason == (
        "2 `unimodal` cells of `audio` match it equally well")


def test_in_model_logits_that_see_other_modalities_are_marked(tmp_path):
    from mmray.methods import METHODS as REGISTRY
    from mmray.report.render import to_markdown
    from mmray.report.writer import build_report

    acc = {"test/acc_image": {"0": 0.99, "1": 0.98}, "test/acc": {"0": 1.0, "1": 1.0}}
    uni = {"test/acc_image": {"0": 0.95, "1": 0.94}, "test/acc": {"0": 0.95, "1": 0.94}}
    cells = [_cell("greedy", acc), _cell("normal", acc), _cell("unimodal+image", uni)]
    report = imbalance.imbalance(cells, "test/acc")
    rows = {r.cell.cell["method"]: r for r in report.rows}
    assert rows["greedy"].mixed == REGISTRY["greedy"].mixed_branches != ""
    assert rows["normal"].mixed == ""
    opts = ReportOptions(axes=("method",), baseline=("method", "normal"))
    text = to_markdown(build_report(cells, opts, "t", {}, tmp_path).blocks)
    line = next(ln for ln in text.splitlines() if ln.startswith("| method=greedy | image"))
    assert "not unimodal: its gate recalibrates" in line
