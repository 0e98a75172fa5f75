"""The comparison report, from runs written to a real MLflow store by hand.

The store holds a 2 x 2 grid (method.name x data.missing.test_rate) over 3 seeds: validation
histories per epoch, final test metrics, FLOPs and robustness metrics, one cell-seed with two
tuned trials (the val-best must win) and one unfinished run (must not count).
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats as sst

from mmray.config import ConfigError, from_dict
from mmray.report.summary import summarize
from mmray.report.writer import report_options, write_report
from mmray.tracking import mlflow_log as ml
from mmray.tracking.mlflow_read import child_runs, latest_parent
from mmray.tune.grid import AblationConfig

from helpers import load_pipeline

GRID = {"method.name": ["normal", "ogm_ge"], "data.missing.test_rate": [0.0, 0.5], "seed": [0, 1, 2]}
# (method, rate) -> test/acc per seed; ogm_ge at rate 0.5 has no finished seed 2
TEST_ACC = {("normal", "0.0"): [0.80, 0.70, 0.75], ("ogm_ge", "0.0"): [0.85, 0.78, 0.79],
            ("normal", "0.5"): [0.60, 0.55, 0.50], ("ogm_ge", "0.5"): [0.70, 0.58]}
FLOPS = {"normal": 2.0e6, "ogm_ge": 2.5e6}
PNGS = ["curves.png", "missing_rate_test_acc.png", "robustness_test_acc.png", "flops_test_acc.png"]


def val_curve(method: str, rate: str, seed: int) -> list[float]:
    """val/acc at epochs 0, 1, 2 (the last one is the selection value)."""
    top = 0.9 - 0.2 * float(rate) + (0.05 if method == "ogm_ge" else 0.0) - 0.01 * seed
    return [top - 0.2, top - 0.1, top]


def _log(client, run_id: str, method: str, rate: str, seed: int, test_acc: float,
         val_top: float | None = None) -> None:
    now = int(time.time() * 1000)
    curve = val_curve(method, rate, seed)
    if val_top is not None:
        curve[-1] = val_top
    ms = [Metric("val/acc", v, now, e) for e, v in enumerate(curve)]
    ms += [Metric("val/acc_audio", v + 0.05, now, e) for e, v in enumerate(curve)]
    ms += [Metric("val/acc_image", v - 0.3, now, e) for e, v in enumerate(curve)]
    last = len(curve) - 1
    finals = {"test/acc": test_acc, "test/acc_audio": test_acc + 0.05, "test/loss": 1.0,
              "cost/flops_per_sample": FLOPS[method],
              "test_miss_both_0.5/acc": test_acc - 0.1, "test_miss_both_0.9/acc": test_acc - 0.3,
              "test_miss_image_0.5/acc": test_acc - 0.02}
    ms += [Metric(k, v, now, last) for k, v in finals.items()]
    client.log_batch(run_id, metrics=ms)


def _child(client, exp, parent, method, rate, seed, trial=""):
    name = f"name={method},test_rate={rate},seed={seed}{trial}"
    params = {"grid.method.name": method, "grid.data.missing.test_rate": rate, "grid.seed": seed}
    return ml.child_run(client, exp, parent, name, params, {})[0]


def write_store(tmp):
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = ml.ensure_experiment(client, "abl", str(tmp / "art"))
    parent = ml.start_parent(client, exp, "sweep-a", "abl", {}, {})
    for (method, rate), accs in TEST_ACC.items():
        for seed, acc in enumerate(accs):
            run = _child(client, exp, parent, method, rate, seed)
            _log(client, run, method, rate, seed, acc)
            ml.finish(client, run)
    # a second tuned trial of (normal, 0.0, seed 0): lower val, much higher test -> not selected
    run = _child(client, exp, parent, "normal", "0.0", 0, ",t=1")
    _log(client, run, "normal", "0.0", 0, 0.99, val_top=0.1)
    ml.finish(client, run)
    unfinished = _child(client, exp, parent, "ogm_ge", "0.5", 2)
    _log(client, unfinished, "ogm_ge", "0.5", 2, 0.0)  # still running: must not count
    return client, exp, parent


def ablation(**report) -> AblationConfig:
    return from_dict(AblationConfig, {"name": "abl", "grid": GRID, "report": report})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    client, exp, parent = write_store(tmp)
    out = tmp / "reports" / "abl"
    opts = report_options(ablation(baseline={"method.name": "normal"}))
    text = write_report(client, exp, parent, out, opts)
    data = json.loads((out / "report.json").read_text())
    return {"client": client, "exp": exp, "parent": parent, "out": out, "text": text, "data": data}


def _cell(data, method, rate):
    return next(c for c in data["cells"]
                if c["cell"] == {"method.name": method, "data.missing.test_rate": rate})


def _ci(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = sst.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def test_selection_keeps_val_best_trial_and_only_finished_runs(sweep):
    results = summarize(child_runs(sweep["client"], sweep["exp"], sweep["parent"]))
    cells = {(r.cell["method.name"], r.cell["data.missing.test_rate"]): r for r in results}
    assert len(cells) == 4
    assert cells[("normal", "0.0")].values("test/acc") == {"0": 0.80, "1": 0.70, "2": 0.75}
    assert cells[("ogm_ge", "0.5")].seeds == ["0", "1"]
    # a finished trial is found again by name, never run (or counted) twice
    _, status = ml.child_run(sweep["client"], sweep["exp"], sweep["parent"],
                             "name=normal,test_rate=0.0,seed=0", {}, {})
    assert status == "FINISHED"
    assert len(child_runs(sweep["client"], sweep["exp"], sweep["parent"])) == 13  # 11 + a 2nd trial + 1 unfinished
    assert latest_parent(sweep["client"], "abl") == (sweep["exp"], sweep["parent"])


def test_cell_statistics_match_hand_computation(sweep):
    for (method, rate), accs in TEST_ACC.items():
        got = _cell(sweep["data"], method, rate)["metrics"]["test/acc"]
        assert got["n"] == len(accs) and got["mean"] == pytest.approx(sum(accs) / len(accs))
        assert got["ci"] == pytest.approx(list(_ci(accs)))
    normal = _cell(sweep["data"], "normal", "0.0")["metrics"]["test/acc"]
    assert normal["std"] == pytest.approx(0.05)
    # t(0.975, 2) = 4.302653; 0.75 -+ 4.302653 * 0.05 / sqrt(3)
    assert "| normal | 0.0 | 3 | 0.7500 ± 0.0500 [0.6258, 0.8742] |" in sweep["text"]
    assert "| ogm_ge | 0.5 | 2 | 0.6400 ± 0.0849 [-0.1224, 1.4024] |" in sweep["text"]
    header = ("| method.name | data.missing.test_rate | seeds | test/acc | test/acc_audio "
              "| cost/flops_per_sample |")
    assert header in sweep["text"] and "test/loss" not in sweep["text"]
    assert "(n = 1)" not in sweep["text"]


def test_paired_comparisons_against_baseline_with_holm(sweep):
    comps = {c["cell"]["data.missing.test_rate"]: c for c in sweep["data"]["comparisons"]["test/acc"]}
    assert sorted(comps) == ["0.0", "0.5"]  # ogm_ge vs normal at each rate; nothing else
    for rate, c in comps.items():
        assert c["cell"]["method.name"] == "ogm_ge"
        assert c["baseline_cell"] == {"method.name": "normal", "data.missing.test_rate": rate}
    a, b = TEST_ACC[("ogm_ge", "0.0")], TEST_ACC[("normal", "0.0")]
    p0 = sst.ttest_rel(a, b).pvalue
    assert comps["0.0"]["n"] == 3 and comps["0.0"]["p"] == pytest.approx(p0)
    assert comps["0.0"]["mean_diff"] == pytest.approx((0.05 + 0.08 + 0.04) / 3)
    # seed 2 of ogm_ge at 0.5 is unfinished: paired on seeds 0 and 1 only
    assert comps["0.5"]["seeds"] == ["0", "1"]
    p5 = sst.ttest_rel([0.70, 0.58], [0.60, 0.55]).pvalue
    assert comps["0.5"]["p"] == pytest.approx(p5)
    lo, hi = sorted([p0, p5])
    holm = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}
    assert comps["0.0"]["p_holm"] == pytest.approx(holm[p0])
    assert comps["0.5"]["p_holm"] == pytest.approx(holm[p5])
    assert "Paired tests against the baseline `method.name=normal`" in sweep["text"]
    assert "| name=ogm_ge, test_rate=0.0 | name=normal, test_rate=0.0 | 3 | 0.0567 |" in sweep["text"]


def test_curves_are_means_over_seeds_per_epoch(sweep):
    curves = sweep["data"]["curves"]["name=normal, test_rate=0.5"]
    assert sorted(curves) == ["audio", "fused", "image"]
    expect = [sum(val_curve("normal", "0.5", s)[e] for s in range(3)) / 3 for e in range(3)]
    assert curves["fused"]["epochs"] == [0, 1, 2]
    assert curves["fused"]["mean"] == pytest.approx(expect)
    assert curves["image"]["mean"] == pytest.approx([v - 0.3 for v in expect])


def test_figures_are_written_and_attached_to_the_parent_run(sweep):
    out = sweep["out"]
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in sweep["text"]
    assert [p["file"] for p in sweep["data"]["plots"]] == PNGS
    arts = sorted(a.path for a in sweep["client"].list_artifacts(sweep["parent"], "report"))
    assert arts == sorted(f"report/{n}" for n in ["report.md", "report.html", "report.json", *PNGS])


def test_robustness_and_flops_series(sweep):
    from mmray.report import compare
    from mmray.report.compare import ReportOptions

    results = summarize(child_runs(sweep["client"], sweep["exp"], sweep["parent"]))
    axes = ["method.name", "data.missing.test_rate"]
    lines = compare.robustness_lines(results, axes, "test/acc")
    assert sorted(lines) == ["both", "image"]
    both = next(ln for ln in lines["both"] if ln.label == "name=normal, test_rate=0.0")
    assert [p.x for p in both.points] == [0.5, 0.9]
    assert both.points[1].y.mean == pytest.approx(0.75 - 0.3)
    rate = compare.missing_rate_lines(results, axes, "test/acc")
    assert sorted(ln.label for ln in rate) == ["name=normal", "name=ogm_ge"]
    assert [p.x for p in rate[0].points] == [0.0, 0.5]
    flops = {p.label: p for p in compare.flops_points(results, axes, "test/acc")}
    assert flops["name=ogm_ge, test_rate=0.5"].x == 2.5e6
    assert flops["name=ogm_ge, test_rate=0.5"].y.mean == pytest.approx(0.64)
    assert ReportOptions(search_metric="val/f1_macro").main_metrics == ["test/f1_macro"]


def test_the_report_tabulates_robustness_per_type_and_rate(sweep):
    text = sweep["text"]
    assert "## Robustness: `test/acc` at other test missing rates" in text
    section = text.split("## Robustness")[1].split("\n## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| cell"))
    assert header == "| cell | both η=0.5 | both η=0.9 | image η=0.5 |"
    row = next(line for line in section.splitlines() if line.startswith("| name=normal, test_rate=0.0 |"))
    accs = TEST_ACC[("normal", "0.0")]
    lo, hi = _ci([a - 0.3 for a in accs])
    assert f"{sum(accs) / 3 - 0.3:.4f} ± " in row.split(" | ")[2] and f"[{lo:.4f}, {hi:.4f}]" in row


def test_default_baseline_and_metrics_from_the_ablation():
    opts = report_options(ablation())
    assert opts.baseline == ("method.name", "normal") and opts.main_metrics == ["test/acc"]
    opts = report_options(ablation(baseline={"method.name": "ogm_ge"}, metrics=["test/acc_audio"]))
    assert opts.baseline == ("method.name", "ogm_ge") and opts.main_metrics == ["test/acc_audio"]
    rate = report_options(ablation(baseline={"data.missing.test_rate": 0}))
    assert rate.baseline == ("data.missing.test_rate", "0.0")  # the grid value's label
    mapped = from_dict(AblationConfig, {"grid": {"method": [{"name": "normal"}, {"name": "qmf"}]},
                                        "report": {"baseline": {"method": "qmf"}}})
    assert report_options(mapped).baseline == ("method", "qmf")


@pytest.mark.parametrize("baseline, message", [
    ({"method.fusion": "sum"}, "report.baseline.method.fusion: not a non-seed grid axis; accepted: "
                               "['method.name', 'data.missing.test_rate']"),
    ({"seed": 0}, "report.baseline.seed: not a non-seed grid axis"),
    ({"method.name": "mla"}, "report.baseline.method.name: 'mla' is not a value of "
                             "grid.method.name; accepted: ['normal', 'ogm_ge']"),
    ({"method.name": "normal", "seed": 0}, "must name one grid axis"),
])
def test_bad_baseline_is_rejected_naming_the_key(baseline, message):
    with pytest.raises(ConfigError) as err:
        ablation(baseline=baseline)
    assert message in str(err.value)


def test_report_pipeline_prints_the_table_on_demand(sweep, tmp_path, monkeypatch, capsys):
    report_script = load_pipeline("report")

    cfg = tmp_path / "abl.yaml"
    cfg.write_text(json.dumps({"name": "abl", "grid": GRID}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep["client"].tracking_uri)
    rc = report_script.main(["--config", str(cfg), "--report-dir", str(tmp_path / "rep")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| normal | 0.0 | 3 | 0.7500 ± 0.0500 [0.6258, 0.8742] |" in printed
    assert (tmp_path / "rep" / "abl" / "report.html").is_file()


# ---------------------------------------------------------------------------------------------
# Rendering: report.html in headless Chromium
# ---------------------------------------------------------------------------------------------

# Appended to a copy of report.html beside it: once everything has loaded, each <img> records its
# natural width (0: the file did not load or decode). A deliberately broken image shows that the
# check can fail.
_PROBE = ('<img id="probe" src="no-such-file.png"><script>window.addEventListener("load", () => {'
          'for (const i of document.images) i.setAttribute("data-width", i.naturalWidth);'
          'document.body.setAttribute("data-loaded", "1");});</script>')


def _chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not found on PATH (make test installs Debian's `chromium`)")
    return found


def _dump_dom(browser: str, page, profile) -> str:
    import subprocess

    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class _Dom:
    """The tables (rows of cell texts), images and body attributes of a dumped DOM."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.tables: list[list[list[str]]] = []
        self.images: list[dict] = []
        self.body: dict = {}
        dom = self

        class Parser(HTMLParser):
            cell: list[str] | None = None

            def handle_starttag(self, tag, attrs):
                if tag == "table":
                    dom.tables.append([])
                elif tag == "tr":
                    dom.tables[-1].append([])
                elif tag in ("td", "th"):
                    self.cell = []
                elif tag == "img":
                    dom.images.append(dict(attrs))
                elif tag == "body":
                    dom.body = dict(attrs)

            def handle_endtag(self, tag):
                if tag in ("td", "th") and self.cell is not None:
                    dom.tables[-1][-1].append("".join(self.cell).strip())
                    self.cell = None

            def handle_data(self, data):
                if self.cell is not None:
                    self.cell.append(data)

        Parser().feed(text)


