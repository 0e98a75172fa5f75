"""MMPareto beside the ports of its reference training steps (tests/reference/mmpareto_port.py).

- `preset: reference` against the authors' `train_epoch`: the same initial weights (deep copies of
  mmray's toy encoders stand in for the reference's ResNet18s), the same batches and the
  reference's optimizer (SGD, momentum 0.9, weight decay 1e-4; lr 0.05 instead of 0.002 so that a
  few steps move the weights well past the tolerance) give the same losses, cosines, weights γ and
  parameters after every step. The batches go through both branches for each encoder: the
  unimodal heads start as ± the fused head's blocks, so that one modality's two gradients start
  opposed and the other's aligned, and the signs flip half way. A second run starts with the
  fused head's audio block at zero, so that the audio encoder's multimodal gradient is zero at
  the first step: the reference's solver then returns its 0.999 (`clip_margin`).
- `preset: balancebench` against BalanceBenchmark's `training_step`, with two and three
  modalities: its accumulated "task" gradients give a cosine of 1 and a step of 3·(g_mm + g_m).

The models run in float64 (the fused loss in float32, as mmray's criterion computes it), so the
tolerance, 1e-6, is far below the steps' size.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

import mmpareto_port as port
from helpers import SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CTX = StepContext(device=torch.device("cpu"))
STEPS = 6
TOL = dict(rtol=0, atol=1e-6)


def build(spec, preset: str):
    torch.manual_seed(0)
    return build_method(spec, MODEL, checked_method_config("mmpareto", preset=preset)).double()


def batches(spec, n: int = STEPS) -> list[dict]:
    out = []
    for s in range(n):
        b = make_batch(spec, b=8, seed=20 + s)
        b["inputs"] = {m: x.double() if x.is_floating_point() else x for m, x in b["inputs"].items()}
        out.append(b)
    return out


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def assert_same(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=f"{what}.{k}")


def set_unimodal_heads(method, signs: dict[str, float]) -> None:
    """Unimodal head m ← sign·3·(fused head's block for m): opposed or aligned gradients."""
    with torch.no_grad():
        for m, s in signs.items():
            method.unimodal_heads[m].weight.copy_(s * 3 * method.head.weight_of(m))


def authors_pair(method):
    enc = method.encoders
    heads = method.unimodal_heads
    model = port.AVClassifier(copy.deepcopy(enc["audio"]), copy.deepcopy(enc["image"]),
                              copy.deepcopy(method.head.fc), copy.deepcopy(heads["audio"]),
                              copy.deepcopy(heads["image"]))
    return port.Wrapped(model)


def assert_authors_weights(method, ref) -> None:
    model = ref.module
    assert_same(method.encoders["audio"], model.audio_net, "audio")
    assert_same(method.encoders["image"], model.visual_net, "image")
    assert_same(method.head.fc, model.head, "head")
    assert_same(method.unimodal_heads["audio"], model.head_audio, "head_audio")
    assert_same(method.unimodal_heads["image"], model.head_video, "head_video")


def run_authors(method, flip_at: int | None = None) -> list[dict]:
    ref = authors_pair(method)
    opt, ref_opt = sgd(method.parameters()), sgd(ref.parameters())
    method.train(), ref.train()
    seen = []
    for i, b in enumerate(batches(SPEC)):
        if i == flip_at:  # on both sides: the opposed modality becomes the aligned one
            set_unimodal_heads(method, {"audio": 1.0, "image": -1.0})
            with torch.no_grad():
                ref.module.head_audio.weight.copy_(method.unimodal_heads["audio"].weight)
                ref.module.head_video.weight.copy_(method.unimodal_heads["image"].weight)
        logs = method.train_step(b, opt, CTX)
        r = port.reference_step(ref, b["inputs"]["audio"], b["inputs"]["image"], b["label"], ref_opt)
        assert float(logs["loss"]) == pytest.approx(r["loss"], abs=1e-6), i
        for j, key in enumerate(["loss/mm", "loss/audio", "loss/image"]):
            assert float(logs[key]) == pytest.approx(r["losses"][j], abs=1e-6), (i, key)
        for j, m in enumerate(["audio", "image"]):
            assert float(logs[f"pareto/cos_{m}"]) == pytest.approx(r["cos"][j], abs=1e-6), (i, m)
            assert float(logs[f"pareto/conflict_{m}"]) == float(r["cos"][j] <= 0), (i, m)
            assert float(logs[f"pareto/gamma_{m}"]) == pytest.approx(r["k"][j], abs=1e-6), (i, m)
        assert_authors_weights(method, ref)
        seen.append(r)
    return seen


def test_reference_preset_steps_like_the_authors_code_through_both_branches():
    method = build(SPEC, "reference")
    set_unimodal_heads(method, {"audio": -1.0, "image": 1.0})
    seen = run_authors(method, flip_at=STEPS // 2)
    for j in range(2):  # each encoder went through both branches
        assert {r["cos"][j] > 0 for r in seen} == {True, False}, [r["cos"] for r in seen]
    # the min-norm weights of the conflicting steps are interior (not the solver's bounds)
    assert all(0.001 < r["k"][j] < 0.999 for r in seen for j in range(2) if r["cos"][j] <= 0)


def test_reference_preset_steps_like_the_authors_code_with_a_zero_multimodal_gradient():
    method = build(SPEC, "reference")
    with torch.no_grad():
        method.head.weight_of("audio").zero_()
    seen = run_authors(method)
    # first step: g_mm of the audio encoder is zero, the solver's bound 0.999 is its weight
    assert seen[0]["cos"][0] == 0 and seen[0]["k"][0] == pytest.approx(0.999)


def balancebench_pair(method):
    sizes = {m: e.out_dim for m, e in method.encoders.items()}
    model = port.BaseClassifierModel({m: copy.deepcopy(e) for m, e in method.encoders.items()},
                                     copy.deepcopy(method.head.fc), sizes)
    return port.Wrapped(model)


@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
def test_balancebench_preset_steps_like_its_trainer(spec):
    method = build(spec, "balancebench")
    ref = balancebench_pair(method)
    opt, ref_opt = sgd(method.parameters()), sgd(ref.parameters())
    method.train(), ref.train()
    for i, b in enumerate(batches(spec)):
        logs = method.train_step(b, opt, CTX)
        r = port.balancebench_step(ref, b["inputs"], b["label"], ref_opt)
        assert float(logs["loss"]) == pytest.approx(r["loss"], abs=1e-6), i
        assert float(logs["loss/mm"]) == pytest.approx(r["losses"]["output"], abs=1e-6), i
        for m in method.modalities:
            assert float(logs[f"loss/{m}"]) == pytest.approx(r["losses"][m], abs=1e-6), (i, m)
            assert r["cos"][m] == pytest.approx(1.0) and float(logs[f"pareto/cos_{m}"]) == pytest.approx(1.0)
            assert_same(method.encoders[m], ref.module.modality_encoder[m], m)
        assert_same(method.head.fc, ref.module.fusion_module.fc_out, "fc_out")
