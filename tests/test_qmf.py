"""QMF (METHODS.md §3): confidence, fusion with stop-gradient, ranking loss, loss history, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.methods.qmf import LossHistory, confidence_fusion, energy_confidence, rank_loss

from helpers import ML_SPEC, SPEC, SPEC3, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CTX = StepContext(device=torch.device("cpu"))


def _method(spec=SPEC, seed=0, **options):
    torch.manual_seed(seed)
    return build_method(spec, MODEL, MethodConfig("qmf", "concat", options))


def _batch(spec, step: int, b: int = 6, n_ids: int = 12) -> dict:
    """Batches over a dataset of n_ids samples, so ids recur across steps (as over epochs)."""
    batch = make_batch(spec, b=b, seed=step)
    batch["id"] = [f"s{(step * b + i) % n_ids}" for i in range(b)]
    return batch


def test_confidence_is_scaled_negative_energy():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    c = energy_confidence(z)
    assert c[0].item() == pytest.approx(math.log(math.e + math.e**2 + math.e**3) / 10, rel=1e-6)
    assert c[1].item() == pytest.approx(math.log(3) / 10, rel=1e-6)
    c2 = energy_confidence(z, temperature=2.0)
    assert c2[0].item() == pytest.approx(2 * math.log(sum(math.exp(v / 2) for v in (1, 2, 3))) / 10,
                                         rel=1e-6)


def test_fusion_weights_by_confidence_and_stops_its_gradient():
    z_a = torch.tensor([[1.0, -1.0], [0.5, 2.0]], requires_grad=True)
    z_v = torch.tensor([[0.0, 3.0], [1.0, 1.0]], requires_grad=True)
    c = {"a": energy_confidence(z_a), "v": energy_confidence(z_v)}
    fused = confidence_fusion({"a": z_a, "v": z_v}, c)
    expected = c["a"].detach()[:, None] * z_a.detach() + c["v"].detach()[:, None] * z_v.detach()
    torch.testing.assert_close(fused.detach(), expected)
    fused.sum().backward()
    # Only the direct path: d(Σ c·z)/dz = c. A path through c would add dc/dz · Σ_k z_k.
    torch.testing.assert_close(z_a.grad, c["a"].detach()[:, None].expand(2, 2))
    torch.testing.assert_close(z_v.grad, c["v"].detach()[:, None].expand(2, 2))


def test_rank_loss_on_a_hand_example():
    c = torch.tensor([0.9, 0.2, 0.1], requires_grad=True)
    hist = torch.tensor([0.6, 0.0, 0.5])
    # Pairs (i, i+1): (0,1) t=+1: 0.7 − 0.6 = 0.1; (1,2) t=−1: −0.1 − 0.5 → 0; (2,0) t=−1:
    # 0.8 − 0.1 = 0.7.  Mean over the 3 pairs.
    loss = rank_loss(c, hist)
    assert loss.item() == pytest.approx(0.8 / 3, rel=1e-6)
    loss.backward()
    # d/dc0: +t01 from pair (0,1) and −t20 from pair (2,0): (1 + 1) / 3; d/dc1: −1/3; d/dc2: −1/3.
    torch.testing.assert_close(c.grad, torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    # Equal histories give t = 0 and no loss, whatever the confidences.
    assert rank_loss(torch.tensor([5.0, -5.0]), torch.tensor([0.3, 0.3])).item() == 0.0


def test_history_accumulates_per_id_and_normalises_per_modality():
    h = LossHistory(["a", "v"])
    h.update(["x", "y"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    h.update(["y", "z"], torch.tensor([[1.0, 1.0], [0.0, 5.0]]))
    h.update(["x", "x"], torch.tensor([[0.5, 0.0], [0.5, 0.0]]))  # a repeated id adds twice
    # sums: x = [2, 2], y = [4, 5], z = [0, 5]; a: min 0, max 4; v: min 2, max 5.
    norm = h.normalised(["x", "y", "z"])
    torch.testing.assert_close(norm, torch.tensor([[0.5, 0.0], [1.0, 1.0], [0.0, 1.0]],
                                                  dtype=torch.float64))
    # Normalised over every id seen, not over the ids asked for.
    torch.testing.assert_close(h.normalised(["x"]), torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    flat = LossHistory(["a"])
    flat.update(["x", "y"], torch.tensor([[1.0], [1.0]]))
    assert torch.equal(flat.normalised(["x", "y"]), torch.zeros(2, 1, dtype=torch.float64))


def test_train_step_records_each_modality_per_sample_ce():
    method = _method()
    batch = _batch(SPEC, 0)
    with torch.no_grad():
        per_mod = method.unimodal_logits(batch)
    method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.1), CTX)
    h = method.history
    rows = [h.index[i] for i in batch["id"]]
    for j, m in enumerate(method.modalities):
        ce = F.cross_entropy(per_mod[m], batch["label"], reduction="none")
        torch.testing.assert_close(h.sums[rows, j], ce.double())


def test_loss_is_unimodal_plus_fused_plus_weighted_rank():
    method = _method(rank_weight=0.5)
    with torch.no_grad():  # large logits spread the confidences, so that some hinges fire
        for head in method.heads.values():
            head.weight.mul_(50)
    opt = torch.optim.SGD(method.parameters(), lr=0.0)  # parameters stay put: logits are known
    first = _batch(SPEC, 0)
    method.train_step(first, opt, CTX)
    batch = _batch(SPEC, 1)
    batch["id"] = list(reversed(first["id"]))  # ids seen before, in another order
    y, h = batch["label"], method.history
    with torch.no_grad():
        per_mod = method.unimodal_logits(batch)
    ce = {m: F.cross_entropy(z, y, reduction="none") for m, z in per_mod.items()}
    c = {m: torch.logsumexp(z, 1) / 10 for m, z in per_mod.items()}
    fused = sum(c[m][:, None] * per_mod[m] for m in per_mod)
    classification = sum(ce[m].mean() for m in per_mod) + F.cross_entropy(fused, y)
    # The history after this step's update, min-max normalised per modality by hand.
    rows = [h.index[i] for i in batch["id"]]
    sums = h.sums.clone()
    sums[rows] += torch.stack([ce[m] for m in method.modalities], 1).double()
    norm = (sums - sums.min(0).values) / (sums.max(0).values - sums.min(0).values)
    rank, b = 0.0, len(rows)
    for j, m in enumerate(method.modalities):
        hist = norm[rows, j]
        for i in range(b):
            k = (i + 1) % b
            t = float(torch.sign(hist[i] - hist[k]))
            rank += max(0.0, t * float(c[m][i] - c[m][k]) - abs(float(hist[i] - hist[k]))) / b
    assert rank > 0  # the example must exercise the ranking term
    logs = method.train_step(batch, opt, CTX)
    assert float(logs["loss"]) == pytest.approx(float(classification) + 0.5 * rank, rel=1e-5)
    for m in method.modalities:
        assert float(logs[f"qmf/conf_{m}"]) == pytest.approx(float(c[m].mean()), rel=1e-5)
        assert f"grad/{m}" in logs


def test_confidences_get_no_gradient_from_the_classification_losses():
    method = _method(rank_weight=0.0)
    batch = _batch(SPEC, 0)
    method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.0), CTX)
    got = {m: method.heads[m].weight.grad.clone() for m in method.modalities}

    def head_grads(detach: bool) -> dict:
        method.zero_grad(set_to_none=True)
        per_mod = method.unimodal_logits(batch)
        c = {m: torch.logsumexp(z, 1) / 10 for m, z in per_mod.items()}
        c = {m: v.detach() if detach else v for m, v in c.items()}
        fused = sum(c[m][:, None] * per_mod[m] for m in per_mod)
        loss = sum(F.cross_entropy(z, batch["label"]) for z in per_mod.values())
        (loss + F.cross_entropy(fused, batch["label"])).backward()
        return {m: method.heads[m].weight.grad.clone() for m in method.modalities}

    want, leaky = head_grads(detach=True), head_grads(detach=False)
    for m in method.modalities:
        torch.testing.assert_close(got[m], want[m])
        assert not torch.allclose(got[m], leaky[m])


def test_history_survives_state_dict_round_trip():
    method = _method()
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(3):
        method.train_step(_batch(SPEC, step), opt, CTX)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = _method(seed=1)
    assert not fresh.history.index
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.history.index == method.history.index
    assert torch.equal(fresh.history.sums, method.history.sums)
    ids = sorted(method.history.index)
    assert torch.equal(fresh.history.normalised(ids), method.history.normalised(ids))


def test_resume_matches_an_uninterrupted_run():
    def run(method, opt, steps):
        for step in steps:
            method.train_step(_batch(SPEC, step), opt, CTX)

    a = _method(rank_weight=0.1)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    run(a, opt_a, range(4))
    buf = io.BytesIO()  # through bytes, as a checkpoint: state_dict() tensors alias the live ones
    torch.save({"method": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    run(a, opt_a, range(4, 8))
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    b = _method(seed=123, rank_weight=0.1)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    b.load_state_dict(state["method"])
    opt_b.load_state_dict(state["optimizer"])
    run(b, opt_b, range(4, 8))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if name == "_extra_state":
            assert torch.equal(pa["history"]["sums"], pb["history"]["sums"])
        else:
            assert torch.equal(pa, pb), name


@pytest.mark.parametrize("spec", [SPEC, SPEC3, ML_SPEC], ids=["2mod", "3mod", "multilabel"])
def test_trains_on_a_fixed_batch(spec):
    method = _method(spec)
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    batch = _batch(spec, 0, b=16, n_ids=16)
    losses = [float(method.train_step(batch, opt, CTX)["loss"]) for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
