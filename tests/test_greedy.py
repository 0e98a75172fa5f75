"""Greedy (METHODS.md §9): the feature-level MMTM, the conditional learning speed by hand, the
trigger and window logic, the routing of a re-balancing step, the step's state, resume, missing
modalities and the datasets it refuses. tests/reference/test_ref_greedy.py runs the presets
beside ports of the authors' code and of BalanceBenchmark's trainer."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.greedy import FeatureMMTM, Greedy, next_mode, speed_gap, squared_norm

from helpers import ML_SPEC, SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=6)
A, V = list(SPEC.modalities)


def _method(spec=SPEC, seed=0, preset="", **options):
    cfg = checked_method_config("greedy", preset=preset, options=options)
    torch.manual_seed(seed)
    return build_method(spec, MODEL, cfg)


def _ctx(epoch=0, i=0):
    return StepContext(device=torch.device("cpu"), epoch=epoch, batch_idx=i)


def _t(x, dtype=None):
    return torch.tensor(x, dtype=dtype)


# -- the formulas -----------------------------------------------------------------------------


def test_mmtm_gates_recalibrate_each_branch_from_both():
    mmtm = FeatureMMTM({"a": 2, "v": 1}, ratio=3)  # squeeze width ⌊2·3/3⌋ = 2
    assert mmtm.squeeze.weight.shape == (2, 3)
    with torch.no_grad():
        mmtm.squeeze.weight.copy_(_t([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]))
        mmtm.squeeze.bias.copy_(_t([0.0, -1.0]))
        mmtm.excite["a"].weight.copy_(_t([[1.0, 0.0], [0.0, 2.0]]))
        mmtm.excite["a"].bias.zero_()
        mmtm.excite["v"].weight.copy_(_t([[1.0, -1.0]]))
        mmtm.excite["v"].bias.fill_(0.5)
    g = mmtm.gates({"a": _t([[1.0, 2.0]]), "v": _t([[3.0]])})
    e = [max(1 - 3, 0.0), max(0.5 * 6 - 1, 0.0)]  # ReLU(W_s [h_a; h_v] + b_s) = [0, 2]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(g["a"], _t([[sig(e[0]), sig(2 * e[1])]]))
    torch.testing.assert_close(g["v"], _t([[sig(e[0] - e[1] + 0.5)]]))


def test_the_running_average_is_the_mean_of_the_batch_means():
    mmtm = FeatureMMTM({"a": 2, "v": 2}, ratio=4)
    means = [_t([0.2, 0.4]), _t([0.6, 0.0]), _t([1.0, 0.5])]
    for m in means:
        mmtm.add_to_average({"a": m, "v": 1 - m})
    torch.testing.assert_close(mmtm.average("a"), torch.stack(means).mean(0))
    torch.testing.assert_close(mmtm.average("v"), 1 - torch.stack(means).mean(0))
    assert mmtm.count.item() == 3


def test_learning_speed_is_summed_squares_over_summed_squares_by_group():
    method = _method()
    # Weights and gradients set by hand, a constant per module.
    fill = {id(p): (w, g) for mod, w, g in [
        (method.encoders[A], 1.0, 0.5), (method.heads[A], 2.0, 1.0),
        (method.encoders[V], 1.0, 0.25), (method.heads[V], 1.0, 0.0),
        (method.mmtm.squeeze, 1.0, 3.0), (method.mmtm.excite[A], 2.0, 1.0),
        (method.mmtm.excite[V], 0.5, 0.0)] for p in mod.parameters()}
    with torch.no_grad():
        for p in method.parameters():
            w, g = fill[id(p)]
            p.fill_(w)
            p.grad = torch.full_like(p, g)

    def n(mod):
        return sum(p.numel() for p in mod.parameters())

    enc_a, head_a, enc_v, head_v = (n(method.encoders[A]), n(method.heads[A]),
                                    n(method.encoders[V]), n(method.heads[V]))
    sq, ex_a, ex_v = n(method.mmtm.squeeze), n(method.mmtm.excite[A]), n(method.mmtm.excite[V])
    expected = {  # Σ‖∇θ‖² / Σ‖θ‖²: the shared squeeze layer counts in both bypass groups
        f"main_{A}": (enc_a * 0.25 + head_a * 1.0) / (enc_a * 1 + head_a * 4),
        f"main_{V}": (enc_v * 0.0625) / (enc_v + head_v),
        f"bypass_{A}": (sq * 9 + ex_a * 1) / (sq * 1 + ex_a * 4),
        f"bypass_{V}": (sq * 9) / (sq * 1 + ex_v * 0.25),
    }
    rates = method.grad_norms()
    for key, value in expected.items():
        assert rates[f"greedy/rate_{key}"].item() == pytest.approx(value, rel=1e-12), key
    assert rates[f"grad/{A}"].item() == pytest.approx(math.sqrt(enc_a * 0.25), rel=1e-6)


def test_squared_norm_adds_the_tensors_squares():
    assert squared_norm([_t([3.0, 4.0]), _t([[1.0], [2.0]])]).item() == 30.0
    assert squared_norm([]).item() == 0.0


def test_speed_gap_is_the_difference_of_the_log_ratios():
    sums = _t([[2.0, 5.0], [0.02, 0.5]], torch.float64)  # [main, bypass] × [branch 0, branch 1]
    bdr, gap = speed_gap(sums)
    assert bdr.tolist() == pytest.approx([math.log10(0.01), math.log10(0.1)])
    assert gap.item() == pytest.approx(-1.0)


MODE_CASES = [
    # (curation, caring, step, d, unlocked) -> (curation, caring, step)
    ((False, 1, 4, 0.5, True), (True, 0, 0)),     # triggers: d > 0 cares for branch 0
    ((False, 0, 4, -0.5, True), (True, 1, 0)),    # d < 0 cares for branch 1
    ((False, 1, 4, 0.005, True), (False, 0, 4)),  # |d| ≤ α: regular, caring reset to 0
    ((False, 1, 4, 0.5, False), (False, 0, 4)),   # warm-up: never triggers
    ((True, 1, 0, 0.5, True), (True, 1, 1)),      # in a window: count, keep the caring branch
    ((True, 1, 2, -0.5, True), (False, 1, 3)),    # the count reaches the window: regular again
    ((True, 0, 1, 0.5, False), (True, 0, 2)),
]


@pytest.mark.parametrize("before, after", MODE_CASES)
def test_trigger_and_window(before, after):
    curation, caring, step, d, unlocked = before
    out = next_mode(_t(curation), _t(caring), _t(step), _t(d, torch.float64), unlocked,
                    threshold=0.01, window=3)
    assert tuple(t.item() for t in out) == after


def test_a_persistent_gap_alternates_one_regular_step_and_a_window():
    state = (_t(False), _t(0), _t(0))
    seen = []
    for _ in range(9):
        seen.append(bool(state[0]))
        state = next_mode(*state, _t(-0.2, torch.float64), True, threshold=0.01, window=3)
    assert seen == [False, True, True, True, False, True, True, True, False]


# -- the step ---------------------------------------------------------------------------------


def _gated(method, batch):
    """Each branch's gated features, read with a hook on the heads."""
    seen = {}
    hooks = [method.heads[m].register_forward_hook(
        lambda mod, args, out, m=m: seen.__setitem__(m, args[0])) for m in method.modalities]
    try:
        out = method(batch)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_a_rebalancing_step_replaces_the_caring_branch_gate_by_its_average():
    method = _method()
    batch = make_batch(SPEC, b=5)
    with torch.no_grad():
        method.mmtm.average(A).copy_(torch.linspace(0.1, 0.6, 6))
        method.mmtm.average(V).fill_(0.9)
    method.curation.fill_(True)
    method.caring.fill_(0)
    method.train()
    feats = method.features(batch)
    live = method.mmtm.gates(feats)
    out, gated = _gated(method, batch)
    torch.testing.assert_close(gated[A], feats[A] * method.mmtm.average(A))  # the same gate for all
    torch.testing.assert_close(gated[V], feats[V] * live[V])  # the other branch: its live gate
    method.masked_criterion(out.per_modality[A], batch["label"]).backward()
    # Branch 0's loss reaches its encoder and head only: nothing sample-specific comes from
    # branch 1, and the replaced gate's layers get zero gradients (not none: `torch.where`).
    own = {id(p) for mod in (method.encoders[A], method.heads[A]) for p in mod.parameters()}
    assert all(p.grad is not None and p.grad.any() for p in method.parameters()
               if id(p) in own and p.dim() > 1)
    assert all(p.grad is None or not p.grad.any() for p in method.parameters() if id(p) not in own)
    assert method.mmtm.excite[A].weight.grad is not None
    method.zero_grad()
    method.caring.fill_(1)
    _, gated = _gated(method, batch)
    torch.testing.assert_close(gated[A], feats[A] * live[A])
    torch.testing.assert_close(gated[V], feats[V] * 0.9)


