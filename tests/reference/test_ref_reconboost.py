"""ReconBoost beside the ports of its reference training (tests/reference/reconboost_port.py): from
the same initial weights, on the same batches, with the reference's optimizers, mmray's method
driven as the training loop drives it (`on_epoch_start`, `before_epoch`, `train_step`) ends with
the same parameters and batch-norm statistics and logs the same losses at every step:

- `preset: reference` against the authors' `train.py` stage loop (fresh SGD per phase, momentum
  0.9, weight decay 5e-4), two and three modalities, over five stages of two boosting epochs and
  one rectification epoch: stage 0's constant ensemble, learners joining, the detached
  reconcilement term and its second forward, and `DynamicNet`'s re-appended summation order;
- `preset: balancebench` against BalanceBenchmark's trainer (one AdamW for the run, zero
  gradients stepped as under torch 1.12), over three of its epochs (six stages).

Dropping any one quirk moves the result past the tolerance, so the comparison is not vacuous.
The lr is larger than the references' so that a few steps move the weights well past it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

import reconboost_port as port
from helpers import SPEC, SPEC3, checked_method_config, make_batch, torch_threads

MODEL = ModelConfig(width=4, feature_dim=6)
TOL = dict(rtol=1e-6, atol=1e-7)
BATCHES = 2
SCHEDULE = {"boost_epochs": 2, "correct_epochs": 1, "head_hidden": 5}


def build(spec, preset, **options):
    cfg = checked_method_config("reconboost", preset=preset, options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg).double()


def batches(spec):
    cache: dict[int, list[dict]] = {}

    def of_epoch(epoch: int) -> list[dict]:
        if epoch not in cache:
            out = []
            for i in range(BATCHES):
                b = make_batch(spec, b=8, seed=100 * epoch + i)
                b["inputs"] = {m: x.double() if x.is_floating_point() else x
                               for m, x in b["inputs"].items()}
                out.append(b)
            cache[epoch] = out
        return cache[epoch]

    return of_epoch


def run_mmray(method, optimizer, epochs: int, of_epoch) -> list[dict]:
    """The loop's calls for each epoch; returns each step's logs."""
    logs = []
    for epoch in range(epochs):
        ctx = StepContext(device=torch.device("cpu"), epoch=epoch, batches_per_epoch=BATCHES)
        method.train()
        method.on_epoch_start(epoch)
        method.before_epoch(optimizer, ctx)
        for i, batch in enumerate(of_epoch(epoch)):
            ctx.batch_idx = i
            logs.append(method.train_step(batch, optimizer, ctx))
    return logs


def assert_same_losses(logs: list[dict], records: list[dict]) -> None:
    assert len(logs) == len(records)
    for step, (log, rec) in enumerate(zip(logs, records, strict=True)):
        for key, value in rec.items():
            assert log[f"loss/{key}"].item() == pytest.approx(value, rel=1e-7, abs=1e-10), (step, key)
        assert ("loss/recon" in log) == ("recon" in rec), step


def assert_same_state(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), what
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **TOL, msg=f"{what}.{k}")


# -- the authors' train.py ----------------------------------------------------------------------

def run_authors(spec, order, stages, **options):
    method = build(spec, "reference", **SCHEDULE, modality_order=order, **options)
    learners = {m: port.Learner(copy.deepcopy(method.encoders[m]),
                                nn.Linear(6, spec.num_classes).double()) for m in order}
    net = port.DynamicNetPort(c0=0.8444218515250481, boost_rate=1.0,
                              head=copy.deepcopy(method.head), dtype=torch.float64)
    of_epoch = batches(spec)
    records: list[dict] = []
    lr = 0.1
    with torch_threads(1):
        port.run_authors(order, learners, net, stages, of_epoch, SCHEDULE["boost_epochs"],
                         SCHEDULE["correct_epochs"], lr, spec.num_classes, on_step=records.append)
        opt = torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        logs = run_mmray(method, opt, stages * 3, of_epoch)
    return method, learners, net, logs, records


def assert_authors_state(method, learners, net):
    for m, learner in learners.items():
        assert_same_state(method.encoders[m], learner.net, f"encoders.{m}")
    assert_same_state(method.head, net.head, "head")
    torch.testing.assert_close(method.boost_rate.detach(), net.boost_rate.detach(), **TOL)


AUTHORS = [(SPEC, ["audio", "image"]), (SPEC3, ["text", "image", "audio"])]


@pytest.mark.parametrize("spec, order", AUTHORS, ids=["2mod", "3mod"])
def test_reference_preset_trains_as_the_authors_code(spec, order):
    method, learners, net, logs, records = run_authors(spec, order, stages=5)
    assert_same_losses(logs, records)
    assert_authors_state(method, learners, net)
    assert list(method.stage.members) == net.models_name  # DynamicNet's summation order


@pytest.mark.parametrize("change", [{"recon_grad": True}, {"class_mean": False},
                                    {"rerun_previous": False}, {"reset_optimizer": False},
                                    {"ensemble_from_start": True}])
def test_each_authors_quirk_changes_the_result(change):
    method, learners, net, *_ = run_authors(SPEC, ["audio", "image"], stages=3, **change)
    with pytest.raises(AssertionError):
        assert_authors_state(method, learners, net)


# -- BalanceBenchmark ---------------------------------------------------------------------------

def run_balancebench(bb_epochs=3, **options):
    method = build(SPEC, "balancebench", **options)
    model = port.BalanceBenchModelPort({m: copy.deepcopy(method.encoders[m]) for m in SPEC.modalities},
                                       copy.deepcopy(method.head), torch.float64)
    of_epoch = batches(SPEC)
    records: list[dict] = []
    adamw = dict(lr=0.01, weight_decay=0.01)
    with torch_threads(1):
        port.run_balancebench(model, torch.optim.AdamW(model.parameters(), **adamw), bb_epochs,
                              of_epoch, on_step=records.append)
        logs = run_mmray(method, torch.optim.AdamW(method.parameters(), **adamw),
                         bb_epochs * 2 * len(SPEC.modalities), of_epoch)
    return method, model, logs, records


def assert_balancebench_state(method, model):
    for m in SPEC.modalities:
        assert_same_state(method.encoders[m], model.encoders[m], f"encoders.{m}")
    assert_same_state(method.head, model.fc_out, "head")
    torch.testing.assert_close(method.boost_rate.detach(), model.boost_rate.detach(), **TOL)


def test_balancebench_preset_trains_as_balancebenchmark():
    method, model, logs, records = run_balancebench()
    assert_same_losses(logs, records)
    assert_balancebench_state(method, model)
    assert isinstance(method.head, nn.Linear) and method.stage.index == 5


@pytest.mark.parametrize("change", [{"zero_grad_steps": False}, {"reset_optimizer": True},
                                    {"ensemble_from_start": False}, {"recon_starts": 1}])
def test_each_balancebench_quirk_changes_the_result(change):
    method, model, *_ = run_balancebench(bb_epochs=2, **change)
    with pytest.raises(AssertionError):
        assert_balancebench_state(method, model)
