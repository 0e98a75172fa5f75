"""DynMM beside an independent port of its reference training step, at both levels.

Reference: https://github.com/zihuixue/DynMM at commit cbab632cd943195fd7ddaffb43d2d0a5388a9068.
- Modality level: `ModalityDynMM/multimedia/imdb_dyn.py` (`DiffSoftmax`; `DynMMNet.forward`: the
  gate on the concatenated inputs, z = w_0 z_text + w_1 z_late, resource term `weight[:, 1].mean()`;
  the argparse defaults: no `--hard`, no `--freeze`, `--reg` 0.1, AdamW lr 1e-4 wd 1e-2) and
  `ModalityDynMM/training_structures/Supervised_Learning.py` (`train`: AdamW over the parameters that
  require grad, loss1 + lossw · loss2, `clip_grad_norm_(model.parameters(), 8)`, step).
- Fusion level: `FusionDynMM/src/models/model_skip_mod_globalgate.py` (`DiffSoftmax`;
  `SkipGateESANet.forward`: block j fuses with w · rgb + (1 − w) · (rgb + depth), w = Σ_{k<j} w_k,
  the last block with w_last; `ini_stage`'s random one-hot; the flop term
  mean(weight.mean(0) · depth_enc_flop)), `FusionDynMM/train.py` (`train_main`'s per-epoch
  `ini_stage`, `hard_gate`, `temp`; `train_one_epoch`'s max(0, flop − budget) added when the ratio
  is > 0; `get_optimizer`'s Nesterov SGD) and `FusionDynMM/src/utils.py` (`ExpDecayTemp`).

The port is written from that code; it runs on copies of the networks mmray builds (the same
initial weights), since mmray trains its own encoders (MLPs, SmallCNN stages) and gate, not
MultiBench's or ESANet's. What is compared is everything around them: the gate's weights, the
mixture, the resource term, the schedule, the loss and the step. Both sides run in float64 from the
same weights on the same batches for at least 3 optimizer steps; parameters and logged losses must
agree to 1e-5. The reference draws no Gumbel noise and mmray's presets draw none either.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

from helpers import checked_method_config

MODEL = ModelConfig(width=4, feature_dim=8)
TOL = dict(rtol=1e-5, atol=1e-5)
# MM-IMDB's shape: text then image feature vectors, multi-label genres.
IMDB = DatasetSpec("imdb_like", {"text": ModalitySpec("vector", (12,)),
                                 "image": ModalitySpec("vector", (20,))}, num_classes=5,
                   multilabel=True)
RGBD = DatasetSpec("rgbd", {"rgb": ModalitySpec("image", (3, 12, 12)),
                            "depth": ModalitySpec("image", (1, 12, 12))}, num_classes=3)


def build(name: str, spec: DatasetSpec, **options):
    cfg = checked_method_config(name, preset="reference", options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg).double()


def batch_of(spec: DatasetSpec, seed: int, b: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(b, *s.shape, generator=g, dtype=torch.float64)
              for m, s in spec.modalities.items()}
    label = (torch.randint(0, 2, (b, spec.num_classes), generator=g).double() if spec.multilabel
             else torch.randint(0, spec.num_classes, (b,), generator=g))
    return {"inputs": inputs, "present": {m: torch.ones(b, dtype=torch.bool) for m in inputs},
            "label": label, "id": [str(i) for i in range(b)]}


# ---------------------------------------------------------------------------------------------
# The port (reference: the files and commit named in the module docstring)
# ---------------------------------------------------------------------------------------------


def diff_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1):
    """The reference's DiffSoftmax: softmax(logits / tau), straight-through one-hot when hard."""
    soft = (logits / tau).softmax(dim)
    if not hard:
        return soft
    chosen = soft.max(dim, keepdim=True)[1]
    one_hot = torch.zeros_like(logits).scatter_(dim, chosen, 1.0)
    return one_hot - soft.detach() + soft


