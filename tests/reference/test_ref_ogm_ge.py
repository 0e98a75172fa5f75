"""OGM-GE with `preset: reference`, step by step beside a port of the reference training step.

The port below is written from the reference code, not from mmray's functions:
- two modalities: GeWu-Lab/OGM-GE_CVPR2022, `main.py`, `train_epoch` (with `models/basic_model.py`
  `AVClassifier` and `models/fusion_modules.py` `ConcatFusion`), commit
  343dc1d95c9bda88f105c0da8d24f185e0e98b54;
- three modalities: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, `main.py`,
  `train_epoch`, the OGM/OGM-GE branch under `args.modal3` (with `models/basic_model.py`
  `Modal3Classifier` and `models/fusion_modules.py` `ConcatFusion3`), commit
  ab6c184579f9ff390e9c9b8216c9900c2a43545b.

It keeps the reference's computation: scores as Python sums over the batch, the if/else chain on
the ratios, the window test `starts <= epoch <= ends`, modulation of 4-D gradients of the
parameters whose module name holds the modality's name, and the noise
`zeros_like(g).normal_(0, g.std().item() + 1e-8)`. What is not OGM-GE is mmray's: the encoders
(deep copies of the method's toy CNNs stand in for the reference's ResNet18 / CAV-MAE / M3AE, as
`audio_net`, `visual_net`, or `mae_a`, `mae_v`, `mae_t`), and inputs arrive in the encoders'
layout (the reference's `spec.unsqueeze(1)` is the data loader's business). The models are wrapped
like the reference's `DataParallel` so parameter names start with `module.`, as its
`name.split('.')[1]` expects.

Both run from the same weights on the same batches with the reference's optimizer (SGD, momentum
0.9, weight decay 1e-4; lr 1e-2 so that a few steps move the weights measurably). The noise is
aligned by seeding the global generator before each step: both draw one normal tensor per
modulated parameter, in the same order (the dataset lists the modalities in the reference's
order, and the reference's fusion head, first in `named_parameters()`, is never modulated).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

from av_port import AVClassifier, ConcatFusion
from helpers import SPEC, SPEC3, checked_method_config

MODEL = ModelConfig(width=4, feature_dim=8)
# Three conv modalities, so that every one has 4-D gradients for the reference to modulate (the
# reference's third slot, `t`, is text; here it is a depth map).
SPEC3_CONV = DatasetSpec("toy3conv", {**SPEC.modalities, "depth": ModalitySpec("depth", (1, 8, 8))},
                         num_classes=3)
ALPHA = 0.8
ENDS = 1  # the window [0, 1]: epoch 1 is the reference's last modulated epoch
EPOCHS = [0, 0, 0, 0, 1, 1, 1, 2]  # one step per batch; epoch 2 is outside the window
LR = 1e-2


# -- the port ---------------------------------------------------------------------------------


class Modal3Classifier(nn.Module):
    """MLA's models/basic_model.py Modal3Classifier: fusion_module, mae_a, mae_v, mae_t."""

    def __init__(self, fusion_module, mae_a, mae_v, mae_t):
        super().__init__()
        self.fusion_module, self.mae_a, self.mae_v, self.mae_t = fusion_module, mae_a, mae_v, mae_t

    def forward(self, audio, visual, text):
        return self.mae_a(audio), self.mae_v(visual), self.mae_t(text)


