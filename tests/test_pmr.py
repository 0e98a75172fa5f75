"""PMR (METHODS.md §9): prototype logits and loss, ratios and coefficients, the entropy term and
the prototypes themselves, pinned by hand; the step's gradients; checkpoint round-trip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.base import masked_mean
from mmray.methods.normal import Normal
from mmray.methods.pmr import (
    PMR,
    entropy_coefficients,
    imbalance_ratios,
    negative_entropy,
    pce_coefficients,
    proto_batch_count,
    prototype_logits,
    prototype_scores,
    refresh_prototypes,
)

from helpers import ML_SPEC, SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CPU = torch.device("cpu")


def _method(spec=SPEC, preset="", **options) -> PMR:
    cfg = checked_method_config("pmr", preset=preset, options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg)


def _ctx(batches, epoch=0, reduce=None) -> StepContext:
    ctx = StepContext(device=CPU, epoch=epoch, batches_per_epoch=len(batches),
                      train_batches=lambda: iter(batches))
    if reduce is not None:
        ctx.reduce_sum = reduce
    return ctx


class Recorder(torch.optim.SGD):
    """SGD with lr 0 that records the gradient of every parameter it is asked to apply."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[torch.Tensor | None] = []

    def step(self, closure=None):
        self.seen = [None if p.grad is None else p.grad.clone()
                     for g in self.param_groups for p in g["params"]]


# -- the formulas by hand -----------------------------------------------------------------------


H = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
C = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])


def test_prototype_logits_are_negative_distances_or_squared_distances():
    torch.testing.assert_close(prototype_logits(H, C, "squared"),
                               -torch.tensor([[0.0, 1.0, 4.0], [5.0, 4.0, 1.0]]))
    torch.testing.assert_close(prototype_logits(H, C, "euclidean"),
                               -torch.tensor([[0.0, 1.0, 2.0], [math.sqrt(5), 2.0, 1.0]]))


def test_prototype_cross_entropy_and_score_by_hand():
    label = torch.tensor([0, 2])
    logits = prototype_logits(H, C, "squared")
    # softmax over −d²: row 0 (0, −1, −4), row 1 (−5, −4, −1); labels 0 and 2
    p0 = 1 / (1 + math.exp(-1) + math.exp(-4))
    p1 = math.exp(-1) / (math.exp(-5) + math.exp(-4) + math.exp(-1))
    pce = F.cross_entropy(logits, label)
    assert float(pce) == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, rel=1e-6)
    everyone = torch.ones(2, dtype=torch.bool)
    assert float(prototype_scores(logits, label, everyone)) == pytest.approx((p0 + p1) / 2, rel=1e-6)
    only_first = torch.tensor([True, False])
    assert float(prototype_scores(logits, label, only_first)) == pytest.approx(p0, rel=1e-6)
    assert float(masked_mean(torch.tensor([1.0, 3.0]), torch.zeros(2, dtype=torch.bool))) == 0.0


def test_ratio_decides_which_modality_gets_the_prototype_loss_and_which_the_entropy():
    r = imbalance_ratios({"audio": torch.tensor(0.6), "image": torch.tensor(0.3)})
    assert float(r["audio"]) == pytest.approx(2.0) and float(r["image"]) == pytest.approx(0.5)
    beta, gamma = pce_coefficients(r, 0.7), entropy_coefficients(r, 0.1)
    assert (float(beta["audio"]), float(beta["image"])) == (0.0, pytest.approx(0.7))
    assert (float(gamma["audio"]), float(gamma["image"])) == (pytest.approx(0.1), 0.0)
    # a tie weights nothing (the reference's `else: beta = lam = 0`)
    tie = imbalance_ratios({"audio": torch.tensor(0.4), "image": torch.tensor(0.4)})
    assert all(float(v) == 0 for v in pce_coefficients(tie, 0.7).values())
    assert all(float(v) == 0 for v in entropy_coefficients(tie, 0.1).values())


def test_three_modalities_compare_each_to_the_mean_of_the_others():
    r = imbalance_ratios({"a": torch.tensor(0.6), "v": torch.tensor(0.3), "t": torch.tensor(0.3)})
    assert float(r["a"]) == pytest.approx(2.0)
    assert float(r["v"]) == pytest.approx(0.3 / 0.45) and float(r["t"]) == pytest.approx(0.3 / 0.45)
    beta = pce_coefficients(r, 1.0)
    assert [float(beta[m]) for m in "avt"] == [0.0, 1.0, 1.0]


