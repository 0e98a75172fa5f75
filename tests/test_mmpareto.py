"""MMPareto (METHODS.md §9): the two-gradient min-norm weight, the agree/conflict rule and the
magnitude rescaling pinned by hand; the gradient each parameter receives in a step, computed here
from each loss's own gradient; missing modalities, the checkpoint and the unsupported datasets."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods import METHODS, StepContext, build_method
from mmray.methods.mmpareto import (
    combine,
    cosine,
    dot_products,
    min_norm_weight,
    pareto_weight,
    rescale,
)

from helpers import ML_SPEC, SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CTX = StepContext(device=torch.device("cpu"))
KAPPA = 1.5


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def weights_of(g1, g2, margin=0.0):
    return pareto_weight(*dot_products([t(*g1)], [t(*g2)]), margin)


# -- the formulas, by hand ---------------------------------------------------------------------


def test_min_norm_weight_is_the_closed_form_and_its_point_has_the_least_norm():
    # g1 = (1, 0), g2 = (-1, 1): v11 = 1, v12 = -1, v22 = 2 -> γ = (2 + 1) / (1 + 2 + 2) = 3/5,
    # the point 0.6·g1 + 0.4·g2 = (0.2, 0.4), squared norm 0.2.
    v11, v12, v22 = dot_products([t(1, 0)], [t(-1, 1)])
    assert (float(v11), float(v12), float(v22)) == (1.0, -1.0, 2.0)
    gamma = min_norm_weight(v11, v12, v22)
    assert float(gamma) == pytest.approx(0.6, abs=1e-12)
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    norms = ((grid[:, None] * t(1, 0) + (1 - grid[:, None]) * t(-1, 1)) ** 2).sum(1)
    assert float(grid[norms.argmin()]) == pytest.approx(0.6, abs=1e-4)
    assert float(norms.min()) == pytest.approx(0.2, abs=1e-8)


@pytest.mark.parametrize("g1, g2, exact, margin_value", [
    # v11 = 1, v12 = 2, v22 = 4: the ratio (4 - 2) / (1 + 4 - 4) = 2 is clipped at 1
    ((1, 0), (2, 0), 1.0, 0.999),
    # v11 = 4, v12 = 2, v22 = 1: the ratio (1 - 2) / 1 = -1 is clipped at 0
    ((2, 0), (1, 0), 0.0, 0.001),
    # g1 = 0: v12 = v11 = 0, the clip at 1 (tested first)
    ((0, 0), (1, 2), 1.0, 0.999),
    # g2 = 0: v12 = v22 = 0 < v11, the clip at 0
    ((1, 2), (0, 0), 0.0, 0.001),
    # g1 = g2: a zero denominator, under the first test
    ((1, 1), (1, 1), 1.0, 0.999),
])
def test_min_norm_weight_clips_at_0_and_1_and_the_margin_replaces_the_bounds(g1, g2, exact, margin_value):
    dots = dot_products([t(*g1)], [t(*g2)])
    assert float(min_norm_weight(*dots)) == exact
    assert float(min_norm_weight(*dots, margin=0.001)) == pytest.approx(margin_value, abs=1e-12)


def test_agreeing_gradients_get_half_each_and_conflicting_ones_the_min_norm_weight():
    gamma, conflict = weights_of((1, 0), (1, 1))  # cos = 1/√2 > 0
    assert float(gamma) == 0.5 and not bool(conflict)
    gamma, conflict = weights_of((1, 0), (-1, 1))  # cos < 0: γ = 3/5 as above
    assert float(gamma) == pytest.approx(0.6) and bool(conflict)
    gamma, conflict = weights_of((1, 0), (0, 3))  # cos = 0 is a conflict: (9 - 0) / (1 + 9) = 0.9
    assert float(gamma) == pytest.approx(0.9) and bool(conflict)
    # in the conflict branch the clip never bites for non-zero gradients
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, b = torch.randn(2, 5, generator=g, dtype=torch.float64)
        gamma, conflict = pareto_weight(*dot_products([a], [b]))
        if bool(conflict):
            assert 0 < float(gamma) < 1


def test_cosine_and_the_combined_direction():
    assert float(cosine(*dot_products([t(1, 0)], [t(1, 1)]))) == pytest.approx(1 / math.sqrt(2))
    assert float(cosine(*dot_products([t(0, 0)], [t(1, 1)]))) == 0.0
    # d = 2·(γ g_mm + (1 - γ) g_u), tensor by tensor: γ = 0.25
    d = combine([t(4, 0), t(2)], [t(0, 8), t(-2)], torch.tensor(0.25, dtype=torch.float64))
    assert torch.equal(d[0], t(2, 12)) and torch.equal(d[1], t(-2))
    # agreeing: the plain sum
    d = combine([t(1, 2)], [t(3, 4)], torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(d[0], t(4, 6))


def test_rescale_per_tensor_scales_up_to_the_sum_never_down_then_by_kappa():
    combined = [t(3, 4), t(0, 2), t(0, 0)]       # norms 5, 2, 0
    summed = [t(6, 8), t(0, 1), t(1, 0)]         # norms 10, 1, 1
    out = rescale(combined, summed, KAPPA, per_tensor=True)
    assert torch.equal(out[0], KAPPA * 2 * t(3, 4))   # ‖G‖/‖d‖ = 2: up to the sum's norm
    assert torch.equal(out[1], KAPPA * t(0, 2))       # 1/2: kept, not shrunk
    assert torch.equal(out[2], t(0, 0))               # zero stays zero (no NaN)


def test_rescale_over_the_encoder_uses_the_norms_of_all_tensors_together():
    combined = [t(3, 0), t(0, 4)]                # ‖d‖ = 5
    summed = [t(0, 0), t(6, 8)]                  # ‖G‖ = 10
    out = rescale(combined, summed, KAPPA, per_tensor=False)
    assert torch.equal(out[0], KAPPA * 2 * t(3, 0)) and torch.equal(out[1], KAPPA * 2 * t(0, 4))
    out = rescale([t(6, 8)], [t(3, 4)], KAPPA, per_tensor=False)  # ‖G‖ < ‖d‖: not shrunk
    assert torch.equal(out[0], KAPPA * t(6, 8))
    assert torch.equal(rescale([t(0, 0)], [t(1, 1)], KAPPA, per_tensor=False)[0], t(0, 0))


# -- the step ----------------------------------------------------------------------------------


def build(spec=SPEC, preset="", **options):
    torch.manual_seed(0)
    return build_method(spec, MODEL, checked_method_config("mmpareto", preset=preset, options=options))


class Recorder(torch.optim.SGD):
    """SGD with lr 0 that records the gradients it is asked to apply, by parameter name."""

    def __init__(self, method):
        self.names = {id(p): n for n, p in method.named_parameters()}
        super().__init__(method.parameters(), lr=0.0)
        self.applied: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        self.applied = {self.names[id(p)]: p.grad.clone() for g in self.param_groups
                        for p in g["params"] if p.grad is not None}
        return super().step(closure)


def own_gradients(method, batch):
    """On a copy (same weights, batch statistics): each encoder's gradients of L_mm and of its
    L_m, by parameter name, and the gradient of the summed loss of every parameter."""
    model = copy.deepcopy(method)
    out = model(batch)
    y = batch["label"]
    l_mm = F.cross_entropy(out.logits.float(), y)
    l_u = {m: F.cross_entropy(out.per_modality[m].float(), y) for m in model.modalities}
    g_mm, g_u = {}, {}
    for m in model.modalities:
        names = [f"encoders.{m}.{n}" for n, _ in model.encoders[m].named_parameters()]
        ps = list(model.encoders[m].parameters())
        g_mm[m] = dict(zip(names, torch.autograd.grad(l_mm, ps, retain_graph=True), strict=True))
        g_u[m] = dict(zip(names, torch.autograd.grad(l_u[m], ps, retain_graph=True), strict=True))
    named = dict(model.named_parameters())
    total = torch.autograd.grad(l_mm + sum(l_u.values()), list(named.values()))
    return g_mm, g_u, dict(zip(named, total, strict=True))


def expected_encoder_grads(g_mm: dict, g_u: dict, per_tensor: bool = True) -> tuple[dict, float]:
    """The rule written out: γ from the whole encoder's dot products, d per tensor, the rescale."""
    v11 = sum(float((a * a).sum()) for a in g_mm.values())
    v12 = sum(float((a * b).sum()) for a, b in zip(g_mm.values(), g_u.values(), strict=True))
    v22 = sum(float((b * b).sum()) for b in g_u.values())
    gamma = 0.5 if v12 > 0 else min(max((v22 - v12) / (v11 + v22 - 2 * v12), 0.0), 1.0)
    d = {n: 2 * (gamma * g_mm[n] + (1 - gamma) * g_u[n]) for n in g_mm}
    total = {n: g_mm[n] + g_u[n] for n in g_mm}
    if per_tensor:
        return {n: KAPPA * max(1.0, float(total[n].norm() / d[n].norm())) * d[n] for n in d}, gamma
    ratio = math.sqrt(sum(float(x.norm()) ** 2 for x in total.values())
                      / sum(float(x.norm()) ** 2 for x in d.values()))
    return {n: KAPPA * max(1.0, ratio) * d[n] for n in d}, gamma