class Wrapped(nn.Module):
    """Stands in for the reference's DataParallel: parameters are named `module.<...>`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def ge(grad: torch.Tensor, coeff) -> torch.Tensor:
    # parms.grad * coeff + torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
    return grad * coeff + torch.zeros_like(grad).normal_(0, grad.std().item() + 1e-8)


def number(coeff) -> float:
    return coeff.item() if torch.is_tensor(coeff) else float(coeff)


def reference_step_2(model, audio, visual, label, optimizer, epoch) -> dict:
    """OGM-GE_CVPR2022 main.py train_epoch, one batch (concat fusion, --modulation OGM_GE)."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    relu, tanh = nn.ReLU(inplace=True), nn.Tanh()
    optimizer.zero_grad()
    a, v, out = model(audio, visual)
    fc_out = model.module.fusion_module.fc_out
    weight_size = fc_out.weight.size(1)
    out_v = torch.mm(v, torch.transpose(fc_out.weight[:, weight_size // 2:], 0, 1)) + fc_out.bias / 2
    out_a = torch.mm(a, torch.transpose(fc_out.weight[:, :weight_size // 2], 0, 1)) + fc_out.bias / 2
    loss, loss_v, loss_a = criterion(out, label), criterion(out_v, label), criterion(out_a, label)
    loss.backward()

    score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
    score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v, coeff_a, branch = 1 - tanh(ALPHA * relu(ratio_v)), 1, "v"
    else:
        coeff_a, coeff_v, branch = 1 - tanh(ALPHA * relu(ratio_a)), 1, "a"

    modulated = 0 <= epoch <= ENDS
    if modulated:
        for name, parms in model.named_parameters():
            layer = str(name).split(".")[1]
            if "audio" in layer and len(parms.grad.size()) == 4:
                parms.grad = ge(parms.grad, coeff_a)
            if "visual" in layer and len(parms.grad.size()) == 4:
                parms.grad = ge(parms.grad, coeff_v)
    optimizer.step()
    return {"loss": loss.item(), "losses": [loss_a.item(), loss_v.item()],
            "ratios": [number(ratio_a), number(ratio_v)],
            "coeffs": [number(coeff_a), number(coeff_v)], "branch": branch, "modulated": modulated}


def reference_step_3(model, audio, visual, text, label, optimizer, epoch) -> dict:
    """MLA main.py train_epoch, one batch, the `args.modal3` OGM_GE branch (concat fusion)."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    relu, tanh = nn.ReLU(inplace=True), nn.Tanh()
    optimizer.zero_grad()
    a, v, t = model(audio, visual, text)
    _, _, _, out = model.module.fusion_module(a, v, t)
    fc_out = model.module.fusion_module.fc_out
    weight_size = fc_out.weight.size(1)
    out_t = (torch.mm(t, torch.transpose(fc_out.weight[:, 2 * weight_size // 3:], 0, 1))
             + fc_out.bias / 3)
    out_v = (torch.mm(v, torch.transpose(fc_out.weight[:, weight_size // 3:2 * weight_size // 3], 0, 1))
             + fc_out.bias / 3)
    out_a = torch.mm(a, torch.transpose(fc_out.weight[:, :weight_size // 3], 0, 1)) + fc_out.bias / 3
    loss = criterion(out, label)
    loss_t, loss_a, loss_v = criterion(out_t, label), criterion(out_a, label), criterion(out_v, label)
    loss.backward()

    score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
    score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
    score_t = sum([softmax(out_t)[i][label[i]] for i in range(out_t.size(0))])
    ratio_v = score_v / (score_a + score_t)
    ratio_a = score_a / (score_v + score_t)
    ratio_t = score_t / (score_v + score_a)
    if ratio_v > 1:
        coeff_v, coeff_a, coeff_t, branch = 1 - tanh(ALPHA * relu(ratio_v)), 1, 1, "v"
    elif ratio_t > 1:
        coeff_t, coeff_a, coeff_v, branch = 1 - tanh(ALPHA * relu(ratio_t)), 1, 1, "t"
    else:
        coeff_a, coeff_v, coeff_t, branch = 1 - tanh(ALPHA * relu(ratio_a)), 1, 1, "a"

    modulated = 0 <= epoch <= ENDS
    if modulated:
        for name, parms in model.named_parameters():
            if parms.grad is None:
                continue
            layer = str(name).split(".")[1]
            if "mae_a" in layer and len(parms.grad.size()) == 4:
                parms.grad = ge(parms.grad, coeff_a)
            if "mae_v" in layer and len(parms.grad.size()) == 4:
                parms.grad = ge(parms.grad, coeff_v)
            if "mae_t" in layer and len(parms.grad.size()) == 4:
                parms.grad = ge(parms.grad, coeff_t)
    optimizer.step()
    return {"loss": loss.item(), "losses": [loss_a.item(), loss_v.item(), loss_t.item()],
            "ratios": [number(ratio_a), number(ratio_v), number(ratio_t)],
            "coeffs": [number(coeff_a), number(coeff_v), number(coeff_t)], "branch": branch,
            "modulated": modulated}


# -- the two side by side ---------------------------------------------------------------------


def reference_method(spec: DatasetSpec):
    cfg = checked_method_config("ogm_ge", "concat", preset="reference",
                       options={"alpha": ALPHA, "modulation_starts": 0, "modulation_ends": ENDS})
    torch.manual_seed(0)
    method = build_method(spec, MODEL, cfg)
    with torch.no_grad():  # confident heads, so that each modality can dominate a batch
        method.head.fc.weight.mul_(20.0)
    return method


def port_of(method):
    enc = [copy.deepcopy(method.encoders[m]) for m in method.modalities]
    fusion = ConcatFusion(copy.deepcopy(method.head.fc))
    model = AVClassifier(fusion, *enc) if len(enc) == 2 else Modal3Classifier(fusion, *enc)
    return Wrapped(model), dict(zip(method.modalities, ["audio_net", "visual_net"] if len(enc) == 2
                                    else ["mae_a", "mae_v", "mae_t"], strict=True))


def batches(method, n: int) -> list[dict]:
    """n batches whose labels favour each modality in turn at the initial weights (the class it
    rates highest against the others), then none (random labels): the dominant modality changes
    from batch to batch, and some batches have none."""
    out = []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        inputs = {m: (torch.randint(0, s.vocab_size, (8, *s.shape), generator=g) if s.kind == "text"
                      else torch.randn(8, *s.shape, generator=g))
                  for m, s in method.spec.modalities.items()}
        b = {"inputs": inputs, "present": {m: torch.ones(8, dtype=torch.bool) for m in inputs},
             "label": torch.zeros(8, dtype=torch.long), "id": [f"s{j}" for j in range(8)]}
        with torch.no_grad():
            per_mod = copy.deepcopy(method)(b).per_modality  # a copy: BN statistics untouched
        targets = [*method.modalities, None]
        target = targets[i % len(targets)]
        b["label"] = (torch.randint(0, method.spec.num_classes, (8,), generator=g) if target is None
                      else (2 * per_mod[target] - sum(per_mod.values())).argmax(1))
        out.append(b)
    return out


def assert_same_weights(method, port, names):
    model = port.module
    for m, sub in names.items():
        ours, theirs = method.encoders[m].state_dict(), getattr(model, sub).state_dict()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-5, msg=f"{m}.{k}")
    for k, v in method.head.fc.state_dict().items():
        torch.testing.assert_close(v, model.fusion_module.fc_out.state_dict()[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", [SPEC, SPEC3_CONV, SPEC3], ids=["2mod", "3mod", "3mod-text"])
def test_reference_preset_steps_like_the_reference_code(spec):
    method = reference_method(spec)
    port, names = port_of(method)
    data = batches(method, len(EPOCHS))
    opt = torch.optim.SGD(method.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(port.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    method.train(), port.train()
    step = reference_step_2 if len(names) == 2 else reference_step_3
    seen = []
    for i, (epoch, b) in enumerate(zip(EPOCHS, data, strict=True)):
        torch.manual_seed(100 + i)  # the same GE noise draws on both sides
        logs = method.train_step(b, opt, StepContext(device=torch.device("cpu"), epoch=epoch))
        torch.manual_seed(100 + i)
        ref = step(port, *(b["inputs"][m] for m in method.modalities), b["label"], ref_opt, epoch)
        seen.append(ref)
        assert float(logs["loss"]) == pytest.approx(ref["loss"], abs=1e-5), i
        for j, m in enumerate(method.modalities):
            assert float(logs[f"loss/{m}"]) == pytest.approx(ref["losses"][j], abs=1e-5), (i, m)
            assert float(logs[f"ogm/ratio_{m}"]) == pytest.approx(ref["ratios"][j], rel=1e-5), (i, m)
            assert float(logs[f"ogm/coeff_{m}"]) == pytest.approx(ref["coeffs"][j], abs=1e-6), (i, m)
        assert_same_weights(method, port, names)
    # The steps went through every branch of the reference's if/else chain (with three
    # modalities, audio also when no modality dominates), its window's last epoch and an epoch
    # after the window.
    on = [r for r in seen if r["modulated"]]
    assert {r["branch"] for r in on} == {"a", "v"} | ({"t"} if len(names) == 3 else set())
    if len(names) == 3:
        assert any(r["branch"] == "a" and max(r["ratios"]) < 1 for r in on)
    assert seen[EPOCHS.index(ENDS)]["modulated"] and not seen[-1]["modulated"]