def test_a_modality_absent_from_the_batch_has_ratio_one_and_is_left_out_of_the_means():
    scores = {"a": torch.tensor(0.6), "v": torch.tensor(0.0), "t": torch.tensor(0.3)}
    counted = {"a": torch.tensor(True), "v": torch.tensor(False), "t": torch.tensor(True)}
    r = imbalance_ratios(scores, counted)
    assert [float(r[m]) for m in "avt"] == [pytest.approx(2.0), 1.0, pytest.approx(0.5)]
    alone = imbalance_ratios({"a": torch.tensor(0.6), "v": torch.tensor(0.0)},
                             {"a": torch.tensor(True), "v": torch.tensor(False)})
    assert [float(v) for v in alone.values()] == [1.0, 1.0]


def test_negative_entropy_by_hand():
    everyone = torch.ones(2, dtype=torch.bool)
    uniform = torch.zeros(2, 4)
    assert float(negative_entropy(uniform, everyone)) == pytest.approx(-math.log(4))
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p = (1/4, 3/4) and (1/2, 1/2)
    h0 = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert float(negative_entropy(logits, everyone)) == pytest.approx((h0 + math.log(0.5)) / 2)
    assert float(negative_entropy(logits, torch.tensor([True, False]))) == pytest.approx(h0)


