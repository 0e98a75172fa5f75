"""DynMM (METHODS.md §5): gating, measured costs, routed inference, stages, resource loss, schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mmray.config import ConfigError
from mmray.cost import flops_per_sample
from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.methods.dynmm import costliest_fraction, flops_saving, resource_loss
from mmray.methods.dynmm_fusion import STAGES, stage_fusion_weights, temperature_at
from mmray.modules.gating import expected_flops, gate_weights
from mmray.train.experiment import load_experiment

from helpers import checked_method_config

MODEL = ModelConfig(width=4, feature_dim=8)
VEC = DatasetSpec("vec", {"text": ModalitySpec("vector", (16,)), "image": ModalitySpec("vector", (32,))},
                  num_classes=3)
ML_VEC = DatasetSpec("mlvec", VEC.modalities, num_classes=4, multilabel=True)
RGBD = DatasetSpec("rgbd", {"rgb": ModalitySpec("image", (3, 12, 12)),
                            "depth": ModalitySpec("image", (1, 12, 12))}, num_classes=3)


def batch_of(spec: DatasetSpec, b: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(b, *s.shape, generator=g) for m, s in spec.modalities.items()}
    label = (torch.randint(0, 2, (b, spec.num_classes), generator=g).float() if spec.multilabel
             else torch.randint(0, spec.num_classes, (b,), generator=g))
    return {"inputs": inputs, "present": {m: torch.ones(b, dtype=torch.bool) for m in inputs},
            "label": label, "id": [str(i) for i in range(b)]}


def built(name: str, spec: DatasetSpec, preset: str = "", **options):
    cfg = checked_method_config(name, "concat", preset=preset, options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg)


def dynmm(spec=VEC, preset: str = "", **options):
    return built("dynmm", spec, preset, **options)


def ctx(epoch: int) -> StepContext:
    return StepContext(device=torch.device("cpu"), epoch=epoch)


# -- gate ---------------------------------------------------------------------------------------


def test_soft_weights_sum_to_one():
    logits = torch.randn(6, 3)
    for tau in (0.1, 1.0, 5.0):
        w = gate_weights(logits, tau)
        torch.testing.assert_close(w.sum(1), torch.ones(6))
        torch.testing.assert_close(w, torch.softmax(logits / tau, 1))
    torch.testing.assert_close(gate_weights(logits, gumbel=True).sum(1), torch.ones(6))


# d/dg of Σ_e c_e w_e for straight-through weights w: by hand, s = softmax(g / τ) and
# ∂/∂g_j = s_j (c_j − Σ_e s_e c_e) / τ. With g = (ln 3, 0) and c = (1, 3):
#   τ = 1:   s = (3/4, 1/4),            Σ s c = 3/2  → (−3/8, 3/8)
#   τ = 1/2: s = (9/10, 1/10),          Σ s c = 6/5  → 2 · (−0.18, 0.18) = (−0.36, 0.36)
#   τ = 2:   s = (√3, 1) / (1 + √3),    Σ s c = √3   → ½ · √3 (1 − √3) / (1 + √3) · (1, −1)
ROOT3 = math.sqrt(3)
ST_BY_HAND = [(1.0, 0.375), (0.5, 0.36), (2.0, 0.5 * ROOT3 * (ROOT3 - 1) / (1 + ROOT3))]


@pytest.mark.parametrize("tau, grad", ST_BY_HAND, ids=[f"tau={t}" for t, _ in ST_BY_HAND])
def test_straight_through_weights_are_one_hot_with_the_soft_gradient_at_tau_by_hand(tau, grad):
    logits = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    w = gate_weights(logits, tau, hard=True)
    assert w.tolist() == [[1.0, 0.0]]  # exactly the one-hot choice in value
    (w * torch.tensor([1.0, 3.0])).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-grad, grad]]))
    soft = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    (gate_weights(soft, tau) * torch.tensor([1.0, 3.0])).sum().backward()
    torch.testing.assert_close(soft.grad, logits.grad)  # the soft gate's gradient, unchanged


def test_straight_through_gradient_over_three_choices_by_hand():
    # g = 0: s = 1/3 each, Σ s c = 3, τ = 1/2 → (2/3)(c − 3) = (−4/3, −2/3, 2).
    logits = torch.zeros(1, 3, requires_grad=True)
    w = gate_weights(logits, 0.5, hard=True)
    assert w.tolist() == [[1.0, 0.0, 0.0]]  # ties go to the first choice
    (w * torch.tensor([1.0, 2.0, 6.0])).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-4 / 3, -2 / 3, 2.0]]))


def test_gumbel_noise_enters_before_the_temperature():
    logits = torch.tensor([[0.3, -0.2, 0.1]] * 4, requires_grad=True)
    torch.manual_seed(7)
    w = gate_weights(logits, 0.5, hard=True, gumbel=True)
    (w * torch.tensor([1.0, 2.0, 6.0])).sum().backward()
    torch.manual_seed(7)  # the same draw, by hand: g + Gumbel(0, 1) = g − log(Exp(1))
    noisy = logits.detach() - torch.empty(4, 3).exponential_().log()
    s = torch.softmax(noisy / 0.5, 1)
    c = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(w.detach(), torch.nn.functional.one_hot(s.argmax(1), 3).float())
    torch.testing.assert_close(logits.grad, s * (c - (s * c).sum(1, keepdim=True)) / 0.5)


def test_resource_loss_expected_flops_and_saving_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    costs = torch.tensor([2.0, 8.0])
    # mean_b Σ_e w_e C_e / C_max = mean(2/8, 0.25·2/8 + 0.75) = mean(0.25, 0.8125)
    torch.testing.assert_close(resource_loss(w, costs), torch.tensor(0.53125))
    e = expected_flops(w, costs)  # 0.625·2 + 0.375·8
    torch.testing.assert_close(e, torch.tensor(4.25))
    torch.testing.assert_close(flops_saving(e, costs), torch.tensor(1 - 4.25 / 8))
    # The reference's term: the mean weight on the costliest expert, mean(0, 0.75).
    torch.testing.assert_close(costliest_fraction(w, costs), torch.tensor(0.375))
    torch.testing.assert_close(costliest_fraction(w, costs.flip(0)), torch.tensor(0.625))


# -- modality level -------------------------------------------------------------------------------


def test_expert_costs_are_measured_and_match_a_hand_count():
    method = dynmm()
    assert list(method.experts) == ["text", "late_fusion"]  # default: first modality, late fusion
    c = 3
    text = 2 * (16 * 16 + 16 * 8) + 2 * 8 * c * 2  # VectorMLP(16, 16, 8); head + its per-modality block
    late = (2 * (16 * 16 + 16 * 8) + 2 * (32 * 16 + 16 * 8)  # both encoders
            + 2 * 16 * c + 2 * (8 * c + 8 * c))  # concat head and the two per-modality blocks
    assert method.expert_flops.tolist() == [text, late]
    batch = batch_of(VEC)
    for i, e in enumerate(method.experts.values()):
        assert flops_per_sample(e, batch) == method.expert_flops[i]
    assert method.epoch_metrics()["dynmm/cost_late_fusion"] == late
    assert method.epoch_metrics()["dynmm/cost_gate"] == 2 * ((16 + 32) * 128 + 128 * 2)


def route_with(method, logits: torch.Tensor) -> None:
    method.gate_logits = lambda batch: logits  # a fixed gate, to choose the routing


def test_inference_runs_only_the_selected_expert():
    method = dynmm().eval()
    batch = batch_of(VEC, b=6)
    route_with(method, torch.tensor([[5.0, 0.0]] * 6))
    method.predict(batch)
    assert method.experts["text"].calls == 1 and method.experts["late_fusion"].calls == 0
    route_with(method, torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 3))
    out = method.predict(batch)
    assert method.experts["text"].samples == 6 + 3 and method.experts["late_fusion"].samples == 3
    assert method.experts["late_fusion"].calls == 1  # samples are grouped, one call per expert
    with torch.no_grad():
        text_z, _ = method.experts["text"](batch)
        late_z, _ = method.experts["late_fusion"](batch)
    torch.testing.assert_close(out.logits[0::2], text_z[0::2])
    torch.testing.assert_close(out.logits[1::2], late_z[1::2])
    torch.testing.assert_close(sum(out.per_modality.values()), out.logits)
    assert torch.all(out.per_modality["image"][0::2] == 0)  # the text expert never read the image
    summary = method.routing_summary()
    assert summary["dynmm/route_text"] == pytest.approx(9 / 12)
    costs = method.expert_flops
    flops = (9 * costs[0] + 3 * costs[1]) / 12
    assert summary["dynmm/flops"] == pytest.approx(float(flops))
    assert summary["dynmm/flops_saving"] == pytest.approx(float(1 - flops / costs.max()))


def test_mixture_per_modality_logits_sum_to_the_fused_logits():
    method = dynmm()
    out = method(batch_of(VEC))
    torch.testing.assert_close(sum(out.per_modality.values()), out.logits)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module) -> list[bool]:
    return [not torch.equal(a, p) for a, p in zip(before, module.parameters())]


def test_experts_pretrain_then_freeze_while_the_gate_trains():
    method = dynmm(pretrain_epochs=1)
    opt = torch.optim.Adam(method.parameters(), lr=0.01)
    batch = batch_of(VEC)
    experts, gate = params(method.experts), params(method.gate)
    method.train()
    method.on_epoch_start(0)
    logs = method.train_step(batch, opt, ctx(0))
    assert {"loss/text", "loss/late_fusion"} <= set(logs)
    assert all(changed(experts, method.experts)) and not any(changed(gate, method.gate))

    method.on_epoch_start(1)
    method.train()  # the loop calls train() every epoch: frozen experts must stay in eval mode
    assert not method.experts.training and method.gate.training
    experts, gate = params(method.experts), params(method.gate)
    logs = method.train_step(batch, opt, ctx(1))
    assert not any(changed(experts, method.experts)) and any(changed(gate, method.gate))
    assert all(not p.requires_grad for p in method.experts.parameters())
    costs = method.expert_flops
    assert float(logs["dynmm/flops_saving"]) == pytest.approx(float(1 - logs["dynmm/flops"] / costs.max()))
    routed = torch.tensor([float(logs["dynmm/route_text"]), float(logs["dynmm/route_late_fusion"])])
    assert float(logs["dynmm/flops"]) == pytest.approx(float((routed * costs).sum()), rel=1e-5)


def test_unfrozen_experts_keep_training_with_the_gate():
    method = dynmm(pretrain_epochs=0, freeze_experts=False)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    experts = params(method.experts)
    method.train_step(batch_of(VEC), opt, ctx(0))
    assert any(changed(experts, method.experts))


def gate_logits_grad(method, batch: dict, epoch: int, resource_weight: float):
    """The gate's logits in one train step and ∂loss/∂logits, at λ = resource_weight. The step
    moves nothing (lr 0), so steps at two λ see the same logits and task gradient."""
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["logits"] = out

    handle = method.gate.register_forward_hook(keep)
    method.options.resource_weight = resource_weight
    try:
        method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.0), ctx(epoch))
    finally:
        handle.remove()
    return seen["logits"].detach(), seen["logits"].grad


def resource_grad_by_hand(logits: torch.Tensor, tau: float, c: torch.Tensor) -> torch.Tensor:
    """∂/∂g of mean_b Σ_e w_e c_e for (straight-through or soft) w: s_e (c_e − Σ_j s_j c_j) / (τ B)."""
    s = torch.softmax(logits / tau, 1)
    return s * (c - (s * c).sum(1, keepdim=True)) / (tau * logits.shape[0])


def assert_resource_grad(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-4 of the expected gradient's scale, which must be well above float noise."""
    scale = float(expected.abs().max())
    assert scale > 1e-3, scale
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("preset, options", [
    ("", {"temperature": 0.5}),  # hard gate, Σ_e w_e C_e / C_max
    ("reference", {"temperature": 0.5}),  # soft gate, mean weight on late fusion
    ("reference", {"temperature": 0.5, "hard_gate": True, "freeze_experts": True}),
])
def test_the_resource_term_reaches_the_gate_with_its_value(preset, options):
    method = dynmm(preset=preset, pretrain_epochs=0, clip_grad_norm=0.0, **options)
    method.train()
    batch = batch_of(VEC)
    logits, with_term = gate_logits_grad(method, batch, 0, resource_weight=0.7)
    _, without = gate_logits_grad(method, batch, 0, resource_weight=0.0)
    costs = method.expert_flops
    c = (torch.tensor([0.0, 1.0]) if method.options.resource_costliest_fraction
         else costs / costs.max())
    assert_resource_grad(with_term - without, 0.7 * resource_grad_by_hand(logits, 0.5, c))


