"""Every method's train step, pinned: three steps on a fixed batch and seed must log the losses
stored in tests/pinned_steps.json (to 1e-5). Any change to a formula, an initialisation or the
order of a step moves them, so a change that is meant must rewrite the file on purpose:

    MMRAY_REPIN=1 .venv/bin/python -m pytest -q tests/test_pinned_steps.py

and the diff of tests/pinned_steps.json then shows which methods moved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, StepContext, build_method

from helpers import SPEC, SPEC3, SPEC_IT, make_batch, torch_threads

PINNED = Path(__file__).with_name("pinned_steps.json")
SPECS = {"2mod": SPEC, "3mod": SPEC3, "image-text": SPEC_IT}
CASES = [(name, key) for name in sorted(METHODS) for key, spec in SPECS.items()
         if not METHODS[name].unsupported(spec)]


def step_losses(name: str, spec, steps: int = 3) -> list[float]:
    with torch_threads(1):  # reductions split over threads round differently
        return _step_losses(name, spec, steps)


def _step_losses(name: str, spec, steps: int) -> list[float]:
    torch.manual_seed(0)
    method = build_method(spec, ModelConfig(width=4, feature_dim=8), MethodConfig(name))
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    ctx = StepContext(device=torch.device("cpu"), batches_per_epoch=steps)
    batch = make_batch(spec, b=6, seed=1)
    method.train()
    method.on_epoch_start(0)
    losses = []
    for i in range(steps):
        ctx.batch_idx = i
        torch.manual_seed(100 + i)  # the step's own draws (noise, dropout, Gumbel)
        losses.append(float(method.train_step(batch, opt, ctx)["loss"]))
    return losses


@pytest.fixture(scope="module")
def pinned():
    data = json.loads(PINNED.read_text()) if PINNED.is_file() else {}
    yield data
    if os.environ.get("MMRAY_REPIN"):
        PINNED.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


@pytest.mark.parametrize("name, spec", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_train_step_losses_are_pinned(name, spec, pinned):
    losses = step_losses(name, SPECS[spec])
    key = f"{name}/{spec}"
    if os.environ.get("MMRAY_REPIN"):
        pinned[key] = losses
    assert key in pinned, f"no pinned losses for {key}; rerun with MMRAY_REPIN=1 to record {losses}"
    assert losses == pytest.approx(pinned[key], abs=1e-5), f"{key} moved: {losses} vs {pinned[key]}"