class ModalityNet(nn.Module):
    """DynMMNet: branch 1 = text encoder and head, branch 2 = late fusion (an encoder per modality,
    concatenation, a linear head), the gate on the concatenated raw inputs."""

    def __init__(self, method, freeze: bool, temp: float, hard_gate: bool):
        super().__init__()
        text, late = method.experts["text"], method.experts["late_fusion"]
        self.text_encoder = copy.deepcopy(text.encoders["text"])
        self.text_head = copy.deepcopy(text.head.fc)
        self.late_encoders = nn.ModuleList(copy.deepcopy(late.encoders[m]) for m in ("text", "image"))
        self.late_head = copy.deepcopy(late.head.fc)
        self.gate = copy.deepcopy(method.gate)
        if freeze:  # freeze_branch on every expert module
            for module in (self.text_encoder, self.text_head, self.late_encoders, self.late_head):
                for p in module.parameters():
                    p.requires_grad = False
        self.temp = temp
        self.hard_gate = hard_gate

    def forward(self, inputs: list[torch.Tensor]):
        weight = diff_softmax(self.gate(torch.cat(inputs, dim=1)), tau=self.temp, hard=self.hard_gate)
        text = self.text_head(self.text_encoder(inputs[0]))
        late = self.late_head(torch.cat([enc(x) for enc, x in zip(self.late_encoders, inputs)], dim=1))
        output = weight[:, 0:1] * text + weight[:, 1:2] * late
        return output, weight[:, 1].mean()

    def pairs(self, method) -> list[tuple[nn.Module, nn.Module]]:
        """(port module, the mmray module it was copied from)."""
        text, late = method.experts["text"], method.experts["late_fusion"]
        return [(self.text_encoder, text.encoders["text"]), (self.text_head, text.head.fc),
                (self.late_encoders[0], late.encoders["text"]), (self.late_encoders[1], late.encoders["image"]),
                (self.late_head, late.head.fc), (self.gate, method.gate)]


def modality_train_step(net: ModalityNet, op, inputs, label, lossw: float, clip_val: float):
    """Supervised_Learning.train's inner loop for one batch (additional_loss=True)."""
    op.zero_grad()
    out, loss2 = net(inputs)
    loss1 = F.binary_cross_entropy_with_logits(out, label.float())
    loss = loss1 + lossw * loss2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip_val)
    op.step()
    return {"loss": loss, "loss/task": loss1, "loss/resource": loss2}


def stage_gflops(stages: nn.ModuleList, shape: tuple[int, ...]) -> torch.Tensor:
    """depth_enc_flop: GFLOPs of the depth stages each choice runs (the reference types them in)."""
    costs, x = [0.0], torch.zeros(1, *shape, dtype=torch.float64)
    stages.eval()
    with torch.no_grad():
        for stage in stages:
            with FlopCounterMode(display=False) as counter:
                x = stage(x)
            costs.append(costs[-1] + counter.get_total_flops() / 1e9)
    stages.train()
    return torch.tensor(costs, dtype=torch.float64)


