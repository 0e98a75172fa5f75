"""Which epoch a run reports (train.select): the best val epoch's test metrics, or the last's;
resuming selects exactly the same. Plain torch: `fit` on in-memory batches."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.train import loop
from mmray.train.experiment import load_experiment

SPEC = DatasetSpec("toy", {"audio": ModalitySpec("audio", (1, 6, 4)),
                           "image": ModalitySpec("image", (3, 4, 4))}, num_classes=3)
VAL_ACC = [0.50, 0.90, 0.60, 0.70]  # peaks at epoch 1 of 4


def _batches(split: str, epoch: int, miss):
    g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
    out = []
    for _ in range(2):
        out.append({"inputs": {m: torch.randn(4, *s.shape, generator=g) for m, s in SPEC.modalities.items()},
                    "present": {m: torch.ones(4, dtype=torch.bool) for m in SPEC.modalities},
                    "label": torch.randint(0, 3, (4,), generator=g), "id": [f"{split}{i}" for i in range(4)]})
    return out


def _fingerprint(module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def _run(select: str, monkeypatch, stop_after: int | None = None, state=None):
    """fit() with val/acc scripted per epoch; the test metric is a fingerprint of the weights
    it is evaluated on. Returns (state, {epoch: fingerprint of the weights after it})."""
    real = loop.evaluate

    def scripted(module, batches, ctx, split, reduce=None, measure_cost=False):
        if split == "val":
            return {"val/acc": VAL_ACC[ctx.epoch], "val/loss": 1.0}
        m = real(module, batches, ctx, split, reduce, measure_cost)
        return {**m, "test/acc": _fingerprint(module)}

    monkeypatch.setattr(loop, "evaluate", scripted)
    cfg = load_experiment(None, [f"train.select={select}", f"train.epochs={len(VAL_ACC)}",
                                 "model.width=2", "model.feature_dim=4"])
    state = state or loop.build_state(cfg, SPEC, torch.device("cpu"))
    seen: dict[int, float] = {}

    class Stop(Exception):
        pass

    def report(epoch, metrics, st):
        seen[epoch] = _fingerprint(st.method)
        if stop_after is not None and len(seen) >= stop_after:
            raise Stop

    ctx = loop.make_context(cfg.train, torch.device("cpu"))
    with contextlib.suppress(Stop):
        loop.fit(cfg, state, _batches, report, ctx)
    return state, seen


def test_best_val_reports_the_peak_epochs_test_metrics(monkeypatch):
    state, seen = _run("best_val", monkeypatch)
    final = state.history[-1]
    assert final["select/epoch"] == 1
    assert final["test/acc"] == pytest.approx(seen[1]) and final["test/acc"] != pytest.approx(seen[3])
    assert final["val/acc"] == VAL_ACC[-1]  # the val curve stays as it was measured
    assert _fingerprint(state.method) == pytest.approx(seen[3])  # training state untouched


def test_last_reports_the_last_epoch(monkeypatch):
    state, seen = _run("last", monkeypatch)
    final = state.history[-1]
    assert final["select/epoch"] == 3 and final["test/acc"] == pytest.approx(seen[3])
    assert state.best is None


def test_resume_selects_the_same_epoch(monkeypatch, tmp_path):
    full, _ = _run("best_val", monkeypatch)
    part, _ = _run("best_val", monkeypatch, stop_after=2)  # epochs 0, 1: best is epoch 1
    loop.save_checkpoint(part, tmp_path)
    cfg = load_experiment(None, ["train.epochs=4", "model.width=2", "model.feature_dim=4"])
    resumed = loop.build_state(cfg, SPEC, torch.device("cpu"))
    loop.load_checkpoint(resumed, tmp_path)
    assert resumed.best["epoch"] == 1 and resumed.epoch == 2
    resumed, _ = _run("best_val", monkeypatch, state=resumed)
    assert resumed.history[-1]["select/epoch"] == 1
    assert resumed.history[-1]["test/acc"] == pytest.approx(full.history[-1]["test/acc"])


def test_select_metric_must_be_a_val_metric():
    from mmray.config import ConfigError

    with pytest.raises(ConfigError, match="train.select_metric: 'test/acc' must be a val/ metric"):
        load_experiment(None, ["train.select_metric=test/acc"])


def test_an_ablation_selects_epochs_by_its_search_metric():
    from mmray.tune.grid import load_ablation

    abl = load_ablation("configs/ablations/demo.yaml", ["search.metric=val/loss", "search.mode=min"])
    assert (abl.experiment.train.select_metric, abl.experiment.train.select_mode) == ("val/loss", "min")


def test_the_report_states_the_epoch_rule():
    from mmray.report.compare import ReportOptions
    from mmray.report.writer import protocol_text

    best = protocol_text(ReportOptions(search_metric="val/f1_macro", epoch_select="best_val"), 4, 2)
    assert "epoch with the best validation `val/f1_macro` (train.select=best_val)" in best
    assert "of its last epoch (train.select=last)" in protocol_text(
        ReportOptions(epoch_select="last"), 4, 2)
