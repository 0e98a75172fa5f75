"""The linear warm-up + linear decay schedule (MAP/REP's recipe), stepped once per epoch."""

from __future__ import annotations

import pytest
import torch

from mmray.train.experiment import load_experiment
from mmray.train.loop import build_state, warmup_linear

from helpers import SPEC


def test_warmup_then_linear_decay_by_hand():
    assert warmup_linear(0.5, 20, 2) == pytest.approx(0.25)
    assert warmup_linear(1.5, 20, 2) == pytest.approx(0.75)
    assert warmup_linear(2.0, 20, 2) == pytest.approx(1.0)
    assert warmup_linear(2.5, 20, 2) == pytest.approx(17.5 / 18)
    assert warmup_linear(19.5, 20, 2) == pytest.approx(0.5 / 18)
    assert warmup_linear(20.0, 20, 2) == 0.0
    assert warmup_linear(0.5, 4, 0) == pytest.approx(3.5 / 4)  # no warm-up: decay from the start


def _lrs(state, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(state.optimizer.param_groups[0]["lr"])
        state.optimizer.step()  # no gradients: nothing moves; keeps the order torch expects
        state.scheduler.step()
    return out


def test_each_epoch_runs_at_its_midpoints_value_and_resumes():
    cfg = load_experiment(None, ["train.scheduler=linear", "train.warmup=0.5", "train.epochs=4",
                             "train.optimizer=adamw", "train.lr=0.01", "model.width=4",
                             "model.feature_dim=8"])
    state = build_state(cfg, SPEC, torch.device("cpu"))
    assert _lrs(state, 4) == pytest.approx([0.0025, 0.0075, 0.0075, 0.0025])
    # A resumed run continues the schedule where the checkpoint left it.
    first = build_state(cfg, SPEC, torch.device("cpu"))
    _lrs(first, 2)
    resumed = build_state(cfg, SPEC, torch.device("cpu"))
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.scheduler.load_state_dict(first.scheduler.state_dict())
    assert _lrs(resumed, 2) == pytest.approx([0.0075, 0.0025])