class FusionNet(nn.Module):
    """SkipGateESANet on mmray's stages: the RGB stages read the fused map, the depth stages their
    own; a classification head replaces ESANet's context module and decoder."""

    def __init__(self, method):
        super().__init__()
        rgb, depth = method.encoders["rgb"], method.encoders["depth"]
        self.rgb_stages = copy.deepcopy(nn.ModuleList(rgb.body[j] for j in range(3)))
        self.depth_stages = copy.deepcopy(nn.ModuleList(depth.body[j] for j in range(3)))
        self.rgb_tail = copy.deepcopy(rgb.body[3:])
        self.rgb_proj = copy.deepcopy(rgb.proj)
        self.head = copy.deepcopy(method.head)
        self.gate_layer = copy.deepcopy(method.gate)
        self.depth_enc_flop = stage_gflops(self.depth_stages, RGBD.modalities["depth"].shape)
        self.temp, self.hard_gate, self.ini_stage = 1.0, False, False

    def gate_input(self, rgb, depth):
        return torch.cat([F.adaptive_avg_pool2d(rgb, 4).flatten(1),
                          F.adaptive_avg_pool2d(depth, 4).flatten(1)], dim=1)

    def forward(self, rgb, depth):
        bs, branches = rgb.shape[0], len(self.rgb_stages) + 1
        if self.ini_stage:
            weight = torch.zeros(bs, branches, dtype=rgb.dtype)
            weight[range(bs), torch.randint(0, branches, (bs,))] = 1
        else:
            weight = diff_softmax(self.gate_layer(self.gate_input(rgb, depth)), self.temp, self.hard_gate)
        fuse = rgb
        for j, (stage_rgb, stage_depth) in enumerate(zip(self.rgb_stages, self.depth_stages)):
            branch0 = stage_rgb(fuse)
            depth = stage_depth(depth)
            branch1 = branch0 + depth
            if j < len(self.rgb_stages) - 1:  # blocks 1..S-1: the weight of not fusing yet
                w = weight[:, :j + 1].sum(1).view(-1, 1, 1, 1)
                fuse = w * branch0 + (1 - w) * branch1
            else:  # the last block: the weight of fusing everything
                w = weight[:, -1].view(-1, 1, 1, 1)
                fuse = (1 - w) * branch0 + w * branch1
        out = self.head(self.rgb_proj(self.rgb_tail(fuse)))
        return out, (weight.mean(dim=0) * self.depth_enc_flop).mean()

    def pairs(self, method) -> list[tuple[nn.Module, nn.Module]]:
        rgb, depth = method.encoders["rgb"], method.encoders["depth"]
        return ([(self.rgb_stages[j], rgb.body[j]) for j in range(3)]
                + [(self.depth_stages[j], depth.body[j]) for j in range(3)]
                + [(self.rgb_proj, rgb.proj), (self.head, method.head), (self.gate_layer, method.gate)])


class ExpDecayTemp:
    def __init__(self, start_t: float, end_t: float, time_len: int):
        self.start_t = start_t
        self.b = 1 if time_len == 0 else math.exp(1 / time_len * math.log(end_t / start_t))

    def get_t(self, epoch: int) -> float:
        return self.start_t * self.b ** epoch


def fusion_train_step(net: FusionNet, optimizer, rgb, depth, label, loss_flop_ratio, flop_budget):
    """train_one_epoch for one batch (cross-entropy in place of the segmentation loss)."""
    optimizer.zero_grad()
    pred, loss_flop = net(rgb, depth)
    task = F.cross_entropy(pred, label)
    if loss_flop_ratio > 0:
        l2 = max(torch.zeros_like(loss_flop), loss_flop - flop_budget)
        total = task + loss_flop_ratio * l2
    else:
        l2, total = torch.zeros_like(loss_flop), task
    total.backward()
    optimizer.step()
    return {"loss": total, "loss/task": task, "loss/resource": l2}


# ---------------------------------------------------------------------------------------------
# Side by side
# ---------------------------------------------------------------------------------------------


def assert_same(net, method, port_logs: dict, logs: dict, where: str) -> None:
    for key, value in port_logs.items():
        torch.testing.assert_close(logs[key].double(), value.detach().double(), **TOL,
                                   msg=lambda m, key=key: f"{where}, {key}: {m}")
    for mine, theirs in net.pairs(method):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(b, a, **TOL, msg=lambda m, name=name: f"{where}, {name}: {m}")


def adamw(params):  # imdb_dyn.py: optimtype=AdamW, --lr 1e-4, --wd 1e-2
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)


def sgd(params):  # a large plain step, so that every gradient's size shows in the weights
    return torch.optim.SGD(params, lr=0.5)


MODALITY_CASES = {
    # The preset as it is, with the script's own optimizer.
    "reference": ({}, adamw),
    # Straight-through hard gate, clipping that bites, τ ≠ 1, a large λ; SGD shows magnitudes.
    "hard-clipped": ({"hard_gate": True, "clip_grad_norm": 0.05, "temperature": 0.5,
                      "resource_weight": 2.0}, sgd),
    # --freeze: only the gate trains.
    "frozen": ({"freeze_experts": True, "resource_weight": 1.0}, sgd),
}


