"""MLA beside the port of its reference training step (tests/reference/mla_port.py): the same
initial weights, the same batches and the reference's optimizer (SGD, momentum 0.9, weight decay
1e-4; lr 0.1 instead of 1e-3 so that a few steps move the weights well past the tolerance) give
the same parameters, projector and per-modality losses after every batch, for the final commit
(`preset: reference`, no projection) and for its projecting GSPlugin (`project: true` on top),
with two and three modalities, over two epochs of two batches (the first step of the run and the
schedule of α both matter). The inference rule of the preset is checked against the port too."""

from __future__ import annotations

import copy

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.mla import project_gradient_, projector_update

import mla_port
from helpers import SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=6)
TOL = dict(rtol=1e-5, atol=1e-5)
EPOCHS, BATCHES = 2, 2


def build(spec, **options):
    cfg = checked_method_config("mla", preset="reference", options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg).double()


def batches(spec):
    out = []
    for s in range(EPOCHS * BATCHES):
        b = make_batch(spec, b=8, seed=10 + s)
        b["inputs"] = {m: x.double() if x.is_floating_point() else x for m, x in b["inputs"].items()}
        out.append(b)
    return out


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def run_both(spec, names, **options):
    """Trains mmray's MLA and the port side by side; returns both and the per-batch records."""
    method = build(spec, **options)
    encoders = {m: copy.deepcopy(method.encoders[m]) for m in method.order}
    fc_out = copy.deepcopy(method.head)
    port_params = [p for e in encoders.values() for p in e.parameters()] + list(fc_out.parameters())
    gs = mla_port.GSPluginPort(fc_out.in_features, torch.float64, names)
    opt_m, opt_p = sgd(method.parameters()), sgd(port_params)
    method.train()
    for e in encoders.values():
        e.train()
    for step, batch in enumerate(batches(spec)):
        epoch, i = divmod(step, BATCHES)
        ctx = StepContext(device=torch.device("cpu"), epoch=epoch, batch_idx=i,
                          batches_per_epoch=BATCHES)
        logs = method.train_step(batch, opt_m, ctx)
        losses = mla_port.train_batch(encoders, fc_out, batch["inputs"], batch["label"], opt_p, gs,
                                      i, BATCHES, port_params)
        yield method, encoders, fc_out, gs, logs, losses


def assert_same_weights(method, encoders, fc_out):
    for m, enc in encoders.items():
        for (name, a), b in zip(method.encoders[m].named_parameters(), enc.parameters()):
            torch.testing.assert_close(a, b, **TOL, msg=f"encoders.{m}.{name}")
    torch.testing.assert_close(method.head.weight, fc_out.weight, **TOL)
    torch.testing.assert_close(method.head.bias, fc_out.bias, **TOL)


CASES = [(SPEC, mla_port.FINAL_NAMES, {}), (SPEC3, mla_port.FINAL_NAMES, {}),
         (SPEC, mla_port.FIRST_NAMES, {"project": True}),
         (SPEC3, mla_port.FIRST_NAMES, {"project": True})]


@pytest.mark.parametrize("spec, names, options", CASES,
                         ids=["final-2mod", "final-3mod", "projecting-2mod", "projecting-3mod"])
def test_reference_preset_trains_as_the_reference_code(spec, names, options):
    for method, encoders, fc_out, gs, logs, losses in run_both(spec, names, **options):
        assert_same_weights(method, encoders, fc_out)
        torch.testing.assert_close(method.projector, gs.Pl, **TOL)
        for m, v in losses.items():
            assert logs[f"loss/{m}"].item() == pytest.approx(v, abs=1e-5), m
        assert logs["loss"].item() == pytest.approx(sum(losses.values()) / len(losses), abs=1e-5)
    if options.get("project"):
        assert not torch.allclose(method.projector, torch.eye(6, dtype=torch.float64))
    else:
        assert torch.equal(method.projector, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("change", [{"zero_grad_steps": False}, {"skip_first_step": False},
                                    {"outer_divisor": False}, {"update_first": False}])
def test_each_projecting_quirk_changes_the_weights(change):
    # The comparison above is not vacuous: dropping any one quirk of the projecting reference
    # moves the weights past the tolerance within these few steps.
    moved = False
    for method, encoders, fc_out, *_ in run_both(SPEC, mla_port.FIRST_NAMES, project=True,
                                                 **change):
        try:
            assert_same_weights(method, encoders, fc_out)
        except AssertionError:
            moved = True
    assert moved, change


def test_projecting_and_not_differ():
    final = list(run_both(SPEC, mla_port.FINAL_NAMES))[-1]
    first = list(run_both(SPEC, mla_port.FIRST_NAMES, project=True))[-1]
    assert (final[0].head.weight - first[0].head.weight).abs().max() > 1e-3


def test_projector_update_is_the_reference_update():
    # GSPlugin's update and projection, step by step from I, on features of both signs.
    g = torch.Generator().manual_seed(3)
    d = 5
    gs = mla_port.GSPluginPort(d, torch.float64, mla_port.FIRST_NAMES)
    gs.exp_count = 1
    P = torch.eye(d, dtype=torch.float64)
    head, ref_head = torch.nn.Linear(d, 3).double(), torch.nn.Linear(d, 3).double()
    for step in range(4):
        h = torch.randn(8, d, generator=g, dtype=torch.float64) + 0.5
        G = torch.randn(3, d, generator=g, dtype=torch.float64)
        head.weight.grad, ref_head.weight.grad = G.clone(), G.clone()
        head.bias.grad = ref_head.bias.grad = torch.zeros(3, dtype=torch.float64)
        gs.before_update(ref_head, h, step, 4, gs.exp_count)
        P = projector_update(P, h.mean(0), 0.1 ** (1 + step / 4), outer_divisor=True)
        project_gradient_(head, P)
        torch.testing.assert_close(P, gs.Pl, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
def test_reference_preset_fuses_as_the_reference(spec):
    method = build(spec).eval()
    batch = batches(spec)[0]
    out = method.predict(batch)
    with torch.no_grad():
        feats = {m: method.encoders[m](batch["inputs"][m]) for m in method.order}
        outs = [method.head(feats[m]) for m in method.order]
    weights = mla_port.gating_weights(*outs)
    torch.testing.assert_close(out.logits, sum(w * o for w, o in zip(weights, outs)))
    # The README's fixed rule: av_alpha = 0.55 (main.py), or a/v/t 0.35/0.25/0.4.
    fixed = dict(zip(method.order, (0.55, 0.45) if len(outs) == 2 else (0.35, 0.25, 0.4)))
    method = build(spec, fusion_rule="fixed", fusion_weights=fixed).eval()
    torch.testing.assert_close(method.predict(batch).logits,
                               sum(w * o for w, o in zip(fixed.values(), outs)))
