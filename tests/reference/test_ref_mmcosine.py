"""MMCosine beside ports of its reference training steps and evaluations.

The ports below are written from the reference code, not from mmray's functions:
- the authors' code: GeWu-Lab/MMCosine_ICASSP23, `main_CD.py` `train_epoch` and `valid` with
  `--mmcosine True --fusion_method concat` (its `NCELoss` with `--lam 0` included), with
  `models/basic_model.py` `AVClassifier` and `models/fusion_modules.py` `ConcatFusion`, commit
  00ba0a9cbd9b866b5017e972a1266d7b664bf86e; mmray's `preset: reference`;
- BalanceBenchmark: GeWu-Lab/BalanceBenchmark `balancemm/trainer/MMCosine_trainer.py`
  `training_step` and `validation_step` (two and three modalities, its window
  `modulation_starts <= epoch <= modulation_ends` = [0, 80]), with `models/avclassify_model.py`
  `BaseClassifierModel` and `models/fusion_arch.py` `ConcatFusion_N`, commit
  4c1482fca5aaa8d4278af8e26020daa039e3ccf3; mmray's `preset: balancebench`.

What is not MMCosine is mmray's: the encoders (deep copies of the method's toy encoders stand in
for the reference's ResNet18s and already pool to (B, d), so the reference's hard-coded feature
width 512 becomes the copies' width), inputs arrive in the encoders' layout, and the reference's
`DataParallel` (`model.module`) is left out. Both sides run in float64 from the same weights on
the same batches with the reference's optimizer (SGD, momentum 0.9, weight decay 1e-4; lr 0.1
instead of 1e-3 so that a few steps move the weights well past the tolerance); mmray's criterion
takes the loss in float32, hence a tolerance of ~1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

from av_port import AVClassifier, ConcatFusion
from helpers import SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=6)
TOL = dict(rtol=1e-5, atol=1e-6)  # mmray's criterion takes the loss in float32
EPOCHS = [0, 0, 1, 1, 2]
EPSILON = 1e-10  # main_CD.py EPISILON


# -- the authors' code ------------------------------------------------------------------------


class NCELoss(nn.Module):
    """main_CD.py NCELoss (the supplementary material's term; weighted by --lam = 0)."""

    def __init__(self, temperature=0.1):
        super().__init__()
        self.temperature = temperature
        self.softmax = nn.Softmax(dim=1)

    def forward(self, f1, f2, targets):
        f1, f2 = F.normalize(f1, dim=1), F.normalize(f2, dim=1)
        mask = targets.unsqueeze(1) - targets
        self_mask = (torch.zeros_like(mask) != mask).float()
        dist = (f1.unsqueeze(1) - f2).pow(2).sum(2)
        cos = 1 - 0.5 * dist
        pred_softmax = self.softmax(cos / self.temperature)
        log_pos = -torch.log(pred_softmax + EPSILON) * (1 - self_mask.float())
        log_neg = -torch.log(1 - pred_softmax + EPSILON) * self_mask.float()
        loss = log_pos.sum(1) / (1 - self_mask).sum(1).float() + log_neg.sum(1) / self_mask.sum(1).float()
        return loss.mean()


def authors_cosine(model, a, v, scaling):
    """The `if args.mmcosine` block of train_epoch and valid (512 -> the features' width)."""
    w, d = model.fusion_module.fc_out.weight, a.size(1)
    out_a = torch.mm(F.normalize(a, dim=1), F.normalize(torch.transpose(w[:, :d], 0, 1), dim=0))
    out_v = torch.mm(F.normalize(v, dim=1), F.normalize(torch.transpose(w[:, d:], 0, 1), dim=0))
    return out_a * scaling, out_v * scaling


def authors_step(model, audio, visual, label, optimizer, scaling=10.0, lam=0.0) -> dict:
    """main_CD.py train_epoch, one batch, --mmcosine True."""
    criterion, nce = nn.CrossEntropyLoss(), NCELoss()
    optimizer.zero_grad()
    a, v, out = model(audio, visual)
    nce_loss = nce(a, v, label)
    out_a, out_v = authors_cosine(model, a, v, scaling)
    out = out_a + out_v
    label_onehot = nn.functional.one_hot(label, num_classes=out_v.size(1))  # tensorboard values
    fy_v = torch.mean(torch.sum(out_v * label_onehot, dim=1))
    fy_a = torch.mean(torch.sum(out_a * label_onehot, dim=1))
    loss = criterion(out, label) + lam * nce_loss
    loss_v, loss_a = criterion(out_v, label), criterion(out_a, label)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "losses": [loss_a.item(), loss_v.item()],
            "fy": [fy_a.item(), fy_v.item()]}