def test_clip_grad_norm_scales_the_whole_step():
    deltas = []
    for clip in (0.0, 0.01):
        method = dynmm(pretrain_epochs=0, freeze_experts=False, clip_grad_norm=clip)
        before = params(method)
        method.train_step(batch_of(VEC), torch.optim.SGD(method.parameters(), lr=1.0), ctx(0))
        deltas.append(torch.cat([(p.detach() - b).flatten() for b, p in zip(before, method.parameters())]))
    full = deltas[0].norm()
    assert full > 0.1  # the clip bites
    # clip_grad_norm_ multiplies every gradient by max_norm / (total norm + 1e-6).
    torch.testing.assert_close(deltas[1], deltas[0] * 0.01 / (full + 1e-6))


def routing_task(n: int, seed: int) -> dict:
    """Text carries the class for half the samples; the image carries it for all of them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float().unsqueeze(1)
    text_ok = (torch.rand(n, generator=g) < 0.5).float().unsqueeze(1)
    text = 0.5 * torch.randn(n, 16, generator=g) + 2.0 * sign * text_ok
    image = 0.5 * torch.randn(n, 32, generator=g) + 2.0 * sign
    return {"inputs": {"text": text, "image": image},
            "present": {m: torch.ones(n, dtype=torch.bool) for m in ("text", "image")},
            "label": y, "id": [str(i) for i in range(n)]}


def fraction_to_late_fusion(resource_weight: float) -> float:
    spec = DatasetSpec("route", VEC.modalities, num_classes=2)
    torch.manual_seed(0)
    method = build_method(spec, MODEL, MethodConfig("dynmm", "concat", options={
        "pretrain_epochs": 1, "resource_weight": resource_weight, "gate_hidden": 16}))
    opt = torch.optim.Adam(method.parameters(), lr=0.01)
    method.train()
    for epoch, steps in ((0, 60), (1, 120)):
        method.on_epoch_start(epoch)
        method.train()
        for step in range(steps):
            method.train_step(routing_task(64, seed=step), opt, ctx(epoch))
    method.eval()
    with torch.no_grad():
        method.predict(routing_task(512, seed=10_000))
    return method.routing_summary()["dynmm/route_late_fusion"]



def test_the_resource_loss_moves_routing_to_the_cheap_expert(one_thread):
    # λ = 0 sends everything to late fusion (it is never worse); a large λ sends everything to
    # text. The straight-through gradient weighs λ against ⟨∂task/∂z, z^e⟩, which grows with the
    # experts' logit scale, hence the large λ needed here.
    fractions = [fraction_to_late_fusion(lam) for lam in (0.0, 1.0, 30.0)]
    assert fractions[0] > 0.9 and fractions[2] < 0.1, fractions
    assert fractions[0] > fractions[1] > fractions[2], fractions


def test_multilabel_uses_bce_and_trains():
    method = dynmm(ML_VEC, pretrain_epochs=0)
    batch = batch_of(ML_VEC)
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.1), ctx(0))
    with torch.no_grad():
        out = method.mixture(batch, method.route(batch))
    task = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch["label"])
    torch.testing.assert_close(logs["loss/task"], task)


def test_errors_name_the_problem():
    three = DatasetSpec("three", {**VEC.modalities, "audio": ModalitySpec("vector", (4,))}, 3)
    with pytest.raises(ValueError, match=r"exactly 2 modalities.*'three'"):
        dynmm(three)
    with pytest.raises(ValueError, match=r"\['audio'\] is not 'late_fusion' or a modality"):
        dynmm(experts=["audio", "late_fusion"])
    with pytest.raises(ConfigError, match="method.options.experts"):
        load_experiment(None, ["method.name=dynmm", "method.options={experts: [text]}"])
    assert list(dynmm(experts=["text", "image", "late_fusion"]).experts) == ["text", "image", "late_fusion"]


# -- fusion level --------------------------------------------------------------------------------


def test_temperature_schedule_by_hand():
    assert temperature_at(0, 1.0, 0.001, 10) == 1.0
    assert temperature_at(5, 1.0, 0.001, 10) == pytest.approx(math.sqrt(0.001))  # halfway, in logs
    assert temperature_at(10, 1.0, 0.001, 10) == pytest.approx(0.001)
    assert temperature_at(25, 1.0, 0.001, 10) == pytest.approx(0.001)  # held after E_hard
    assert temperature_at(3, 2.0, 0.02, 4) == pytest.approx(2.0 * 0.01 ** 0.75)
    assert temperature_at(7, 1.0, 0.001, 0) == 1.0  # E_hard = 0: no decay
    assert temperature_at(25, 1.0, 0.001, 10, hold=False) == pytest.approx(0.001 ** 2.5)
    assert temperature_at(5, 1.0, 0.001, 10, hold=False) == pytest.approx(math.sqrt(0.001))


def test_the_reference_schedule_is_soft_for_500_epochs_and_keeps_decaying():
    method = fusion("reference")
    method.on_epoch_start(250)
    assert method.temperature == pytest.approx(0.001 ** 0.5) and not method.hard
    method.on_epoch_start(500)
    assert method.temperature == pytest.approx(0.001) and method.hard
    method.on_epoch_start(600)
    assert method.temperature == pytest.approx(0.001 ** 1.2)


def test_stage_fusion_weights_are_tail_sums():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(stage_fusion_weights(w),
                               torch.tensor([[0.9, 0.7, 0.4], [1.0, 1.0, 0.0]]))


def fusion(preset: str = "", **options):
    return built("dynmm_fusion", RGBD, preset, **options)


def test_fusion_costs_grow_with_the_fused_stages_and_the_schedule_follows_epochs():
    method = fusion(epochs_hard=4)
    costs = method.choice_flops.tolist()
    assert costs == sorted(costs) and len(set(costs)) == STAGES + 1
    # Each extra choice adds exactly the secondary's next conv stage.
    stage1 = method.encoders["depth"].body[0][0]
    assert costs[1] - costs[0] == flops_per_sample(stage1, batch_of(RGBD)["inputs"]["depth"])
    method.on_epoch_start(2)
    assert method.temperature == pytest.approx(0.001 ** 0.5) and not method.hard
    method.on_epoch_start(4)
    assert method.hard


def test_fusion_inference_runs_only_the_chosen_secondary_stages():
    method = fusion().eval()
    calls = [0] * STAGES
    for j, stage in enumerate(method.stages("depth")):
        stage.register_forward_hook(lambda *_, j=j: calls.__setitem__(j, calls[j] + 1))
    batch = batch_of(RGBD, b=4)
    method.gate_logits = lambda b: torch.tensor([[9.0, 0, 0, 0]] * 4)
    method.predict(batch)
    assert calls == [0, 0, 0]
    assert method.eval_counts().tolist() == [4, 0, 0, 0]
    method.gate_logits = lambda b: torch.tensor([[0, 9.0, 0, 0], [0, 0, 0, 9.0]] * 2)
    out = method.predict(batch)
    assert calls == [2, 1, 1]  # k=1 runs stage 1; k=3 runs all three (each group once)
    routed = method.eval_metrics(method.eval_counts())  # this predict's routing only
    costs = method.choice_flops
    assert routed["dynmm/route_k1"] == routed["dynmm/route_k3"] == 0.5
    assert routed["dynmm/flops"] == pytest.approx(float((costs[1] + costs[3]) / 2))
    assert routed["dynmm/flops_saving"] == pytest.approx(float(1 - (costs[1] + costs[3]) / 2 / costs[3]))
    with torch.no_grad():
        full = method.forward_fixed(batch, STAGES).logits
        same = method.mixture(batch, torch.eye(STAGES + 1)[[STAGES] * 4]).logits
    torch.testing.assert_close(out.logits[1::2], full[1::2])
    torch.testing.assert_close(same, full)
    torch.testing.assert_close(sum(out.per_modality.values()), out.logits)


def test_fusion_resource_loss_is_the_excess_over_the_budget():
    method = fusion(resource_weight=1.0, flops_budget=0.5, epochs_hard=0)
    logs = method.train_step(batch_of(RGBD), torch.optim.SGD(method.parameters(), lr=0.01), ctx(0))
    costs = method.choice_flops
    excess = max(0.0, float(logs["dynmm/flops"] / costs.max()) - 0.5)
    assert float(logs["loss/resource"]) == pytest.approx(excess)
    torch.testing.assert_close(logs["loss"], logs["loss/task"] + logs["loss/resource"])
    assert float(logs["dynmm/flops_saving"]) == pytest.approx(float(1 - logs["dynmm/flops"] / costs.max()))


def test_secondary_costs_are_its_stages_by_hand():
    # A 3×3 conv without bias costs 2·9·C_in·C_out·H·W: depth 1→4 at 12², 4→8 at 6², 8→16 at 3².
    d1, d2, d3 = 2 * 9 * 1 * 4 * 144, 2 * 9 * 4 * 8 * 36, 2 * 9 * 8 * 16 * 9
    assert fusion().secondary_flops.tolist() == [0, d1, d1 + d2, d1 + d2 + d3]


FUSION_GRAD_CASES = {  # options, epoch, τ at that epoch, λ
    "hard": ({"epochs_hard": 0, "temperature": 0.5}, 0, 0.5, 0.7),
    "soft-halfway": ({"epochs_hard": 4}, 2, 0.001 ** 0.5, 0.7),
    # The term is in GFLOPs (~1e-5 here): a λ that makes its gradient count.
    "reference-gflops": ({"epochs_hard": 0, "temperature": 0.5, "resource_secondary_gflops": True},
                         0, 0.5, 7e4),
}


@pytest.mark.parametrize("case", FUSION_GRAD_CASES)
def test_fusion_resource_term_reaches_the_gate_with_its_value(case):
    options, epoch, tau, lam = FUSION_GRAD_CASES[case]
    method = fusion(**options)
    method.train()
    batch = batch_of(RGBD)
    logits, with_term = gate_logits_grad(method, batch, epoch, resource_weight=lam)
    _, without = gate_logits_grad(method, batch, epoch, resource_weight=0.0)
    if method.options.resource_secondary_gflops:  # mean over the S + 1 choices of mean_b(w_k)·D_k
        c = method.secondary_flops * 1e-9 / (STAGES + 1)
    else:
        c = method.choice_flops / method.choice_flops.max()
    assert_resource_grad(with_term - without, lam * resource_grad_by_hand(logits, tau, c))


def test_fusion_resource_term_is_flat_under_the_budget():
    method = fusion(epochs_hard=0, flops_budget=1.0)  # E[FLOPs] / C_S < 1 for every soft w
    method.train()
    batch = batch_of(RGBD)
    _, with_term = gate_logits_grad(method, batch, 0, resource_weight=5.0)
    _, without = gate_logits_grad(method, batch, 0, resource_weight=0.0)
    assert torch.equal(with_term, without)


def test_fusion_needs_maps_and_the_small_encoders():
    with pytest.raises(ValueError, match=r"\['text', 'image'\].*method.name=dynmm"):
        build_method(VEC, MODEL, MethodConfig("dynmm_fusion"))
    with pytest.raises(ValueError, match="primary: 'x'"):
        fusion(primary="x")
    with pytest.raises(ConfigError, match="init_epochs"):
        load_experiment(None, ["method.name=dynmm_fusion",
                           "method.options={init_epochs: 3, epochs_hard: 1}"])
    with pytest.raises(ConfigError, match=r"flops_budget: 2.0 is a fraction of C_S"):
        load_experiment(None, ["method.name=dynmm_fusion", "method.options.flops_budget=2.0"])
    load_experiment(None, ["method.name=dynmm_fusion", "method.preset=reference",
                           "method.options.flops_budget=2.0"])  # GFLOPs: any size


# -- pinned train steps ----------------------------------------------------------------------------


def pinned_run(method, spec: DatasetSpec, epoch: int, steps: int = 3) -> list[list[float]]:
    """[loss, loss/task, loss/resource] of `steps` Adam steps on fixed batches at `epoch`."""
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=0.01)
    method.train()
    method.on_epoch_start(epoch)
    out = []
    for step in range(steps):
        logs = method.train_step(batch_of(spec, seed=step), opt, ctx(epoch))
        out.append([float(logs[k]) for k in ("loss", "loss/task", "loss/resource")])
    return out


PINNED = {
    # The gate stage: experts frozen, straight-through hard gate, Σ_e w_e C_e / C_max.
    "dynmm": (lambda: dynmm(pretrain_epochs=0, resource_weight=0.5), VEC, 0,
        [[1.5075962543487549, 1.2379534244537354, 0.5392857193946838],
         [1.4163531064987183, 1.1851030588150024, 0.4625000059604645],
         [1.3129633665084839, 1.081713318824768, 0.4625000059604645]]),
    # imdb_dyn.py's defaults: soft gate, trainable experts, mean weight on late fusion, clip 8.
    "dynmm-reference": (lambda: dynmm(ML_VEC, "reference", pretrain_epochs=0, resource_weight=0.5),
        ML_VEC, 0,
        [[0.9298225045204163, 0.7413114905357361, 0.37702202796936035],
         [0.8142121434211731, 0.6880043148994446, 0.2524156868457794],
         [0.7812873721122742, 0.7079805135726929, 0.1466137319803238]]),
    # Hard gating from the start at τ₀ = 0.5, E[FLOPs] / C_S against a budget of 0.3.
    "fusion": (lambda: fusion(epochs_hard=0, temperature=0.5, flops_budget=0.3), RGBD, 0,
        [[1.2253549098968506, 1.1877326965332031, 0.3762221336364746],
         [1.1940544843673706, 1.1626518964767456, 0.3140261173248291],
         [1.0558972358703613, 1.0276044607162476, 0.2829280495643616]]),
    # train.py's schedule at epoch 10 of 500 (soft, τ = 0.001^(10/500)); λ on mean GFLOPs.
    "fusion-reference": (lambda: fusion("reference", resource_weight=1e4), RGBD, 10,
        [[1.2237377166748047, 1.1647427082061768, 5.899500138184521e-06],
         [1.1841087341308594, 1.128360390663147, 5.574835995503236e-06],
         [1.128475308418274, 1.0741891860961914, 5.428607892099535e-06]]),
}


@pytest.mark.parametrize("case", PINNED)
def test_train_step_losses_are_pinned(case):
    make, spec, epoch, expected = PINNED[case]
    got = pinned_run(make(), spec, epoch)
    assert sum(got, []) == pytest.approx(sum(expected, []), rel=1e-5, abs=0), got