def test_html_report_renders_tables_and_images_in_chromium(sweep, tmp_path):
    browser = _chromium()
    html_text = (sweep["out"] / "report.html").read_text()
    # self-contained: no stylesheet, script or font to fetch; images are files beside it
    assert not any(s in html_text for s in ("<link", "<script", "url(", "@import", "href="))
    assert sorted(re.findall(r'src="([^"]+)"', html_text)) == sorted(PNGS)
    page = sweep["out"] / "browser_check.html"
    page.write_text(html_text.replace("</body>", _PROBE + "</body>"))
    dom = _Dom(_dump_dom(browser, page, tmp_path / "profile"))
    assert dom.body.get("data-loaded") == "1", "the page's load event never fired"
    cells, robust, comps, cost = dom.tables
    assert cells[0][:4] == ["method.name", "data.missing.test_rate", "seeds", "test/acc"]
    assert cells[1][:4] == ["normal", "0.0", "3", "0.7500 ± 0.0500 [0.6258, 0.8742]"]
    assert robust[0] == ["cell", "both η=0.5", "both η=0.9", "image η=0.5"] and len(robust) == 1 + 4
    assert len(cells) == 1 + 4 and len(comps) == 1 + 2
    assert comps[0][6:8] == ["p", "p (Holm)"] and comps[1][2] == "3"
    assert cost[0][0] == "cell" and "FLOPs / sample" in cost[0] and len(cost) == 1 + 4
    widths = {i["src"]: int(i["data-width"]) for i in dom.images}
    assert widths.pop("no-such-file.png") == 0  # a missing file is caught
    assert sorted(widths) == sorted(PNGS) and all(w > 0 for w in widths.values()), widths


