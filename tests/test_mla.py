"""MLA (METHODS.md §4): projector, projected head gradient, alternating steps, fusion rules, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.methods.mla import (
    batch_entropy_weights,
    entropy_weights,
    fuse,
    project_gradient_,
    projector_alpha,
    projector_update,
)

from helpers import ML_SPEC, SPEC, SPEC3, make_batch

MODEL = ModelConfig(width=4, feature_dim=6)  # d = 6: nothing may assume 512
CTX = StepContext(device=torch.device("cpu"))


def _method(spec=SPEC, seed=0, **options):
    torch.manual_seed(seed)
    return build_method(spec, MODEL, MethodConfig("mla", "concat", options))


def _np_update(P: np.ndarray, r: np.ndarray, alpha: float) -> np.ndarray:
    k = P @ r.reshape(-1, 1)
    P = P - (k @ k.T) / (alpha + (r.reshape(1, -1) @ k).item())
    return P / np.linalg.norm(P, "fro")


class Recorder(torch.optim.SGD):
    """SGD with lr 0 that records, at every step, every parameter's gradient (None if absent)."""

    def __init__(self, method):
        super().__init__(method.parameters(), lr=0.0)
        self.names = [n for n, _ in method.named_parameters()]
        self.seen: list[dict[str, torch.Tensor | None]] = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.seen.append({n: None if p.grad is None else p.grad.clone()
                          for n, p in zip(self.names, params)})
        return super().step(closure)


def _unimodal_grads(method, batch, m: str) -> dict[str, torch.Tensor]:
    """Gradients of loss_m = CE(g(h_m)) alone, by plain autograd."""
    method.zero_grad(set_to_none=True)
    feats = method.features(batch)
    F.cross_entropy(method.head(feats[m]), batch["label"]).backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    return grads


def test_alpha_schedule():
    assert projector_alpha(0, 10) == pytest.approx(0.1)
    assert projector_alpha(5, 10) == pytest.approx(0.1 ** 1.5)


def test_projector_update_matches_numpy_for_two_steps():
    rng = np.random.default_rng(0)
    r1, r2 = rng.normal(size=5), rng.normal(size=5)
    P_np = _np_update(_np_update(np.eye(5), r1, 0.1), r2, 0.1 ** 1.5)
    P = torch.eye(5)
    P = projector_update(P, torch.tensor(r1, dtype=torch.float32), 0.1)
    P = projector_update(P, torch.tensor(r2, dtype=torch.float32), 0.1 ** 1.5)
    np.testing.assert_allclose(P.numpy(), P_np, rtol=1e-5, atol=1e-6)
    assert P.dtype == torch.float32
    assert np.linalg.norm(P_np, "fro") == pytest.approx(1.0)


def test_projected_gradient_is_G_P_transposed_and_the_bias_is_untouched():
    head = nn.Linear(4, 3)
    G, gb = torch.randn(3, 4), torch.randn(3)
    head.weight.grad, head.bias.grad = G.clone(), gb.clone()
    P = torch.randn(4, 4)
    project_gradient_(head, P)
    torch.testing.assert_close(head.weight.grad, G @ P.T)
    assert torch.equal(head.bias.grad, gb)


