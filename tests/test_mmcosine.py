"""MMCosine (METHODS.md §9): cosine logits by hand, their invariances, the step, missing
modalities, the raw-head prediction of `preset: reference`, and a checkpoint round-trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, build_method, check_method_config
from mmray.methods.mmcosine import MMCosine, cosine, cosine_diagnostics, cosine_logits

from helpers import CPU, ML_SPEC, SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)


def _method(spec=SPEC, preset="", fusion="concat", seed=0, **options):
    cfg = checked_method_config("mmcosine", fusion, preset=preset, options=options)
    torch.manual_seed(seed)
    return build_method(spec, MODEL, cfg)


def _by_hand(method, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """z = Σ_m s·(h_m/‖h_m‖)·(W_m,k/‖W_m,k‖), written out with explicit norms."""
    feats = method.features(batch)
    cos = {}
    for m in method.modalities:
        w = method.head.weight_of(m)
        h = feats[m]
        cos[m] = (h @ w.T) / (h.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    s = method.options.scale
    return s * sum(cos.values()), cos


# -- the formula ------------------------------------------------------------------------------


def test_cosine_of_known_vectors():
    h = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    expected = torch.tensor([[0.6, 0.8, -1.4 / math.sqrt(2)],
                             [0.0, -1.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(cosine(h, w), expected)
    out = cosine_logits({"a": cosine(h, w), "v": cosine(h[:, [1, 0]], w)}, scale=10.0)
    # The second modality's vectors swapped: h = (4, 3) -> (0.8, 0.6, -1.4/√2); (-2, 0) -> (-1, 0, 1/√2).
    v = torch.tensor([[0.8, 0.6, -1.4 / math.sqrt(2)], [-1.0, 0.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(out.per_modality["v"], 10 * v)
    torch.testing.assert_close(out.logits, 10 * (expected + v))


def test_a_zero_feature_has_cosine_zero_and_a_finite_gradient():
    h = torch.zeros(2, 3, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    c = cosine(h, w)
    assert torch.equal(c, torch.zeros(2, 4))
    c.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.equal(w.grad, torch.zeros(4, 3))


def test_cosine_logits_ignore_feature_and_weight_scales():
    torch.manual_seed(0)
    h, w = torch.randn(5, 6), torch.randn(3, 6)
    per_sample = torch.rand(5, 1) * 50 + 0.01
    per_class = torch.rand(3, 1) * 50 + 0.01
    torch.testing.assert_close(cosine(h * per_sample, w * per_class), cosine(h, w))
    # A negative factor flips the direction: the cosine changes sign.
    torch.testing.assert_close(cosine(-3 * h, w), -cosine(h, w))


def test_the_feature_gradient_is_orthogonal_to_the_feature():
    # What the normalisation does to the encoder: no gradient along h, so the loss cannot grow ‖h‖.
    torch.manual_seed(0)
    h = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(3, 6)
    F.cross_entropy(10 * cosine(h, w), torch.tensor([0, 1, 2, 0])).backward()
    torch.testing.assert_close((h.grad * h.detach()).sum(1), torch.zeros(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
def test_the_method_logits_are_the_scaled_cosine_sum(spec, fusion):
    method = _method(spec, fusion=fusion, scale=7.0).eval()
    batch = make_batch(spec)
    with torch.no_grad():
        out = method(batch)
        fused, cos = _by_hand(method, batch)
    torch.testing.assert_close(out.logits, fused)
    for m in method.modalities:
        torch.testing.assert_close(out.per_modality[m], 7.0 * cos[m])
    # No bias: moving the head's bias changes nothing.
    with torch.no_grad():
        bias = method.head.fc.bias if fusion == "concat" else method.head.bias
        bias.add_(3.0)
        torch.testing.assert_close(method(batch).logits, fused)


def test_the_method_is_invariant_to_scaling_features_and_class_rows():
    method, normal = _method().eval(), build_method(SPEC, MODEL, MethodConfig("normal")).eval()
    batch = make_batch(SPEC)
    with torch.no_grad():
        before = method(batch).logits
        proj = method.encoders["image"].proj  # the encoder's last layer: h_image -> 4·h_image
        proj.weight.mul_(4.0), proj.bias.mul_(4.0)
        method.head.weight_of("audio")[1].mul_(5.0)  # one class row of the audio block
        method.head.weight_of("image").mul_(0.2)  # every row of the image block
        torch.testing.assert_close(method(batch).logits, before)
        # The plain linear head is not: the same change of h_image moves its logits.
        plain = normal(batch).logits
        normal.encoders["image"].proj.weight.mul_(4.0), normal.encoders["image"].proj.bias.mul_(4.0)
        assert not torch.allclose(normal(batch).logits, plain)


def test_concat_and_sum_heads_compute_the_same_function_of_their_blocks():
    concat, summed = _method(fusion="concat").eval(), _method(fusion="sum").eval()
    summed.encoders.load_state_dict(concat.encoders.state_dict())
    with torch.no_grad():
        for m in SPEC.modalities:
            summed.head.fcs[m].weight.copy_(concat.head.weight_of(m))
    batch = make_batch(SPEC)
    with torch.no_grad():
        torch.testing.assert_close(summed(batch).logits, concat(batch).logits)


def test_cosines_are_float32_under_bf16_autocast():
    h, w = torch.randn(3, 4), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cosine(h, w).dtype == torch.float32
        assert cosine(h.double(), w.double()).dtype == torch.float64


# -- the step ---------------------------------------------------------------------------------


def test_the_step_minimises_ce_of_the_cosine_sum_and_logs_each_modality():
    method = _method(SPEC3)
    batch = make_batch(SPEC3, b=8, seed=3)
    with torch.no_grad():
        fused, cos = _by_hand(method.train(), batch)
    opt = torch.optim.SGD(method.parameters(), lr=0.0)
    logs = method.train_step(batch, opt, CPU)
    s = method.options.scale
    assert float(logs["loss"]) == pytest.approx(float(F.cross_entropy(fused, batch["label"])), rel=1e-5)
    idx = torch.arange(8)
    for m in SPEC3.modalities:
        assert float(logs[f"loss/{m}"]) == pytest.approx(
            float(F.cross_entropy(s * cos[m], batch["label"])), rel=1e-5)
        assert float(logs[f"mmcosine/cos_true_{m}"]) == pytest.approx(
            float(cos[m][idx, batch["label"]].mean()), rel=1e-5)
        assert float(logs[f"mmcosine/abs_cos_{m}"]) == pytest.approx(float(cos[m].abs().mean()), rel=1e-5)


def test_every_parameter_but_the_bias_is_trained():
    method = _method()
    bias = method.head.fc.bias.detach().clone()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for seed in range(3):
        method.train_step(make_batch(SPEC, seed=seed), opt, CPU)
    assert method.head.fc.bias.grad is None and torch.equal(method.head.fc.bias, bias)
    moved = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert "head.fc.weight" in moved
    for m in SPEC.modalities:
        assert any(n.startswith(f"encoders.{m}.") for n in moved), m


def test_multilabel_trains_bce_on_the_cosine_sum():
    assert MMCosine.unsupported(ML_SPEC) == ""
    method = _method(ML_SPEC)
    batch = make_batch(ML_SPEC, b=5, seed=2)
    batch["label"][:, 0] = 0  # some class absent from some rows, one positive at least elsewhere
    batch["label"][0, 1] = 1
    with torch.no_grad():
        fused, cos = _by_hand(method.train(), batch)
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.0), CPU)
    expected = F.binary_cross_entropy_with_logits(fused, batch["label"])
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    y = batch["label"]
    for m in ML_SPEC.modalities:  # the mean cosine over the positive labels
        assert float(logs[f"mmcosine/cos_true_{m}"]) == pytest.approx(
            float((cos[m] * y).sum() / y.sum()), rel=1e-5)


def test_two_or_three_modalities_only():
    one = DatasetSpec("one", {"audio": SPEC.modalities["audio"]}, num_classes=3)
    assert "mmcosine needs 2 or 3 modalities; dataset 'one' has ['audio']" in MMCosine.unsupported(one)
    assert MMCosine.unsupported(SPEC) == "" and MMCosine.unsupported(SPEC3) == ""


def test_scale_must_be_positive():
    errors: list[str] = []
    check_method_config(MethodConfig("mmcosine", options={"scale": 0.0}), "method", errors)
    assert errors and "method.options.scale" in errors[0]


# -- missing modalities -----------------------------------------------------------------------


def test_an_absent_modality_contributes_nothing_and_gets_no_gradient():
    method = _method()
    batch = make_batch(SPEC, b=6, seed=4)
    batch["present"]["image"][:] = torch.tensor([False, True, False, True, False, True])
    out = method.eval()(batch)
    absent = ~batch["present"]["image"]
    assert torch.equal(out.per_modality["image"][absent], torch.zeros(3, SPEC.num_classes))
    torch.testing.assert_close(out.logits[absent], out.per_modality["audio"][absent])
    # A batch where the image is absent everywhere: its encoder and head block get zero gradient.
    batch["present"]["image"][:] = False
    method.train()
    grads = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            grads.update({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
            return super().step(closure)

    logs = method.train_step(batch, Spy(method.parameters(), lr=0.1), CPU)
    assert torch.isfinite(logs["loss"])
    for n, g in grads.items():
        if n.startswith("encoders.image."):
            assert torch.equal(g, torch.zeros_like(g)), n
    d_a = method.encoders["audio"].out_dim
    assert torch.equal(grads["head.fc.weight"][:, d_a:], torch.zeros_like(grads["head.fc.weight"][:, d_a:]))
    assert grads["head.fc.weight"][:, :d_a].abs().sum() > 0
    # The diagnostics average over the present samples only (none here: 0).
    assert float(logs["mmcosine/abs_cos_image"]) == 0.0 and float(logs["mmcosine/abs_cos_audio"]) > 0


def test_diagnostics_average_over_present_samples():
    cos = {"a": torch.tensor([[0.5, -0.5], [0.1, 0.3], [0.9, 0.0]])}
    feats = {"a": torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])}
    present = {"a": torch.tensor([True, True, False])}
    logs = cosine_diagnostics(cos, feats, present, torch.tensor([0, 1, 0]), multilabel=False)
    assert float(logs["mmcosine/cos_true_a"]) == pytest.approx((0.5 + 0.3) / 2)
    assert float(logs["mmcosine/abs_cos_a"]) == pytest.approx((0.5 + 0.2) / 2)
    assert float(logs["mmcosine/feat_norm_a"]) == pytest.approx((5.0 + 1.0) / 2)


# -- presets ----------------------------------------------------------------------------------


def test_the_reference_predicts_with_the_raw_head_and_trains_like_the_paper():
    ref, paper = _method(preset="reference"), _method(preset="paper")
    assert ref.options.predict_raw_head and not paper.options.predict_raw_head
    assert _method(preset="balancebench").options.scale == 15.0
    batch = make_batch(SPEC)
    ref.eval(), paper.eval()
    with torch.no_grad():
        feats = ref.features(batch)
        raw = torch.cat([feats[m] for m in SPEC.modalities], 1) @ ref.head.fc.weight.T + ref.head.fc.bias
        out = ref.predict(batch)
        torch.testing.assert_close(out.logits, raw)
        for m in SPEC.modalities:  # per-modality predictions stay the cosine logits
            torch.testing.assert_close(out.per_modality[m], paper.predict(batch).per_modality[m])
        torch.testing.assert_close(paper.predict(batch).logits, paper(batch).logits)
    ref.train(), paper.train()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(paper.parameters(), lr=0.1)
    for seed in range(2):
        b = make_batch(SPEC, seed=seed)
        assert torch.equal(ref.train_step(b, opt_r, CPU)["loss"], paper.train_step(b, opt_p, CPU)["loss"])
    for a, b in zip(ref.parameters(), paper.parameters(), strict=True):
        assert torch.equal(a, b)


# -- checkpoint -------------------------------------------------------------------------------


def test_resume_matches_an_uninterrupted_run():
    def run(method, opt, seeds):
        return [float(method.train_step(make_batch(SPEC, seed=s), opt, CPU)["loss"]) for s in seeds]

    a = _method(preset="reference")
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    run(a, opt_a, range(3))
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    after = run(a, opt_a, range(3, 6))
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    b = _method(preset="reference", seed=123)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    b.load_state_dict(state["method"])
    opt_b.load_state_dict(state["optimizer"])
    assert run(b, opt_b, range(3, 6)) == after
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    batch = make_batch(SPEC, seed=9)
    with torch.no_grad():
        assert torch.equal(a.eval().predict(batch).logits, b.eval().predict(batch).logits)
