"""`Method.before_epoch`: a method's pass over the epoch's data before its steps (PMR's
prototypes, G-Blending's weight estimate). Plain torch: `fit` on in-memory batches."""

from __future__ import annotations

import pytest
import torch

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.methods.normal import Normal
from mmray.train import loop
from mmray.train.experiment import load_experiment

SPEC = DatasetSpec("toy", {"audio": ModalitySpec("audio", (1, 6, 4)),
                           "image": ModalitySpec("image", (3, 4, 4))}, num_classes=3)


def _batches(split: str, epoch: int, miss):
    """Two batches whose ids name the split and the epoch, in an order that depends on it."""
    g = torch.Generator().manual_seed(epoch)
    order = torch.randperm(8, generator=g).tolist()
    out = []
    for half in (order[:4], order[4:]):
        out.append({"inputs": {m: torch.randn(4, *s.shape, generator=g) for m, s in SPEC.modalities.items()},
                    "present": {m: torch.ones(4, dtype=torch.bool) for m in SPEC.modalities},
                    "label": torch.randint(0, 3, (4,), generator=g),
                    "id": [f"{split}{epoch}-{i}" for i in half]})
    return out


class Recording(Normal):
    """Normal that records the ids its `before_epoch` pass and its steps see."""

    name = "normal"

    def __init__(self, *args):
        super().__init__(*args)
        self.passes: list[list[str]] = []
        self.steps: list[list[str]] = []
        self.mode_in_pass: list[bool] = []

    def before_epoch(self, optimizer, ctx):
        self.mode_in_pass.append(self.training)
        ids = [i for b in ctx.train_batches() for i in b["id"]]
        self.passes.append(ids)
        total = ctx.reduce_sum(torch.tensor(float(len(ids))))
        return {"pass_samples": total}

    def train_step(self, batch, optimizer, ctx):
        self.steps.append(list(batch["id"]))
        return super().train_step(batch, optimizer, ctx)


def test_before_epoch_passes_over_the_epochs_train_batches_in_step_order_and_logs():
    cfg = load_experiment(None, ["train.epochs=2", "model.width=2", "model.feature_dim=4"])
    state = loop.build_state(cfg, SPEC, torch.device("cpu"))
    method = Recording(SPEC, cfg.model, cfg.method)
    state = loop.RunState(method, torch.optim.SGD(method.parameters(), lr=0.1), None)
    ctx = loop.make_context(cfg.train, torch.device("cpu"))
    reduced: list[float] = []

    def reduce(t):  # what Ray Train's all-reduce would hand back: here, twice the worker's
        if t.dim() == 0:  # the method's; the metric counts come too, as vectors
            reduced.append(float(t))
        return t * 2

    history = loop.fit(cfg, state, _batches, lambda *a: None, ctx, reduce=reduce, splits=("val",))
    step_ids = [i for b in method.steps for i in b]
    assert method.passes == [step_ids[:8], step_ids[8:]]  # each epoch: that epoch's order
    assert method.passes[0] != method.passes[1]
    assert all(i.startswith("train0-") for i in method.passes[0])
    assert all(i.startswith("train1-") for i in method.passes[1])
    assert method.mode_in_pass == [True, True]
    assert [h["train/pass_samples"] for h in history] == [16.0, 16.0]  # summed over "workers"
    assert reduced == [8.0, 8.0]
    # The last epoch also logs the run's mean training time per epoch (the report's cost).
    times = [h["time/train_epoch_s"] for h in history]
    assert history[-1]["cost/train_epoch_s"] == pytest.approx(sum(times) / 2)
    assert "cost/train_epoch_s" not in history[0]