def test_refresh_is_the_class_mean_mixed_with_momentum_and_keeps_unseen_classes():
    old = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]], dtype=torch.float64)
    sums = torch.tensor([[4.0, 0.0], [3.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    fresh = refresh_prototypes(old, sums, counts, 0.2, mix=False)
    torch.testing.assert_close(fresh, torch.tensor([[2.0, 0.0], [3.0, 3.0], [5.0, 5.0]], dtype=torch.float64))
    mixed = refresh_prototypes(old, sums, counts, 0.2, mix=True)
    torch.testing.assert_close(mixed, torch.tensor([[1.8, 0.2], [2.8, 2.8], [5.0, 5.0]], dtype=torch.float64))


def test_proto_batch_count_is_the_references_first_tenth():
    assert proto_batch_count(100, 1.0) is None
    assert [proto_batch_count(n, 0.1) for n in (9, 10, 25, 70)] == [1, 1, 2, 7]  # max(1, n // 10)
    assert proto_batch_count(10, 0.3) == 3


# -- prototypes in before_epoch ------------------------------------------------------------------


def _class_means(method: PMR, batches, m: str) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        feats = torch.cat([method.features(b)[m] for b in batches])
    method.train()
    labels = torch.cat([b["label"] for b in batches])
    return torch.stack([feats[labels == k].mean(0) for k in range(method.spec.num_classes)])


def _labelled(spec, n, b=6, seed=0):
    """n batches in which every class occurs."""
    out = []
    for i in range(n):
        batch = make_batch(spec, b=b, seed=seed + i)
        batch["label"] = torch.arange(b) % spec.num_classes
        out.append(batch)
    return out


def test_prototypes_are_eval_mode_class_means_then_mixed_with_momentum():
    method = _method(momentum=0.25)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    data = [_labelled(SPEC, 3, seed=0), _labelled(SPEC, 3, seed=10)]
    method.train()
    logs = method.before_epoch(opt, _ctx(data[0], epoch=0))
    assert method.training  # the pass ran in eval mode and gave train mode back
    assert logs == {"pmr/proto_samples": 18.0}
    first = {m: _class_means(method, data[0], m) for m in method.modalities}
    for m in method.modalities:  # eval-mode features: BatchNorm's running statistics
        torch.testing.assert_close(method.prototypes(m), first[m])
    for b in data[0]:
        method.train_step(b, opt, _ctx(data[0], epoch=0))
    method.before_epoch(opt, _ctx(data[1], epoch=1))
    for m in method.modalities:
        expected = 0.75 * _class_means(method, data[1], m) + 0.25 * first[m]
        torch.testing.assert_close(method.prototypes(m), expected)
    assert method.refreshes == 2


def test_reference_quirks_read_a_tenth_of_the_batches_and_mix_only_from_epoch_two():
    method = _method(preset="reference")
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    data = [_labelled(SPEC, 10, seed=20 * e) for e in range(3)]
    previous = None
    for epoch in range(3):
        method.before_epoch(opt, _ctx(data[epoch], epoch=epoch))
        mean = _class_means(method, data[epoch][:1], "audio")  # the first of 10 batches
        # epochs 0 and 1: fresh means; epoch 2 mixes in epoch 1's (momentum 0.2)
        expected = 0.8 * mean + 0.2 * previous if epoch == 2 else mean
        torch.testing.assert_close(method.prototypes("audio"), expected)
        previous = method.prototypes("audio").clone()
        method.train_step(data[epoch][0], opt, _ctx(data[epoch], epoch=epoch))


def test_prototypes_pool_the_workers_class_sums_in_one_reduce():
    """Two workers with their own shards end with the class means over both."""
    shards = [_labelled(SPEC, 2, seed=0), _labelled(SPEC, 2, seed=5)]
    workers = [_method(), _method()]
    opt = torch.optim.SGD(workers[0].parameters(), lr=0.1)
    seen: list[torch.Tensor] = []
    workers[1].before_epoch(opt, _ctx(shards[1], reduce=lambda t: seen.append(t.clone()) or t))
    calls: list[int] = []

    def reduce(t):  # the all-reduce as worker 0 sees it
        calls.append(1)
        return t + seen[0]

    logs = workers[0].before_epoch(opt, _ctx(shards[0], reduce=reduce))
    assert len(seen) == 1 and calls == [1] and logs["pmr/proto_samples"] == 24.0
    for m in SPEC.modalities:
        torch.testing.assert_close(workers[0].prototypes(m),
                                   _class_means(workers[0], shards[0] + shards[1], m))


def test_absent_samples_do_not_enter_the_prototypes():
    method = _method()
    data = _labelled(SPEC, 2)
    data[0]["present"]["image"] = torch.tensor([True, False, True, True, True, True])
    data[0]["inputs"]["image"][1] = 100.0  # would move class 1's prototype if it were counted
    method.before_epoch(torch.optim.SGD(method.parameters(), lr=0.1), _ctx(data))
    kept = [(0, i) for i in range(6) if i != 1] + [(1, i) for i in range(6)]
    method.eval()
    with torch.no_grad():
        feats = torch.stack([method.features(data[b])["image"][i] for b, i in kept])
    labels = torch.tensor([data[b]["label"][i] for b, i in kept])
    expected = torch.stack([feats[labels == k].mean(0) for k in range(3)])
    torch.testing.assert_close(method.prototypes("image"), expected)


# -- the step -------------------------------------------------------------------------------------


def _prepared(spec=SPEC, **options) -> tuple[PMR, list[dict]]:
    method = _method(spec, **options)
    data = _labelled(spec, 2, seed=3)
    method.train()
    method.before_epoch(torch.optim.SGD(method.parameters(), lr=0.0), _ctx(data))
    with torch.no_grad():  # prototypes far enough apart that the modalities' scores differ
        for m in method.modalities:
            method.prototypes(m).mul_(3.0)
    return method, data


def test_loss_is_fused_ce_plus_weighted_pce_plus_weighted_negative_entropy():
    method, data = _prepared(alpha=0.7, entropy_weight=0.3)
    batch = data[0]
    with torch.no_grad():
        ref = copy.deepcopy(method)
        feats = ref.features(batch)
        fused, _ = ref.head(feats)
        total = F.cross_entropy(fused, batch["label"])
        logits = {m: prototype_logits(feats[m], method.prototypes(m)) for m in method.modalities}
        scores = {m: F.softmax(z, 1).gather(1, batch["label"].view(-1, 1)).mean()
                  for m, z in logits.items()}
    logs = method.train_step(batch, Recorder(method.parameters()), _ctx(data))
    (weak, strong) = sorted(method.modalities, key=lambda m: float(scores[m]))
    assert float(logs[f"pmr/coef_{weak}"]) == pytest.approx(0.7) and float(logs[f"pmr/coef_{strong}"]) == 0
    assert float(logs[f"pmr/entropy_coef_{strong}"]) == pytest.approx(0.3)
    assert float(logs[f"pmr/entropy_coef_{weak}"]) == 0
    total = (total + 0.7 * F.cross_entropy(logits[weak], batch["label"])
             + 0.3 * negative_entropy(logits[strong], torch.ones(6, dtype=torch.bool)))
    assert float(logs["loss"]) == pytest.approx(float(total), rel=1e-6)
    assert float(logs["pmr/ratio"]) == pytest.approx(float(scores["audio"] / scores["image"]), rel=1e-6)


def _grads(method, batch, ctx) -> list[torch.Tensor | None]:
    opt = Recorder(method.parameters())
    method.train_step(batch, opt, ctx)
    return opt.seen


def _normal_twin(method: PMR) -> Normal:
    twin = build_method(method.spec, MODEL, checked_method_config("normal"))
    twin.load_state_dict({k: v for k, v in method.state_dict().items()
                          if not k.startswith("prototypes_") and k != "_extra_state"})
    return twin.train()


def test_only_the_slow_modalitys_encoder_gets_the_prototype_gradient():
    method, data = _prepared(entropy_weight=0.0)
    twin = _normal_twin(method)
    logs = method.train_step(data[0], Recorder(method.parameters()), _ctx(data))
    weak = next(m for m in method.modalities if float(logs[f"pmr/coef_{m}"]) > 0)
    ours, plain = _grads(method, data[0], _ctx(data)), _grads(twin, data[0], _ctx(data))
    names = [n for n, _ in method.named_parameters()]
    assert names == [n for n, _ in twin.named_parameters()]
    for n, g, h in zip(names, ours, plain, strict=True):
        if n.startswith(f"encoders.{weak}.") and g is not None and g.abs().sum() > 0:
            assert not torch.allclose(g, h), n
        elif not n.startswith(f"encoders.{weak}."):  # the head and the dominant encoder: CE only
            torch.testing.assert_close(g, h, msg=n)


def test_the_entropy_term_reaches_only_the_dominant_encoder_and_only_early():
    method, data = _prepared(alpha=0.0, entropy_weight=0.5, entropy_ends=1)
    twin = _normal_twin(method)
    logs = method.train_step(data[0], Recorder(method.parameters()), _ctx(data))
    strong = next(m for m in method.modalities if float(logs[f"pmr/entropy_coef_{m}"]) > 0)
    names = [n for n, _ in method.named_parameters()]
    early = _grads(method, data[0], _ctx(data, epoch=0))
    plain = _grads(twin, data[0], _ctx(data, epoch=0))
    for n, g, h in zip(names, early, plain, strict=True):
        if n.startswith(f"encoders.{strong}.proj"):
            assert not torch.allclose(g, h), n
        elif not n.startswith(f"encoders.{strong}."):
            torch.testing.assert_close(g, h, msg=n)
    late_logs = method.train_step(data[0], Recorder(method.parameters()), _ctx(data, epoch=1))
    assert all(float(late_logs[f"pmr/entropy_coef_{m}"]) == 0 for m in method.modalities)
    for n, g, h in zip(names, _grads(method, data[0], _ctx(data, epoch=1)), plain, strict=True):
        torch.testing.assert_close(g, h, msg=n)


def test_outside_the_window_the_step_is_normals_and_after_it_no_prototypes_are_computed():
    method, data = _prepared(modulation_starts=1, modulation_ends=2)
    twin = _normal_twin(method)
    before = _grads(method, data[0], _ctx(data, epoch=0))  # before the window: diagnostics only
    logs = method.train_step(data[0], Recorder(method.parameters()), _ctx(data, epoch=0))
    assert all(float(logs[f"pmr/coef_{m}"]) == 0 for m in method.modalities)
    for g, h in zip(before, _grads(twin, data[0], _ctx(data)), strict=True):
        torch.testing.assert_close(g, h)
    protos = method.prototypes("audio").clone()
    assert method.before_epoch(Recorder(method.parameters()), _ctx(data, epoch=2)) == {}
    assert torch.equal(method.prototypes("audio"), protos)
    logs = method.train_step(data[0], Recorder(method.parameters()), _ctx(data, epoch=2))
    assert not any(k.startswith("pmr/") for k in logs)
    # window_includes_end: epoch `ends` is still modulated, and its prototypes refreshed
    incl, data = _prepared(modulation_ends=0, window_includes_end=True)
    assert incl.before_epoch(Recorder(incl.parameters()), _ctx(data, epoch=0))
    assert incl.active(0) and not incl.active(1) and incl.window_over(1)


def test_a_step_before_any_prototypes_is_normals():
    method = _method()
    twin = _normal_twin(method)
    batch = make_batch(SPEC, seed=4)
    method.train()
    logs = method.train_step(batch, Recorder(method.parameters()), StepContext(device=CPU))
    assert not any(k.startswith("pmr/") for k in logs)
    for g, h in zip(_grads(method, batch, StepContext(device=CPU)),
                    _grads(twin, batch, StepContext(device=CPU)), strict=True):
        torch.testing.assert_close(g, h)


def test_an_absent_modality_sample_does_not_change_the_prototype_terms():
    method, data = _prepared()
    batch = data[0]
    batch["present"]["audio"] = torch.tensor([True, True, False, True, True, True])
    changed = {**batch, "inputs": {**batch["inputs"], "audio": batch["inputs"]["audio"].clone()}}
    changed["inputs"]["audio"][2] = 50.0
    # eval mode: in train mode BatchNorm's batch statistics see every input, present or not
    logs = [copy.deepcopy(method).eval().train_step(b, Recorder(method.parameters()), _ctx(data))
            for b in (batch, changed)]
    for k in logs[0]:
        if k.startswith("pmr/") or k == "loss":
            assert float(logs[0][k]) == pytest.approx(float(logs[1][k]), rel=1e-6), k


def test_three_modalities_step():
    method, data = _prepared(SPEC3)
    logs = method.train_step(data[0], torch.optim.SGD(method.parameters(), lr=0.1), _ctx(data))
    assert {f"pmr/coef_{m}" for m in SPEC3.modalities} <= set(logs)
    assert torch.isfinite(logs["loss"])


# -- checkpoint, presets, unsupported ---------------------------------------------------------


def test_prototypes_and_pass_count_round_trip_and_the_resumed_step_is_identical():
    a, data = _prepared(momentum=0.5)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    a.train_step(data[0], opt_a, _ctx(data))
    buf = io.BytesIO()  # through bytes, as a checkpoint: state_dict() tensors alias the live ones
    torch.save({"method": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = _method(momentum=0.5).train()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    assert b.refreshes == 0 and not torch.equal(b.prototypes("audio"), a.prototypes("audio"))
    b.load_state_dict(state["method"])
    opt_b.load_state_dict(state["optimizer"])
    assert b.refreshes == 1
    fresh = _method(momentum=0.5).train()  # loads the weights but not the pass count
    fresh.load_state_dict({k: v for k, v in state["method"].items() if k != "_extra_state"}, strict=False)
    nxt = _labelled(SPEC, 2, seed=40)
    for m in (a, b, fresh):
        m.before_epoch(Recorder(m.parameters()), _ctx(nxt, epoch=1))  # epoch 1 mixes in the old
    for m in (a, b):
        m.train_step(nxt[0], opt_a if m is a else opt_b, _ctx(nxt, epoch=1))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if k != "_extra_state":
            assert torch.equal(va, vb), k
    # without the pass count the epoch-1 prototypes would be fresh means, not mixed ones
    assert not torch.allclose(fresh.prototypes("audio"), b.prototypes("audio"))
    assert a.refreshes == b.refreshes == 2


def test_presets():
    ref = _method(preset="reference").options
    assert (ref.distance, ref.proto_fraction, ref.momentum_from_epoch, ref.window_includes_end,
            ref.entropy_weight, ref.alpha, ref.momentum, ref.modulation_ends) == (
        "euclidean", 0.1, 2, True, 0.0, 1.0, 0.2, 100)
    bb = _method(preset="balancebench").options
    assert (bb.alpha, bb.momentum, bb.modulation_ends, bb.momentum_from_epoch, bb.entropy_weight) == (
        0.6, 0.5, 80, 1, 0.0)
    paper = _method(preset="paper").options
    assert (paper.distance, paper.proto_fraction, paper.entropy_weight) == ("squared", 1.0, 0.1)


def test_unsupported_datasets_are_named_with_the_reason():
    assert "multi-label" in PMR.unsupported(ML_SPEC) and "'ml'" in PMR.unsupported(ML_SPEC)
    one = DatasetSpec("solo", {"audio": ModalitySpec("audio", (1, 12, 8))}, num_classes=3)
    assert "pmr needs 2 or 3 modalities" in PMR.unsupported(one)
    assert PMR.unsupported(SPEC) == "" and PMR.unsupported(SPEC3) == ""
    with pytest.raises(ValueError, match="method.name=pmr: .*multi-label"):
        build_method(ML_SPEC, MODEL, checked_method_config("pmr"))