def oppose(method, modality: str) -> None:
    """Unimodal head of `modality` ← −3·(its fused block): its two gradients start opposed."""
    with torch.no_grad():
        method.unimodal_heads[modality].weight.copy_(-3 * method.head.weight_of(modality))


@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "per_encoder"])
def test_each_encoder_gets_its_pair_integrated_and_the_heads_their_plain_gradient(spec, per_tensor):
    method = build(spec, rescale_per_tensor=per_tensor)
    oppose(method, "audio")  # audio conflicts, the others (aligned heads) agree
    with torch.no_grad():
        for m in method.modalities[1:]:
            method.unimodal_heads[m].weight.copy_(3 * method.head.weight_of(m))
    batch = make_batch(spec, b=8, seed=3)
    g_mm, g_u, total = own_gradients(method, batch)
    opt = Recorder(method)
    logs = method.train_step(batch, opt, CTX)
    for m in method.modalities:
        want, gamma = expected_encoder_grads(g_mm[m], g_u[m], per_tensor)
        assert float(logs[f"pareto/gamma_{m}"]) == pytest.approx(gamma, abs=1e-6)
        assert float(logs[f"pareto/conflict_{m}"]) == (1.0 if m == "audio" else 0.0)
        for n, g in want.items():
            torch.testing.assert_close(opt.applied[n], g, rtol=1e-4, atol=1e-7, msg=n)
        if not per_tensor:  # over the encoder the final norm is κ‖g_mm + g_u‖ exactly
            norm = math.sqrt(sum(float((g_mm[m][n] + g_u[m][n]).norm()) ** 2 for n in g_mm[m]))
            assert float(logs[f"grad/{m}"]) == pytest.approx(KAPPA * norm, rel=1e-5)
    assert 0 < float(logs["pareto/gamma_audio"]) < 1
    for n, g in total.items():
        if not n.startswith("encoders."):
            torch.testing.assert_close(opt.applied[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_balancebench_steps_three_times_the_summed_gradient_and_its_unimodal_logits_are_fused_blocks():
    method = build(SPEC3, "balancebench")
    assert not hasattr(method, "unimodal_heads")
    batch = make_batch(SPEC3, b=8, seed=4)
    out = copy.deepcopy(method)(batch)
    fused_blocks = copy.deepcopy(method).head(copy.deepcopy(method).features(batch))[1]
    for m in method.modalities:
        torch.testing.assert_close(out.per_modality[m], fused_blocks[m])
    g_mm, g_u, total = own_gradients(method, batch)
    opt = Recorder(method)
    logs = method.train_step(batch, opt, CTX)
    for m in method.modalities:
        assert float(logs[f"pareto/cos_{m}"]) == pytest.approx(1.0)
        for n in g_mm[m]:
            torch.testing.assert_close(opt.applied[n], 3 * (g_mm[m][n] + g_u[m][n]), rtol=1e-5, atol=1e-7)
    # the unimodal losses train the fused head too
    torch.testing.assert_close(opt.applied["head.fc.weight"], total["head.fc.weight"])


def zero_block(method, modality: str) -> None:
    with torch.no_grad():
        method.head.weight_of(modality).zero_()


def test_a_zero_multimodal_gradient_gives_no_update_exactly_and_the_unimodal_one_in_the_reference():
    batch = make_batch(SPEC, b=8, seed=5)
    paper, reference = build(SPEC, "paper"), build(SPEC, "reference")
    for method in (paper, reference):
        zero_block(method, "audio")  # L_mm does not reach the audio encoder
    _, g_u, _ = own_gradients(reference, batch)
    opt = Recorder(paper)
    logs = paper.train_step(batch, opt, CTX)
    assert float(logs["pareto/gamma_audio"]) == 1.0 and float(logs["pareto/conflict_audio"]) == 1.0
    assert all(float(opt.applied[n].abs().max()) == 0 for n in g_u["audio"])
    opt = Recorder(reference)
    logs = reference.train_step(batch, opt, CTX)
    assert float(logs["pareto/gamma_audio"]) == pytest.approx(0.999)
    for n, g in g_u["audio"].items():  # κ·‖g_u‖/‖0.002 g_u‖·0.002 g_u = κ g_u
        torch.testing.assert_close(opt.applied[n], KAPPA * g, rtol=1e-5, atol=1e-8)


def test_magnitude_factor_scales_every_encoder_gradient():
    batch = make_batch(SPEC, b=8, seed=6)
    a, b = build(SPEC), build(SPEC, magnitude_factor=3.0)
    opt_a, opt_b = Recorder(a), Recorder(b)
    a.train_step(batch, opt_a, CTX), b.train_step(batch, opt_b, CTX)
    for n, g in opt_a.applied.items():
        want = 2 * g if n.startswith("encoders.") else g
        torch.testing.assert_close(opt_b.applied[n], want, rtol=1e-5, atol=1e-8)


# -- missing modalities, multi-label, checkpoint, support --------------------------------------


def test_the_unimodal_loss_averages_over_present_samples_and_an_absent_modality_gets_no_update():
    method = build(SPEC)
    batch = make_batch(SPEC, b=6, seed=7)
    batch["present"]["audio"] = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)
    out = copy.deepcopy(method)(batch)
    keep = batch["present"]["audio"]
    want = F.cross_entropy(out.per_modality["audio"][keep], batch["label"][keep])
    logs = method.train_step(batch, Recorder(method), CTX)
    assert float(logs["loss/audio"]) == pytest.approx(float(want.detach()), rel=1e-6)

    batch["present"]["audio"][:] = False
    opt = Recorder(method)
    logs = method.train_step(batch, opt, CTX)
    assert float(logs["loss/audio"]) == 0.0
    assert all(float(g.abs().max()) == 0 for n, g in opt.applied.items() if n.startswith("encoders.audio."))
    assert all(bool(torch.isfinite(g).all()) for g in opt.applied.values())
    assert float(logs["grad/image"]) > 0


def test_multilabel_losses_are_bce_and_the_step_is_finite():
    method = build(ML_SPEC)
    batch = make_batch(ML_SPEC, b=6, seed=8)
    out = copy.deepcopy(method)(batch)
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.1), CTX)
    want = F.binary_cross_entropy_with_logits(out.per_modality["image"], batch["label"])
    assert float(logs["loss/image"]) == pytest.approx(float(want.detach()), rel=1e-6)
    assert all(bool(torch.isfinite(p).all()) for p in method.parameters())


def test_a_checkpoint_round_trip_gives_the_same_next_step():
    a = build(SPEC3)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    a.train_step(make_batch(SPEC3, seed=9), opt_a, CTX)
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = build(SPEC3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    b.load_state_dict(state["method"])
    opt_b.load_state_dict(state["optimizer"])
    batch = make_batch(SPEC3, seed=10)
    la, lb = a.train_step(batch, opt_a, CTX), b.train_step(batch, opt_b, CTX)
    for k in la:
        assert torch.equal(torch.as_tensor(la[k]), torch.as_tensor(lb[k])), k
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_unsupported_names_the_reason():
    cls = METHODS["mmpareto"]
    one = DatasetSpec("solo", {"audio": SPEC.modalities["audio"]}, num_classes=3)
    reason = cls.unsupported(one)
    assert "no multimodal loss" in reason and "'solo'" in reason
    with pytest.raises(ValueError, match="method.name=mmpareto: .*no multimodal loss"):
        build(one)
    assert cls.unsupported(SPEC) == cls.unsupported(SPEC3) == cls.unsupported(ML_SPEC) == ""