@torch.no_grad()
def authors_valid(model, audio, visual, scaling=10.0):
    """main_CD.py valid, one batch: the fused prediction is softmax(out) of the raw head."""
    a, v, out = model(audio, visual)
    out_a, out_v = authors_cosine(model, a, v, scaling)
    return out, {"audio": out_a, "image": out_v}


# -- BalanceBenchmark -------------------------------------------------------------------------


class BaseClassifierModel(nn.Module):
    """models/avclassify_model.py BaseClassifierModel's forward: encoder_result per modality and
    'output' = ConcatFusion_N (fc_out on the features concatenated in modality order)."""

    def __init__(self, encoders: dict[str, nn.Module], fc_out: nn.Linear):
        super().__init__()
        self.modalitys = list(encoders)
        self.modality_encoder = nn.ModuleDict(encoders)
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = fc_out
        self.encoder_result = {}

    def forward(self, batch):
        for m in self.modalitys:
            self.encoder_result[m] = self.modality_encoder[m](batch[m])
        feats = torch.cat([self.encoder_result[m] for m in self.modalitys], dim=1)
        self.encoder_result["output"] = self.fusion_module.fc_out(feats)


def bb_cosine(model, scaling):
    """The `len(key) == 2` / `len(key) == 3` blocks of training_step and validation_step."""
    key, m = model.modalitys, model.encoder_result
    w = model.fusion_module.fc_out.weight
    d0 = m[key[0]].size(1)
    res = {key[0]: torch.mm(F.normalize(m[key[0]], dim=1), F.normalize(torch.transpose(w[:, :d0], 0, 1), dim=0))}
    if len(key) == 2:
        res[key[1]] = torch.mm(F.normalize(m[key[1]], dim=1), F.normalize(torch.transpose(w[:, d0:], 0, 1), dim=0))
    if len(key) == 3:
        d1 = m[key[1]].size(1)
        res[key[1]] = torch.mm(F.normalize(m[key[1]], dim=1),
                               F.normalize(torch.transpose(w[:, d0:d0 + d1], 0, 1), dim=0))
        res[key[2]] = torch.mm(F.normalize(m[key[2]], dim=1),
                               F.normalize(torch.transpose(w[:, d0 + d1:], 0, 1), dim=0))
    for modality in key:
        res[modality] = res[modality] * scaling
    res["output"] = sum(res[modality] for modality in key)
    return res


def bb_step(model, batch, label, optimizer, epoch, scaling=15.0, starts=0, ends=80) -> dict:
    """MMCosine_trainer.py training_step (optimizer.step(closure) then zero_grad)."""
    criterion = nn.CrossEntropyLoss()
    model(batch)
    in_window = starts <= epoch <= ends
    if in_window:
        res = bb_cosine(model, scaling)
        loss = criterion(res["output"], label)
    else:
        loss = criterion(model.encoder_result["output"], label)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {"loss": loss.item(), "in_window": in_window}


@torch.no_grad()
def bb_validation(model, batch, scaling=15.0):
    """MMCosine_trainer.py validation_step: predictions from the cosine sum."""
    model(batch)
    return bb_cosine(model, scaling)


# -- the two side by side ---------------------------------------------------------------------


def build(spec, preset):
    torch.manual_seed(0)
    method = build_method(spec, MODEL, checked_method_config("mmcosine", preset=preset)).double()
    with torch.no_grad():  # a nonzero bias, so that any use of it would show
        method.head.fc.bias.normal_()
    return method


