"""OGM-GE (METHODS.md §2): scores, ratios, coefficients and gradient modulation, pinned by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.methods.ogm_ge import modulate_, ogm_coefficients, ogm_ratios, ogm_scores

from helpers import ML_SPEC, SPEC, SPEC3, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CPU = torch.device("cpu")


def _method(spec=SPEC, **options):
    torch.manual_seed(0)
    return build_method(spec, MODEL, MethodConfig("ogm_ge", "concat", options))


class Recorder(torch.optim.SGD):
    """SGD with lr 0 that records every gradient it is asked to apply."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[list[torch.Tensor | None]] = []

    def step(self, closure=None):
        self.seen.append([None if p.grad is None else p.grad.clone()
                          for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _raw_grads(method, batch) -> tuple[list[torch.Tensor | None], dict]:
    """The unmodulated gradient of the fused CE, and the per-modality logits it came from."""
    method.zero_grad(set_to_none=True)
    out = method(batch)
    method.criterion(out.logits, batch["label"]).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in method.parameters()]
    method.zero_grad(set_to_none=True)
    return grads, {m: z.detach() for m, z in out.per_modality.items()}


def _encoder_index(method) -> dict[int, str]:
    """Position in method.parameters() -> the modality whose encoder owns it."""
    owner = {id(p): m for m in method.modalities for p in method.encoders[m].parameters()}
    return {i: owner[id(p)] for i, p in enumerate(method.parameters()) if id(p) in owner}


def test_scores_are_summed_true_class_probabilities():
    z_a = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    z_v = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    label = torch.tensor([0, 1])
    s = ogm_scores({"a": z_a, "v": z_v}, label)
    e = math.e
    assert s["a"].item() == pytest.approx(e**2 / (e**2 + 1) + 0.5, rel=1e-6)
    assert s["v"].item() == pytest.approx(2 / (1 + e), rel=1e-6)


@pytest.mark.parametrize("s_a, s_v, dominant", [(3.0, 1.5, "a"), (1.5, 3.0, "v")])
def test_two_modalities_only_the_dominant_one_is_slowed(s_a, s_v, dominant):
    scores = {"a": torch.tensor(s_a), "v": torch.tensor(s_v)}
    ratios = ogm_ratios(scores)
    assert ratios["v"].item() == pytest.approx(s_v / s_a)
    assert ratios["a"].item() == pytest.approx(s_a / s_v)
    k = ogm_coefficients(scores, alpha=0.8)
    other = "v" if dominant == "a" else "a"
    assert k[dominant].item() == pytest.approx(1 - math.tanh(0.8 * 2.0), rel=1e-6)  # α·ρ, not α·(ρ−1)
    assert k[other].item() == 1.0


def test_equal_scores_modulate_nothing():
    k = ogm_coefficients({"a": torch.tensor(2.0), "v": torch.tensor(2.0)}, alpha=0.8)
    assert k["a"].item() == 1.0 and k["v"].item() == 1.0


def test_three_modalities_divide_by_the_mean_of_the_others():
    scores = {"a": torch.tensor(3.0), "v": torch.tensor(1.0), "t": torch.tensor(2.0)}
    r = ogm_ratios(scores)
    assert r["a"].item() == pytest.approx(3 / 1.5)
    assert r["v"].item() == pytest.approx(1 / 2.5)
    assert r["t"].item() == pytest.approx(1.0)
    k = ogm_coefficients(scores, alpha=0.3)
    assert k["a"].item() == pytest.approx(1 - math.tanh(0.3 * 2.0), rel=1e-6)
    assert k["v"].item() == 1.0 and k["t"].item() == 1.0  # ρ_t = 1 is not dominant
    # Two modalities can both dominate the mean of the others.
    k2 = ogm_coefficients({"a": torch.tensor(3.0), "v": torch.tensor(2.9), "t": torch.tensor(1.0)}, 0.3)
    assert k2["a"].item() == pytest.approx(1 - math.tanh(0.3 * 3 / 1.95), rel=1e-6)
    assert k2["v"].item() == pytest.approx(1 - math.tanh(0.3 * 2.9 / 2.0), rel=1e-6)
    assert k2["t"].item() == 1.0


def test_modulation_without_noise_is_exactly_k_times_g():
    p = nn.Parameter(torch.zeros(3, 4))
    g = torch.randn(3, 4)
    p.grad = g.clone()
    modulate_([p], torch.tensor(0.3), gaussian_enhance=False, conv_only=False)
    assert torch.equal(p.grad, g * 0.3)


def test_gaussian_enhancement_adds_noise_with_the_unmodulated_std():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(1000, 1000))
    g = 2.0 * torch.randn(1000, 1000) + 1.0
    p.grad = g.clone()
    k = 0.25
    modulate_([p], torch.tensor(k), gaussian_enhance=True, conv_only=False)
    noise = p.grad - k * g
    assert noise.std().item() == pytest.approx(g.std().item(), rel=0.01)  # ≈ 2, not k·2
    assert abs(noise.mean().item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), g.flatten()]))[0, 1].item()) < 0.01


