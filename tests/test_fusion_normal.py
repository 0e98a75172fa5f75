"""Late fusion (METHODS.md §1) and the Normal baseline, in plain torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, StepContext, build_method
from mmray.modules.fusion import LateFusion

from helpers import ML_SPEC, SPEC, SPEC3, SPEC_IT, make_batch


def test_concat_per_modality_logits_follow_the_formula():
    torch.manual_seed(0)
    head = LateFusion({"a": 3, "v": 2}, num_classes=4, mode="concat")
    ha, hv = torch.randn(5, 3), torch.randn(5, 2)
    fused, per = head({"a": ha, "v": hv})
    W, b = head.fc.weight, head.fc.bias
    torch.testing.assert_close(fused, torch.cat([ha, hv], 1) @ W.T + b)
    torch.testing.assert_close(per["a"], ha @ W[:, :3].T + b / 2)
    torch.testing.assert_close(per["v"], hv @ W[:, 3:].T + b / 2)
    torch.testing.assert_close(per["a"] + per["v"], fused)


def test_sum_fusion_is_sum_of_blocks():
    torch.manual_seed(0)
    head = LateFusion({"a": 3, "v": 2, "t": 4}, num_classes=2, mode="sum")
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.3, -0.6]))
    feats = {"a": torch.randn(4, 3), "v": torch.randn(4, 2), "t": torch.randn(4, 4)}
    fused, per = head(feats)
    expected = sum(feats[m] @ head.fcs[m].weight.T for m in feats) + head.bias
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(per["t"], feats["t"] @ head.fcs["t"].weight.T + head.bias / 3)


@pytest.mark.parametrize("spec", [SPEC, SPEC3, SPEC_IT], ids=["2mod", "3mod", "image-text"])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_step(name, fusion, spec):
    if reason := METHODS[name].unsupported(spec):
        pytest.skip(reason)
    torch.manual_seed(0)
    method = build_method(spec, ModelConfig(width=4, feature_dim=8), MethodConfig(name, fusion))
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    batch = make_batch(spec)
    before = [p.detach().clone() for p in method.parameters()]
    logs = method.train_step(batch, opt, StepContext(device=torch.device("cpu")))
    assert torch.isfinite(logs["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, method.parameters()))
    out = method.predict(batch)
    assert out.logits.shape == (6, spec.num_classes)
    # Per-modality logits for each modality the method reads (M2PT reads only its target).
    assert set(out.per_modality) == set(method.modalities) <= set(spec.modalities)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_on_multilabel_data_or_says_why_not(name):
    """A multi-label dataset either trains (BCE) or is refused, before any work, with the reason
    the method gives in `single_label` (or its own `unsupported`); never a crash inside a step."""
    cls = METHODS[name]
    spec = ML_SPEC
    if "image" in cls.modality_kinds or "text" in cls.modality_kinds:
        spec = dataclasses.replace(SPEC_IT, name="ml_it", num_classes=4, multilabel=True)
    reason = cls.unsupported(spec)
    if reason:
        if "multi-label" not in reason:
            pytest.skip(reason)  # refused for its modalities, not its labels
        assert "multi-label" in reason and (not cls.single_label or cls.single_label in reason)
        with pytest.raises(ValueError, match=f"method.name={name}: .*multi-label"):
            build_method(spec, ModelConfig(width=4, feature_dim=8), MethodConfig(name))
        return
    assert not cls.single_label
    torch.manual_seed(0)
    method = build_method(spec, ModelConfig(width=4, feature_dim=8), MethodConfig(name))
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    logs = method.train_step(make_batch(spec), opt, StepContext(device=torch.device("cpu")))
    assert torch.isfinite(logs["loss"])


def test_missing_modality_features_are_zeroed():
    method = build_method(SPEC, ModelConfig(width=4, feature_dim=8), MethodConfig("normal"))
    method.eval()
    batch = make_batch(SPEC)
    batch["present"]["image"][:3] = False
    feats = method.features(batch)
    assert torch.all(feats["image"][:3] == 0) and torch.any(feats["image"][3:] != 0)


def test_losses_single_and_multilabel():
    m1 = build_method(SPEC, ModelConfig(width=4, feature_dim=8), MethodConfig("normal"))
    logits, label = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(m1.criterion(logits, label), F.cross_entropy(logits, label))
    m2 = build_method(ML_SPEC, ModelConfig(width=4, feature_dim=8), MethodConfig("normal"))
    logits, y = torch.randn(4, 4), torch.randint(0, 2, (4, 4)).float()
    torch.testing.assert_close(m2.criterion(logits, y), F.binary_cross_entropy_with_logits(logits, y))


def test_unknown_method_names_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown method 'x'; known: \[.*'normal'"):
        build_method(SPEC, ModelConfig(), MethodConfig("x"))