@pytest.mark.parametrize("follows, averages", [(False, False), (True, True)])
def test_evaluation_routing_and_averaging(follows, averages):
    method = _method(eval_follows_curation=follows, average_in_eval=averages)
    batch = make_batch(SPEC, b=5)
    method.curation.fill_(True)
    method.eval()
    feats = method.features(batch)
    live = method.mmtm.gates(feats)
    with torch.no_grad():
        _, gated = _gated(method, batch)
    torch.testing.assert_close(gated[A], feats[A] * (method.mmtm.average(A) if follows else live[A]))
    assert method.mmtm.count.item() == int(averages)
    if averages:
        torch.testing.assert_close(method.mmtm.average(A), live[A].mean(0))


def test_train_step_sums_speeds_only_in_regular_steps_and_logs_the_mode():
    method = _method(window=2, threshold=0.0)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    batch = make_batch(SPEC)
    logs = method.train_step(batch, opt, _ctx(epoch=0))  # warm-up: sums, no trigger
    assert not method.curation and logs["greedy/curation"] == 0
    assert (method.speed_sums > 0).all()
    logs = method.train_step(batch, opt, _ctx(epoch=1))  # unlocked: |d| > 0 triggers
    assert logs["greedy/curation"] == 0 and method.curation
    caring = method.modalities[int(method.caring)]
    assert int(method.caring) == (0 if method.gap > 0 else 1)
    sums, gap = method.speed_sums.clone(), method.gap.clone()
    for _ in range(2):  # the window: no speeds summed, the gap kept
        logs = method.train_step(batch, opt, _ctx(epoch=1))
        assert logs["greedy/curation"] == 1 and logs[f"greedy/rebalance_{caring}"] == 1
        assert torch.equal(method.speed_sums, sums) and torch.equal(method.gap, gap)
    assert not method.curation
    logs = method.train_step(batch, opt, _ctx(epoch=1))
    assert logs["greedy/curation"] == 0 and not torch.equal(method.speed_sums, sums)
    assert set(logs) >= {"loss", f"loss/{A}", f"loss/{V}", "greedy/d_speed", f"greedy/bdr_{A}"}
    assert not any(k.startswith("greedy/rate_") for k in logs)
    bdr, _ = speed_gap(method.speed_sums)
    assert logs[f"greedy/bdr_{V}"].item() == pytest.approx(bdr[1].item())