# ---------------------------------------------------------------------------------------------
# The document from hand-made cells (no MLflow)
# ---------------------------------------------------------------------------------------------


def _cells(table: dict[str, dict[str, float]], metric: str = "test/acc"):
    from mmray.report.compare import CellResult

    return [CellResult({"method.name": m}, {s: f"run-{m}-{s}" for s in vals}, {metric: vals})
            for m, vals in table.items()]


def test_rows_follow_the_grid_order_and_one_seed_says_undefined(tmp_path):
    from mmray.report.compare import ReportOptions
    from mmray.report.render import to_markdown
    from mmray.report.writer import build_report

    cells = _cells({"a": {"0": 0.5, "1": 0.7}, "b": {"0": 0.6}, "c": {"0": 0.4, "1": 0.8}})
    opts = ReportOptions(axes=("method.name", "seed"), baseline=("method.name", "c"),
                         values={"method.name": ["c", "b", "a"]})
    report = build_report(cells, opts, "t", {}, tmp_path)
    text = to_markdown(report.blocks)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "seeds" not in ln]
    assert [r.split(" | ")[0] for r in rows[:3]] == ["| c", "| b", "| a"]
    assert "| b | 1 | 0.6000 (n = 1) |" in text and "std and confidence interval are undefined" in text
    comps = {c["cell"]["method.name"]: c for c in report.data["comparisons"]["test/acc"]}
    assert comps["b"]["n"] == 1 and comps["b"]["p"] is None and comps["b"]["p_holm"] is None
    assert comps["a"]["p_holm"] == pytest.approx(comps["a"]["p"])  # the only defined p: m = 1
    assert "1 pair: t-test and confidence interval undefined" in text
    assert report.data["cells"][1]["metrics"]["test/acc"]["ci"] is None
    assert "No plots" in text and not list(tmp_path.iterdir())


