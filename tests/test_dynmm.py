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
from mmray.methods.dynmm import flops_saving, resource_loss
from mmray.methods.dynmm_fusion import STAGES, stage_fusion_weights, temperature_at
from mmray.modules.gating import expected_flops, gate_weights
from mmray.train.experiment import load_experiment

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


def dynmm(spec=VEC, **options):
    torch.manual_seed(0)
    return build_method(spec, MODEL, MethodConfig("dynmm", "concat", options))


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


@pytest.mark.parametrize("gumbel", [False, True])
def test_hard_weights_are_one_hot_and_pass_gradients_straight_through(gumbel):
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    w = gate_weights(logits, 0.5, hard=True, gumbel=gumbel)
    assert torch.allclose(w, torch.nn.functional.one_hot(w.argmax(1), 3).float(), atol=1e-6)
    if not gumbel:
        assert torch.equal(w.argmax(1), logits.argmax(1))
    (w * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    # The gradient is the soft softmax's: non-zero although the forward value is a constant one-hot.
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_resource_loss_expected_flops_and_saving_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    costs = torch.tensor([2.0, 8.0])
    # mean_b Σ_e w_e C_e / C_max = mean(2/8, 0.25·2/8 + 0.75) = mean(0.25, 0.8125)
    torch.testing.assert_close(resource_loss(w, costs), torch.tensor(0.53125))
    e = expected_flops(w, costs)  # 0.625·2 + 0.375·8
    torch.testing.assert_close(e, torch.tensor(4.25))
    torch.testing.assert_close(flops_saving(e, costs), torch.tensor(1 - 4.25 / 8))


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
    method = build_method(spec, MODEL, MethodConfig("dynmm", "concat", {
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


@pytest.fixture
def one_thread():
    # Hundreds of tiny steps: with the cores busy, torch's thread pool spin-waits and the same
    # loop ran 30x slower here than on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_stage_fusion_weights_are_tail_sums():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(stage_fusion_weights(w),
                               torch.tensor([[0.9, 0.7, 0.4], [1.0, 1.0, 0.0]]))


def fusion(**options):
    torch.manual_seed(0)
    return build_method(RGBD, MODEL, MethodConfig("dynmm_fusion", "concat", options))


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


def test_fusion_needs_maps_and_the_small_encoders():
    with pytest.raises(ValueError, match=r"\['text', 'image'\].*method.name=dynmm"):
        build_method(VEC, MODEL, MethodConfig("dynmm_fusion"))
    with pytest.raises(ValueError, match="primary: 'x'"):
        fusion(primary="x")
    with pytest.raises(ConfigError, match="init_epochs"):
        load_experiment(None, ["method.name=dynmm_fusion",
                           "method.options={init_epochs: 3, epochs_hard: 1}"])