def test_branch_losses_sum_and_the_prediction_averages_the_branches():
    method = _method()
    batch = make_batch(SPEC)
    out = method(batch)
    torch.testing.assert_close(out.logits, (out.per_modality[A] + out.per_modality[V]) / 2)
    opt = torch.optim.SGD(method.parameters(), lr=0.0)
    logs = method.train_step(batch, opt, _ctx())
    ce = [F.cross_entropy(out.per_modality[m], batch["label"]).item() for m in (A, V)]
    assert logs["loss"].item() == pytest.approx(sum(ce), rel=1e-6)


def test_fused_loss_trains_the_late_fusion_head():
    method = _method(loss="fused")
    assert not hasattr(method, "heads")
    batch = make_batch(SPEC)
    out = method(batch)
    opt = torch.optim.SGD(method.parameters(), lr=0.0)
    logs = method.train_step(batch, opt, _ctx())
    assert logs["loss"].item() == pytest.approx(
        F.cross_entropy(out.logits, batch["label"]).item(), rel=1e-6)
    main, _ = method.groups(A)
    assert {id(p) for p in method.head.parameters()}.isdisjoint(id(p) for p in main)


def test_missing_modalities_average_over_the_present():
    method = _method()
    batch = make_batch(SPEC, b=4)
    batch["present"][V] = torch.tensor([True, False, True, False])
    out = method(batch)
    torch.testing.assert_close(out.logits[1], out.per_modality[A][1])  # image absent: audio alone
    torch.testing.assert_close(out.logits[0], (out.per_modality[A][0] + out.per_modality[V][0]) / 2)
    loss_v = method.masked_criterion(out.per_modality[V], batch["label"], batch["present"][V])
    per = F.cross_entropy(out.per_modality[V], batch["label"], reduction="none")
    assert loss_v.item() == pytest.approx(per[[0, 2]].mean().item(), rel=1e-6)


