"""AGM with `preset: reference` (two modalities) and `preset: reference_3mod` (three) beside the
port of the reference training step (tests/reference/agm_port.py): the same initial weights, the
same batches and the reference's optimizer (SGD, momentum 0.9, weight decay 1e-4; lr 1e-2 so that
a few steps move the weights measurably) give the same losses, scores, applied coefficients and
parameters after every batch, and the same running scores. Models run in float64 (the port's
losses and scores go through float32 as mmray's do).

The schedule covers every branch: three epochs of three batches with mmray's window [1, 2), the
reference's 1-based [2, 2], so an epoch before the window (scale 1), one inside it and one after
it (the held scale); batches whose labels favour one modality, then the other, so that the
running means drift apart and the clamp engages; heads confident enough that some steps clip
and others do not.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.agm import coalitions, shapley_responses

import agm_port
from helpers import SPEC, SPEC3, checked_method_config, torch_threads

MODEL = ModelConfig(width=4, feature_dim=6)
EPOCHS, BATCHES, B = 3, 3, 8
STARTS, ENDS = 1, 2  # mmray's window; the reference's is [STARTS + 1, ENDS] on 1-based epochs
ALPHA = 1.0
LR = 1e-2
TOL = dict(rtol=1e-6, atol=1e-7)
# Subtracted from the first modality's running score at the window's first step, in both, as if
# resumed there from a checkpoint that holds the running scores (the reference loads them,
# `ckpt["train_score_a"]`): its r* grows past r by more than the clamp.
SHIFT = 3.0


def build(spec, preset):
    cfg = checked_method_config("agm", preset=preset, options={
        "alpha": ALPHA, "modulation_starts": STARTS, "modulation_ends": ENDS})
    torch.manual_seed(0)
    method = build_method(spec, MODEL, cfg).double()
    with torch.no_grad():  # confident heads: large head gradients
        method.head.fc.weight.mul_(6.0)
    return method


def random_batch(spec, g: torch.Generator) -> dict:
    inputs = {m: (torch.randint(1, s.vocab_size, (B, *s.shape), generator=g) if s.kind == "text"
                  else torch.randn(B, *s.shape, generator=g, dtype=torch.float64))
              for m, s in spec.modalities.items()}
    return {"inputs": inputs, "present": {m: torch.ones(B, dtype=torch.bool) for m in inputs},
            "label": torch.zeros(B, dtype=torch.long), "id": [f"s{j}" for j in range(B)]}


def batches(method) -> list[dict]:
    """Labels that the responses at the initial weights favour for one modality (the first
    modality for the first batches, then each other one, then random labels)."""
    g = torch.Generator().manual_seed(1)
    spec, mods = method.spec, method.modalities
    targets = [mods[0]] * 4 + [m for m in mods[1:] for _ in range(2)]
    out = []
    for i in range(EPOCHS * BATCHES):
        b = random_batch(spec, g)
        with torch.no_grad():  # a copy: batch-norm statistics untouched
            o = shapley_responses(copy.deepcopy(method).coalition_logits(b), mods)
        target = targets[i] if i < len(targets) else None
        b["label"] = (torch.randint(0, spec.num_classes, (B,), generator=g) if target is None
                      else (2 * o[target] - sum(o.values())).argmax(1))
        out.append(b)
    return out


def port_of(method):
    net = agm_port.Net({m: copy.deepcopy(method.encoders[m]) for m in method.modalities},
                       copy.deepcopy(method.head.fc))
    return (agm_port.GradMod2 if len(method.modalities) == 2 else agm_port.GradMod3)(net)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("spec, preset", [(SPEC, "reference"), (SPEC3, "reference_3mod")],
                         ids=["2mod", "3mod"])
def test_reference_preset_steps_like_the_reference_code(spec, preset):
    method = build(spec, preset)
    port = port_of(method)
    data = batches(method)
    opt = sgd(method.parameters())
    trainer = agm_port.Trainer(port, sgd(port.parameters()), ALPHA, STARTS + 1, ENDS, BATCHES)
    method.train(), port.train()
    seen = []
    with torch_threads(1):
        for i, b in enumerate(data):
            epoch, step = divmod(i, BATCHES)
            ctx = StepContext(device=torch.device("cpu"), epoch=epoch, batch_idx=step,
                              batches_per_epoch=BATCHES)
            if (epoch, step) == (STARTS, 0):
                method.running_score[0] -= SHIFT
                trainer.train_score[method.modalities[0]] -= SHIFT
            logs = method.train_step(b, opt, ctx)
            ref = trainer.step(b["inputs"], b["label"], epoch + 1, step)
            seen.append(ref)
            assert float(logs["loss"]) == pytest.approx(ref["loss"], rel=1e-6), i
            assert bool(logs["agm/clipped"]) == ref["clipped"], i
            for j, m in enumerate(method.modalities):
                assert float(logs[f"agm/score_{m}"]) == pytest.approx(ref["scores"][j], rel=1e-6), (i, m)
                assert float(logs[f"agm/coeff_{m}"]) == pytest.approx(ref["coeffs"][j], rel=1e-5), (i, m)
            ours = dict(method.encoders.named_parameters(prefix="encoders"))
            ours.update(method.head.fc.named_parameters(prefix="head"))
            theirs = dict(port.net.named_parameters())
            for name, p in ours.items():
                torch.testing.assert_close(p, theirs[name], **TOL, msg=f"step {i}: {name}")
            torch.testing.assert_close(
                method.running_score, torch.tensor([trainer.train_score[m] for m in method.modalities],
                                                   dtype=torch.float64), **TOL)
    # Every branch was taken: before, inside and after the window (the held scale differs
    # from 1), the clamp, a clip and a step without one.
    modulated = [r["modulated"] for r in seen]
    assert modulated == [e == STARTS for e in range(EPOCHS) for _ in range(BATCHES)]
    assert all(c == 1.0 for r in seen[:BATCHES] for c in r["coeffs"])
    assert seen[-1]["coeffs"] == seen[(ENDS * BATCHES) - 1]["coeffs"] != [1.0] * len(spec.modalities)
    assert any(r["clamped"] for r in seen)
    assert any(r["clipped"] for r in seen) and not all(r["clipped"] for r in seen)


def test_the_port_and_mmray_build_the_same_coalitions():
    """The port runs the network once per coalition (2^M − 1 of them); mmray's coalition list
    has the same 2^M − 1 members."""
    assert len(coalitions(["a", "v"])) == 3 and len(coalitions(["a", "v", "t"])) == 7