@pytest.mark.parametrize("case", MODALITY_CASES)
def test_modality_level_matches_the_reference_step_by_step(case):
    options, optimizer = MODALITY_CASES[case]
    method = build("dynmm", IMDB, experts=["text", "late_fusion"], pretrain_epochs=1, **options)
    o = method.options
    net = ModalityNet(method, freeze=o.freeze_experts, temp=o.temperature, hard_gate=o.hard_gate)
    method.on_epoch_start(1)  # the gate stage: the reference starts from pretrained experts
    method.train()
    net.train()
    opt_m = optimizer([p for p in method.parameters() if p.requires_grad])
    opt_p = optimizer([p for p in net.parameters() if p.requires_grad])
    ctx = StepContext(device=torch.device("cpu"), epoch=1)
    gate_before = [p.detach().clone() for p in method.gate.parameters()]
    for step in range(4):
        batch = batch_of(IMDB, seed=step)
        logs = method.train_step(batch, opt_m, ctx)
        port = modality_train_step(net, opt_p, [batch["inputs"]["text"], batch["inputs"]["image"]],
                                   batch["label"], lossw=o.resource_weight, clip_val=o.clip_grad_norm)
        assert_same(net, method, port, logs, f"{case}, step {step}")
    assert not any(torch.equal(a, b) for a, b in zip(gate_before, method.gate.parameters()))


FUSION_CASES = {
    # The preset as it is (soft gate all along, τ decaying, λ = 1e-4 on GFLOPs), SGD as train.py.
    "reference": ({}, (0, 1, 2)),
    # Hard gating from epoch 2 and τ decaying past τ_end; λ and a budget that make the term count.
    "hard": ({"epochs_hard": 2, "resource_weight": 5e3, "flops_budget": 2e-7}, (0, 1, 2, 3)),
    # ini_stage: a random choice per sample for the first epoch (no resource term, λ = 0).
    "random-paths": ({"init_epochs": 1, "epochs_hard": 2, "resource_weight": 0.0}, (0, 0, 1, 2)),
}


def nesterov(params):  # train.py's get_optimizer (--optimizer SGD, --lr 0.01, --wd 1e-4)
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)


@pytest.mark.parametrize("case", FUSION_CASES)
def test_fusion_level_matches_the_reference_step_by_step(case):
    options, epochs = FUSION_CASES[case]
    method = build("dynmm_fusion", RGBD, **options)
    o = method.options
    net = FusionNet(method)
    torch.testing.assert_close(method.secondary_flops.double() * 1e-9, net.depth_enc_flop)
    schedule = ExpDecayTemp(o.temperature, o.end_temperature, o.epochs_hard)
    opt_m, opt_p = nesterov(method.parameters()), nesterov(net.parameters())
    method.train()
    net.train()
    binding = []
    for step, epoch in enumerate(epochs):
        net.ini_stage = epoch < o.init_epochs
        net.hard_gate = epoch >= o.epochs_hard
        net.temp = schedule.get_t(epoch)
        batch = batch_of(RGBD, seed=step)
        torch.manual_seed(step)  # the random paths of ini_stage: the same draw on both sides
        logs = method.train_step(batch, opt_m, StepContext(device=torch.device("cpu"), epoch=epoch))
        assert logs["dynmm/temperature"] == pytest.approx(net.temp, rel=1e-12)
        torch.manual_seed(step)
        port = fusion_train_step(net, opt_p, batch["inputs"]["rgb"], batch["inputs"]["depth"],
                                 batch["label"], o.resource_weight, o.flops_budget)
        if net.ini_stage:  # the reference also adds λ · the flop term of the random weights: λ = 0 here
            assert o.resource_weight == 0
        assert_same(net, method, port, logs, f"{case}, step {step} (epoch {epoch})")
        binding.append(float(logs["loss/resource"]) > 0)
    if case == "hard":  # the budget binds in soft and hard steps: the term shaped them
        assert binding == [True, True, False, True]