def test_worker_mean_averages_the_workers_batch_means():
    means = {A: _t([0.2, 0.4]), V: _t([0.6])}
    other = torch.cat([_t([0.4, 0.0]), _t([1.0]), _t([1.0])])  # a second worker's, and its count
    ctx = StepContext(device=torch.device("cpu"), reduce_sum=lambda t: t + other)
    out = Greedy.worker_mean(means, ctx)
    torch.testing.assert_close(out[A], _t([0.3, 0.2]))
    torch.testing.assert_close(out[V], _t([0.8]))


def test_shared_average_builds_both_from_the_first_branch():
    method = _method(preset="reference")
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    for s in range(3):
        method.train_step(make_batch(SPEC, seed=s), opt, _ctx())
    assert torch.equal(method.mmtm.average(A), method.mmtm.average(V))


def test_resume_matches_an_uninterrupted_run():
    def run(method, opt, steps):
        for s in steps:
            method.train_step(make_batch(SPEC, seed=s), opt, _ctx(epoch=s // 3, i=s % 3))

    a = _method(threshold=0.0, window=3)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    run(a, opt_a, range(5))  # epoch 1's first step started a window: the checkpoint is inside it
    assert a.curation and int(a.curation_step) == 1
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    run(a, opt_a, range(5, 10))
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    for key in ("speed_sums", "gap", "curation", "caring", "curation_step", "mmtm.count",
                f"mmtm.average_{A}"):
        assert key in state["method"], key
    b = _method(seed=7, threshold=0.0, window=3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    b.load_state_dict(state["method"])
    opt_b.load_state_dict(state["optimizer"])
    run(b, opt_b, range(5, 10))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_multilabel_is_supported():
    method = _method(ML_SPEC)
    batch = make_batch(ML_SPEC)
    out = method(batch)
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.0), _ctx())
    bce = sum(F.binary_cross_entropy_with_logits(out.per_modality[m], batch["label"])
              for m in (A, V))
    assert logs["loss"].item() == pytest.approx(bce.item(), rel=1e-6)


def test_unsupported_datasets_are_refused_with_the_reason():
    reason = Greedy.unsupported(SPEC3)
    assert "exactly 2 modalities" in reason and "compares two branches" in reason
    assert "toy3" in reason
    assert Greedy.unsupported(SPEC) == "" and Greedy.unsupported(ML_SPEC) == ""
    with pytest.raises(ValueError, match="method.name=greedy: greedy needs exactly 2"):
        _method(SPEC3)


def test_shared_average_needs_equal_widths(monkeypatch):
    class Encoder(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin, self.out_dim = torch.nn.Linear(1, d), d

    widths = iter([3, 5])
    monkeypatch.setattr(Greedy, "build_encoders", lambda self, spec, model: torch.nn.ModuleDict(
        {m: Encoder(next(widths)) for m in spec.modalities}))
    with pytest.raises(ValueError, match="shared_average.*equal feature widths"):
        _method(preset="reference")