def test_without_test_metrics_the_selection_metric_is_reported_and_flagged(tmp_path):
    from mmray.report.compare import ReportOptions
    from mmray.report.render import to_markdown
    from mmray.report.writer import build_report

    cells = _cells({"a": {"0": 0.5, "1": 0.7}, "b": {"0": 0.6, "1": 0.9}}, metric="val/acc")
    opts = ReportOptions(axes=("method.name",), baseline=("method.name", "a"))
    report = build_report(cells, opts, "t", {}, tmp_path)
    text = to_markdown(report.blocks)
    assert report.data["main_metrics"] == ["val/acc"] and "optimistically biased" in text
    assert "| a | 2 | 0.6000 ± 0.1414" in text
    empty = to_markdown(build_report([], opts, "t", {}, tmp_path).blocks)
    assert "0 selected runs in 0 grid cells" in empty


def test_further_baselines_are_tested_alike_and_costs_are_set_beside_the_baselines(tmp_path):
    from mmray.report.compare import CellResult, ReportOptions
    from mmray.report.render import to_markdown
    from mmray.report.writer import build_report

    acc = {"normal": [0.5, 0.6, 0.7], "x": [0.7, 0.7, 0.9], "ens": [0.6, 0.8, 0.8]}
    secs = {"normal": [2.0, 2.0, 2.0], "x": [5.0, 7.0, 6.0], "ens": [3.0, 3.0, 3.0]}
    cells = [CellResult({"method": m}, {s: f"{m}-{s}" for s in "012"},
                        {"test/acc": dict(zip("012", acc[m], strict=True)),
                         "cost/train_epoch_s": dict(zip("012", secs[m], strict=True)),
                         "cost/params": dict.fromkeys("012", 10.0)}) for m in acc]
    opts = ReportOptions(axes=("method",), baseline=("method", "normal"),
                         also_against=(("method", "ens"),), values={"method": list(acc)})
    report = build_report(cells, opts, "t", {}, tmp_path)
    text = to_markdown(report.blocks)
    assert "Paired tests against the baseline `method=normal`" in text
    assert "Paired tests against the baseline `method=ens`" in text
    (more,) = report.data["also_against"]
    assert more["baseline"] == {"axis": "method", "value": "ens"}
    by_cell = {c["cell"]["method"]: c for c in more["comparisons"]["test/acc"]}
    assert set(by_cell) == {"normal", "x"}
    assert by_cell["x"]["mean_diff"] == pytest.approx((0.1 - 0.1 + 0.1) / 3)
    assert by_cell["normal"]["mean_diff"] == pytest.approx((-0.1 - 0.2 - 0.1) / 3)
    cost = text.split("## Cost")[1]
    assert "| cell | s / train epoch | time ÷ baseline | params |" in cost
    assert "| method=x | 6.0000 | 3.0000 | 10 |" in cost  # 6 s against Normal's 2 s
    assert "| method=normal | 2.0000 | 1.0000 | 10 |" in cost
    assert "| method=ens | 3.0000 | 1.5000 | 10 |" in cost
    assert "training seconds per epoch" in cost and "FLOPs" not in cost.split("|")[0]


def test_further_baselines_must_be_grid_values():
    with pytest.raises(ConfigError, match=r"report.also_against\[0\].method.name: 'mla' is not a value"):
        ablation(also_against=[{"method.name": "mla"}])
    assert report_options(ablation(also_against=[{"method.name": "ogm_ge"}])).also_against == (
        ("method.name", "ogm_ge"),)