def test_conv_only_touches_only_4d_gradients():
    conv, lin = nn.Parameter(torch.zeros(2, 1, 3, 3)), nn.Parameter(torch.zeros(4, 2))
    gc, gl = torch.randn(2, 1, 3, 3), torch.randn(4, 2)
    conv.grad, lin.grad = gc.clone(), gl.clone()
    modulate_([conv, lin], torch.tensor(0.5), gaussian_enhance=True, conv_only=True)
    assert torch.equal(lin.grad, gl)
    assert not torch.equal(conv.grad, 0.5 * gc)  # scaled and noised
    conv.grad, lin.grad = gc.clone(), gl.clone()
    modulate_([conv, lin], torch.tensor(0.5), gaussian_enhance=False, conv_only=True)
    assert torch.equal(conv.grad, 0.5 * gc) and torch.equal(lin.grad, gl)


@pytest.mark.parametrize("conv_only", [False, True])
def test_train_step_scales_each_encoder_by_its_coefficient(conv_only):
    method = _method(gaussian_enhance=False, conv_only=conv_only, alpha=0.8)
    batch = make_batch(SPEC, b=8)
    raw, per_mod = _raw_grads(method, batch)
    k = ogm_coefficients(ogm_scores(per_mod, batch["label"]), 0.8)
    assert any(v.item() < 1 for v in k.values())  # the test must see a modulated modality
    opt = Recorder(method.parameters())
    logs = method.train_step(batch, opt, StepContext(device=CPU, epoch=0))
    owner = _encoder_index(method)
    for i, (got, want) in enumerate(zip(opt.seen[0], raw)):
        m = owner.get(i)
        scaled = m is not None and (not conv_only or want.dim() == 4)
        torch.testing.assert_close(got, want * k[m] if scaled else want, rtol=1e-6, atol=1e-9)
    for m in SPEC.modalities:
        torch.testing.assert_close(logs[f"ogm/coeff_{m}"], k[m])


def test_no_modulation_and_no_noise_outside_the_window():
    method = _method(gaussian_enhance=True, modulation_starts=1, modulation_ends=3)
    batch = make_batch(SPEC, b=8)
    raw, _ = _raw_grads(method, batch)
    opt = Recorder(method.parameters())
    for epoch in (0, 3):  # before starts, and ends itself (the window is [starts, ends))
        method.train_step(batch, opt, StepContext(device=CPU, epoch=epoch))
        for got, want in zip(opt.seen[-1], raw):
            torch.testing.assert_close(got, want)
    method.train_step(batch, opt, StepContext(device=CPU, epoch=1))
    enc = _encoder_index(method)
    assert any(not torch.allclose(opt.seen[-1][i], raw[i]) for i in enc)


def test_logs_are_averaged_per_epoch_by_the_loop():
    from mmray.train.loop import RunState, train_epoch

    method = _method()
    state = RunState(method, torch.optim.SGD(method.parameters(), lr=0.01), None)
    steps = []
    step = method.train_step
    method.train_step = lambda *a: steps.append(step(*a)) or steps[-1]
    means = train_epoch(state, [make_batch(SPEC, seed=s) for s in range(3)], StepContext(device=CPU))
    assert {"loss", "ogm/coeff_audio", "ogm/ratio_image", "grad/audio", "grad/image"} <= set(steps[0])
    for key in ("ogm/coeff_audio", "ogm/coeff_image", "ogm/ratio_audio", "ogm/ratio_image"):
        assert means[f"train/{key}"] == pytest.approx(sum(float(s[key]) for s in steps) / 3, rel=1e-6)


def test_multilabel_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"method.name=ogm_ge.*multi-label"):
        build_method(ML_SPEC, MODEL, MethodConfig("ogm_ge"))


@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_trains_on_a_fixed_batch(spec, fusion):
    torch.manual_seed(0)
    method = build_method(spec, MODEL, MethodConfig("ogm_ge", fusion, {"alpha": 0.3}))
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    batch = make_batch(spec, b=16)
    losses = [float(method.train_step(batch, opt, StepContext(device=CPU))["loss"]) for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_gradients_are_modulated_before_they_are_averaged_across_workers():
    # Each worker's coefficients come from its own batch: scaling before the average keeps the
    # averaged gradient, and so the parameters, identical on every worker.
    method = _method(gaussian_enhance=False)
    batch = make_batch(SPEC, b=8)
    raw, per_mod = _raw_grads(method, batch)
    k = ogm_coefficients(ogm_scores(per_mod, batch["label"]), 0.8)
    synced: list[list[torch.Tensor | None]] = []
    ctx = StepContext(device=CPU, sync_grads=lambda module: synced.append(
        [None if p.grad is None else p.grad.clone() for p in module.parameters()]))
    method.train_step(batch, Recorder(method.parameters()), ctx)
    owner = _encoder_index(method)
    for i, (got, want) in enumerate(zip(synced[0], raw)):
        torch.testing.assert_close(got, want * k[owner[i]] if i in owner else want)