@pytest.mark.parametrize("project, update_first", [(True, False), (True, True), (False, False)])
def test_train_step_alternates_and_projects_the_head(project, update_first):
    method = _method(project=project, update_first=update_first)
    batch = make_batch(SPEC, b=8)
    with torch.no_grad():
        r = {m: h.mean(0).double().numpy() for m, h in method.features(batch).items()}
    raw = {m: _unimodal_grads(method, batch, m) for m in method.modalities}
    opt = Recorder(method)
    logs = method.train_step(batch, opt, CTX)
    assert len(opt.seen) == 2  # one optimizer step per modality
    P1 = _np_update(np.eye(6), r["audio"], 0.1)
    P2 = _np_update(P1, r["image"], 0.1)
    used = ({"audio": P1, "image": P2} if update_first else {"audio": np.eye(6), "image": P1})
    for step, m in zip(opt.seen, ["audio", "image"]):
        G = raw[m]["head.weight"].double().numpy()
        want = G @ used[m].T if project else G
        np.testing.assert_allclose(step["head.weight"].numpy(), want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(step["head.bias"], raw[m]["head.bias"])
        # Encoder m sees loss_m's gradient; every other encoder sees none at this step.
        for name, g in step.items():
            if name.startswith(f"encoders.{m}."):
                torch.testing.assert_close(g, raw[m][name])
            elif name.startswith("encoders."):
                assert g is None, name
    want_P = P2 if project else np.eye(6)
    np.testing.assert_allclose(method.projector.numpy(), want_P, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"loss", "loss/audio", "loss/image", "grad/audio", "grad/image"}
    torch.testing.assert_close(logs["loss"], (logs["loss/audio"] + logs["loss/image"]) / 2)


def test_the_head_gradient_is_projected_before_it_is_averaged_across_workers():
    # Each worker's P comes from its own batches: projecting before the average keeps the
    # averaged gradient, and so the parameters, identical on every worker.
    method = _method()
    opt, synced = Recorder(method), []
    ctx = StepContext(device=torch.device("cpu"),
                      sync_grads=lambda module: synced.append(module.head.weight.grad.clone()))
    for s in range(2):  # the second batch's first step already has P != I
        method.train_step(make_batch(SPEC, seed=s), opt, ctx)
    assert len(synced) == len(opt.seen) == 4
    for got, step in zip(synced, opt.seen):
        torch.testing.assert_close(got, step["head.weight"])
    assert not torch.allclose(method.projector, torch.eye(6))


def test_modality_order_sets_the_step_order():
    method = _method(modality_order=["image", "audio"])
    opt = Recorder(method)
    method.train_step(make_batch(SPEC), opt, CTX)
    firsts = [next(n.split(".")[1] for n, g in s.items() if n.startswith("encoders.") and g is not None)
              for s in opt.seen]
    assert firsts == ["image", "audio"]


def test_fixed_fusion_rule():
    z = {"audio": torch.tensor([[1.0, 2.0]]), "image": torch.tensor([[3.0, -1.0]])}
    torch.testing.assert_close(fuse(z, {"audio": 0.55, "image": 0.45}),
                               torch.tensor([[0.55 * 1 + 0.45 * 3, 0.55 * 2 - 0.45 * 1]]))
    method = _method(fusion_rule="fixed", fusion_weights={"audio": 0.55, "image": 0.45})
    method.eval()
    batch = make_batch(SPEC)
    out = method.predict(batch)
    torch.testing.assert_close(out.logits, 0.55 * out.per_modality["audio"]
                               + 0.45 * out.per_modality["image"])
    equal = _method(fusion_rule="fixed").eval().predict(batch)
    torch.testing.assert_close(equal.logits, sum(equal.per_modality.values()) / 2)


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_dynamic_rule_weights_each_sample_by_entropy():
    e = math.e
    z = {"a": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "v": torch.tensor([[0.0, 0.0], [5.0, 0.0]])}
    w = entropy_weights(z)
    ea = [_entropy([e**2 / (1 + e**2), 1 / (1 + e**2)]), math.log(2)]
    ev = [math.log(2), _entropy([e**5 / (1 + e**5), 1 / (1 + e**5)])]
    for i in range(2):
        wa = math.exp(-ea[i]) / (math.exp(-ea[i]) + math.exp(-ev[i]))
        assert w["a"][i].item() == pytest.approx(wa, rel=1e-5)
        assert w["v"][i].item() == pytest.approx(1 - wa, rel=1e-5)
    fused = fuse(z, w)
    torch.testing.assert_close(fused[1], w["a"][1] * z["a"][1] + w["v"][1] * z["v"][1])
    # An absent modality gets zero weight.
    present = {"a": torch.tensor([True, False]), "v": torch.tensor([True, True])}
    masked = entropy_weights(z, present)
    assert masked["a"][1].item() == 0.0 and masked["v"][1].item() == 1.0
    assert masked["a"][0].item() == pytest.approx(w["a"][0].item())


def test_batch_entropy_is_one_weight_per_modality_over_the_batch_axis():
    e = math.e
    z = {"a": torch.tensor([[2.0, 1.0], [0.0, 0.0]]), "v": torch.tensor([[0.0, 0.0], [5.0, 0.0]])}
    w = batch_entropy_weights(z)
    # Softmax down each class column: a's columns are [2, 0] and [1, 0]; v's are [0, 5] and [0, 0].
    ea = _entropy([e**2 / (e**2 + 1), 1 / (e**2 + 1)]) + _entropy([e / (e + 1), 1 / (e + 1)])
    ev = _entropy([1 / (1 + e**5), e**5 / (1 + e**5)]) + math.log(2)
    wa = math.exp(-ea) / (math.exp(-ea) + math.exp(-ev))
    assert w["a"].dim() == 0
    assert w["a"].item() == pytest.approx(wa, rel=1e-5)
    assert w["v"].item() == pytest.approx(1 - wa, rel=1e-5)
    method = _method(batch_entropy=True).eval()
    out = method.predict(make_batch(SPEC))
    bw = batch_entropy_weights(out.per_modality)
    torch.testing.assert_close(out.logits, fuse(out.per_modality, bw))


def test_masked_loss_averages_over_present_samples():
    method = _method()
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    present = torch.tensor([True, False, True, True])
    torch.testing.assert_close(method.masked_loss(logits, y, present),
                               F.cross_entropy(logits[present], y[present]))
    torch.testing.assert_close(method.masked_loss(logits, y, torch.ones(4, dtype=torch.bool)),
                               method.criterion(logits, y))


def test_projector_is_a_buffer_sized_by_the_head_and_round_trips():
    method = _method()
    assert "projector" in dict(method.named_buffers())
    assert method.projector.shape == (method.head.in_features,) * 2 == (6, 6)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for s in range(3):
        method.train_step(make_batch(SPEC, seed=s), opt, CTX)
    assert not torch.allclose(method.projector, torch.eye(6))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = _method(seed=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.projector, method.projector)


def test_resume_matches_an_uninterrupted_run():
    def run(method, opt, steps, n=4):
        for s in steps:
            ctx = StepContext(device=torch.device("cpu"), epoch=s // n, batch_idx=s % n,
                              batches_per_epoch=n)
            method.train_step(make_batch(SPEC, seed=s), opt, ctx)

    a = _method()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    run(a, opt_a, range(5))
    buf = io.BytesIO()  # through bytes, as a checkpoint: state_dict() tensors alias the live ones
    torch.save({"method": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    run(a, opt_a, range(5, 10))
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = _method(seed=7)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    b.load_state_dict(state["method"])
    opt_b.load_state_dict(state["optimizer"])
    run(b, opt_b, range(5, 10))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_options_must_name_the_dataset_modalities():
    with pytest.raises(ValueError, match=r"modality_order.*\['audio', 'image'\]"):
        _method(modality_order=["audio", "text"])
    with pytest.raises(ValueError, match=r"fusion_weights.*\['audio', 'image'\]"):
        _method(fusion_rule="fixed", fusion_weights={"audio": 1.0})


@pytest.mark.parametrize("spec", [SPEC, SPEC3, ML_SPEC], ids=["2mod", "3mod", "multilabel"])
@pytest.mark.parametrize("rule", ["dynamic", "fixed"])
def test_trains_on_a_fixed_batch(spec, rule):
    method = _method(spec, fusion_rule=rule)
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    batch = make_batch(spec, b=16)
    losses = []
    for i in range(15):
        ctx = StepContext(device=torch.device("cpu"), batch_idx=i, batches_per_epoch=15)
        losses.append(float(method.train_step(batch, opt, ctx)["loss"]))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert method.predict(batch).logits.shape == (16, spec.num_classes)