def batches(spec, n):
    out = []
    for s in range(n):
        b = make_batch(spec, b=8, seed=20 + s)
        b["inputs"] = {m: x.double() if x.is_floating_point() else x for m, x in b["inputs"].items()}
        assert len(set(b["label"].tolist())) > 1  # the authors' NCE term is NaN otherwise
        out.append(b)
    return out


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def assert_same_weights(method, encoders, fc_out):
    for m, enc in encoders.items():
        for k, v in method.encoders[m].state_dict().items():
            torch.testing.assert_close(v, enc.state_dict()[k], **TOL, msg=f"{m}.{k}")
    torch.testing.assert_close(method.head.fc.weight, fc_out.weight, **TOL)
    torch.testing.assert_close(method.head.fc.bias, fc_out.bias, rtol=0, atol=0)


def test_reference_preset_steps_and_evaluates_like_the_authors_code():
    method = build(SPEC, "reference")
    s = method.options.scale
    assert s == 10.0  # the authors' --scaling default
    encoders = {m: copy.deepcopy(method.encoders[m]) for m in method.modalities}
    fc_out = copy.deepcopy(method.head.fc)
    port = AVClassifier(ConcatFusion(fc_out), encoders["audio"], encoders["image"])
    bias = fc_out.bias.detach().clone()
    opt_m, opt_p = sgd(method.parameters()), sgd(port.parameters())
    for epoch, b in zip(EPOCHS, batches(SPEC, len(EPOCHS)), strict=True):
        method.train(), port.train()
        logs = method.train_step(b, opt_m, StepContext(device=torch.device("cpu"), epoch=epoch))
        ref = authors_step(port, b["inputs"]["audio"], b["inputs"]["image"], b["label"], opt_p, s)
        assert float(logs["loss"]) == pytest.approx(ref["loss"], rel=1e-6)
        for j, m in enumerate(method.modalities):
            assert float(logs[f"loss/{m}"]) == pytest.approx(ref["losses"][j], rel=1e-6)
            assert s * float(logs[f"mmcosine/cos_true_{m}"]) == pytest.approx(ref["fy"][j], rel=1e-6)
        assert_same_weights(method, encoders, fc_out)
        # valid(): the fused prediction reads the raw head, with its never-trained bias.
        method.eval(), port.eval()
        out, per_mod = authors_valid(port, b["inputs"]["audio"], b["inputs"]["image"], s)
        pred = method.predict(b)
        torch.testing.assert_close(pred.logits, out, **TOL)
        for m in method.modalities:
            torch.testing.assert_close(pred.per_modality[m], per_mod[m], **TOL)
    assert torch.equal(fc_out.bias, bias) and torch.equal(method.head.fc.bias, bias)


@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
def test_balancebench_preset_steps_and_evaluates_like_its_trainer(spec):
    method = build(spec, "balancebench")
    s = method.options.scale
    assert s == 15.0  # trainer_config.yaml MMCosine.scaling
    encoders = {m: copy.deepcopy(method.encoders[m]) for m in method.modalities}
    fc_out = copy.deepcopy(method.head.fc)
    port = BaseClassifierModel(encoders, fc_out)
    opt_m, opt_p = sgd(method.parameters()), sgd(port.parameters())
    seen = []
    for epoch, b in zip(EPOCHS, batches(spec, len(EPOCHS)), strict=True):
        method.train(), port.train()
        logs = method.train_step(b, opt_m, StepContext(device=torch.device("cpu"), epoch=epoch))
        ref = bb_step(port, b["inputs"], b["label"], opt_p, epoch, s)
        seen.append(ref["in_window"])
        assert float(logs["loss"]) == pytest.approx(ref["loss"], rel=1e-6)
        assert_same_weights(method, encoders, fc_out)
        method.eval(), port.eval()
        res = bb_validation(port, b["inputs"], s)
        pred = method.predict(b)
        torch.testing.assert_close(pred.logits, res["output"], **TOL)
        for m in method.modalities:
            torch.testing.assert_close(pred.per_modality[m], res[m], **TOL)
    assert all(seen)  # its window [0, 80] holds every epoch of its 30
