"""G-Blending with `preset: reference`, beside a port of BalanceBenchmark's trainer.

The port below is written from GeWu-Lab/BalanceBenchmark at commit
4c1482fca5aaa8d4278af8e26020daa039e3ccf3, not from mmray's functions:
- `balancemm/trainer/GBlending_trainer.py`: `super_epoch_origin` (the copies: the model's state
  loaded into the temporary model, the temporary optimizer reset to its initial state, training on
  the fused output with the other modalities padded, the summed step losses and validation losses
  at the first and last epochs, `abs((g)/(o**2))`, normalised) and `training_step` (Σ over
  `unimodal_result` of weight × CE, then the caller's `optimizer.step()` and `zero_grad()`);
- `balancemm/models/avclassify_model.py` `BaseClassifierModel.forward` (a padded modality's input
  is `torch.zeros_like`) and `unimodality_calculate` (concat fusion: z_m = h_m W_mᵀ + b / M) with
  `balancemm/models/fusion_arch.py` `ConcatFusion_N`;
- `balancemm/train.py`: the temporary optimizer is built once from the configured optimizer and
  learning rate (no scheduler) and its `state_dict()` kept as `temp_optimizer_origin`.

What is not G-Blending is mmray's: deep copies of the method's toy encoders stand in for the
reference's ResNet18s, and the port's train and validation loaders are the train part and the
held-out part of mmray's batches (the reference's own validation split is what mmray replaces).

Both run from the same float64 weights on the same batches, with the reference's SGD (momentum
0.9, weight decay 1e-4, lr 0.1 so that the copies move). The run's optimizer has been stepped
down (as a scheduler leaves it) before the estimate, so the copies' initial learning rate is checked too.
Compared: the four measured losses and the weights of every loss, then the parameters after
each blended step, for `super_epoch` 1 (the reference's second point stays 0) and 2, two and
three modalities.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.gblending import is_heldout

from helpers import SPEC, SPEC3, checked_method_config, make_batch, torch_threads

MODEL = ModelConfig(width=4, feature_dim=6)
FRACTION = 0.4
LR, STEPPED_LR = 0.1, 0.05
N_BATCHES = 3


# -- the port ---------------------------------------------------------------------------------


class ConcatFusionN(nn.Module):
    """fusion_arch.py ConcatFusion_N: fc_out on the concatenated encoder results."""

    def __init__(self, fc_out: nn.Linear):
        super().__init__()
        self.fc_out = fc_out

    def forward(self, encoder_res):
        return self.fc_out(torch.cat(list(encoder_res.values()), dim=1))


class BaseClassifierModel(nn.Module):
    """avclassify_model.py BaseClassifierModel, concat fusion."""

    def __init__(self, encoders: dict[str, nn.Module], fc_out: nn.Linear):
        super().__init__()
        self.modalitys = list(encoders)
        self.modality_encoder = nn.ModuleDict(encoders)
        self.modality_size = {m: fc_out.in_features // len(encoders) for m in encoders}
        self.fusion_module = ConcatFusionN(fc_out)
        self.fusion = "concat"

    def forward(self, batch, padding=()):
        self.encoder_result = {}
        for modality in self.modalitys:
            modality_data = batch[modality]
            if modality in padding:
                modality_data = torch.zeros_like(modality_data, device=modality_data.device)
            self.encoder_result[modality] = self.modality_encoder[modality](modality_data)
        self.encoder_result["output"] = self.fusion_module(self.encoder_result)
        self.unimodality_calculate()
        return self.encoder_result, self.unimodal_result

    def unimodality_calculate(self):
        all_nums = len(self.encoder_result.keys()) - 1
        self.unimodal_result = {}
        now_size = 0
        for modality in self.encoder_result:  # the reference's `.keys()`
            if modality == "output":
                self.unimodal_result[modality] = self.encoder_result[modality]
                continue
            w = self.fusion_module.fc_out.weight
            self.unimodal_result[modality] = (
                torch.mm(self.encoder_result[modality],
                         torch.transpose(w[:, now_size:now_size + self.modality_size[modality]], 0, 1))
                + self.fusion_module.fc_out.bias / all_nums)
            now_size += self.modality_size[modality]


def super_epoch_origin(model, temp_model, train_loader, test_loader, optimizer, optimizer_origin,
                       super_epoch, record):
    """GBlendingTrainer.super_epoch_origin; `record` gets each loss's four measured values."""
    temp_model.load_state_dict(model.state_dict(), strict=True)
    criterion = nn.CrossEntropyLoss()
    weights = {}
    modalitys = list(temp_model.modalitys)
    modalitys.append("output")
    for modality in modalitys:
        temp_model.load_state_dict(model.state_dict(), strict=True)
        optimizer.load_state_dict(optimizer_origin)
        padding = []
        pre_train_loss = now_train_loss = pre_validation_loss = now_validation_loss = 0
        for other_modality in temp_model.modalitys:
            if other_modality != modality and modality != "output":
                padding.append(other_modality)
        for epoch in range(super_epoch):
            temp_model.train()
            _loss = 0.0
            for batch in train_loader:
                optimizer.zero_grad()
                temp_model(batch, padding=padding)
                out = temp_model.unimodal_result["output"]
                loss = criterion(out, batch["label"])
                loss.backward()
                optimizer.step()
                _loss += loss.item()
            if epoch == 0 or epoch == super_epoch - 1:
                temp_model.eval()
                with torch.no_grad():
                    _loss_v = 0
                    for batch in test_loader:
                        temp_model(batch, padding=padding)
                        out = temp_model.unimodal_result["output"]
                        _loss_v += criterion(out, batch["label"]).item()
                    if epoch == 0:
                        pre_train_loss, pre_validation_loss = _loss, _loss_v
                    else:
                        now_train_loss, now_validation_loss = _loss, _loss_v
        g = now_validation_loss - pre_validation_loss
        o_pre = pre_validation_loss - pre_train_loss
        o_now = now_validation_loss - now_train_loss
        o = o_now - o_pre
        weights[modality] = abs((g) / (o**2))
        record[modality] = [pre_train_loss, pre_validation_loss, now_train_loss, now_validation_loss]
    sums = sum(weights.values())
    for modality in weights:
        weights[modality] /= sums
    return weights


def training_step(model, batch, weights, optimizer):
    """GBlendingTrainer.training_step, then train_loop's optimizer.step() and zero_grad()."""
    criterion = nn.CrossEntropyLoss()
    model(batch)
    loss = 0
    for modality in model.unimodal_result:
        loss += weights[modality] * criterion(model.unimodal_result[modality], batch["label"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


# -- the two side by side ---------------------------------------------------------------------


def sgd(params, lr=LR):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def batches(spec) -> list[dict]:
    out = []
    for i in range(N_BATCHES):
        b = make_batch(spec, b=8, seed=30 + i)
        b["inputs"] = {m: x.double() if x.is_floating_point() else x for m, x in b["inputs"].items()}
        b["id"] = [f"b{i}-{j}" for j in range(8)]
        out.append(b)
    return out


def loaders(data) -> tuple[list[dict], list[dict]]:
    """The port's train and validation loaders: each batch's train part and held-out part, in the
    reference's batch layout (a tensor per modality and the label)."""
    parts: dict[bool, list[dict]] = {False: [], True: []}
    for b in data:
        held = torch.tensor([is_heldout(i, FRACTION) for i in b["id"]])
        for h in (False, True):
            rows = held == h
            if rows.any():
                parts[h].append({**{m: x[rows] for m, x in b["inputs"].items()},
                                 "label": b["label"][rows]})
    assert len(parts[False]) == len(data), "every batch needs train-part samples"
    return parts[False], parts[True]


@pytest.mark.parametrize("super_epoch", [1, 2])
@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
def test_reference_preset_estimates_and_steps_like_the_reference_code(spec, super_epoch):
    cfg = checked_method_config("gblending", "concat", preset="reference",
                                options={"super_epoch": super_epoch, "heldout_fraction": FRACTION})
    torch.manual_seed(0)
    method = build_method(spec, MODEL, cfg).double()
    model = BaseClassifierModel({m: copy.deepcopy(e) for m, e in method.encoders.items()},
                                copy.deepcopy(method.head.fc))
    temp_model = copy.deepcopy(model)
    temp_optimizer = sgd(temp_model.parameters())
    temp_optimizer_origin = copy.deepcopy(temp_optimizer.state_dict())
    data = batches(spec)
    train_loader, val_loader = loaders(data)

    opt, ref_opt = sgd(method.parameters()), sgd(model.parameters())
    for o in (opt, ref_opt):  # as a scheduler leaves the run's optimizer: the copies keep LR
        for group in o.param_groups:
            group["initial_lr"], group["lr"] = LR, STEPPED_LR
    method.train(), model.train()
    ctx = StepContext(device=torch.device("cpu"), train_batches=lambda: iter(data))
    with torch_threads(1):
        method.before_epoch(opt, ctx)
        record: dict[str, list[float]] = {}
        weights = super_epoch_origin(model, temp_model, train_loader, val_loader, temp_optimizer,
                                     temp_optimizer_origin, super_epoch, record)

        names = {**{m: m for m in method.modalities}, "fused": "output"}
        for i, k in enumerate(method.loss_names):
            ref = names[k]
            assert method.blend_points[:, i].tolist() == pytest.approx(record[ref], rel=1e-9, abs=1e-9), k
            assert float(method.blend_w[i]) == pytest.approx(weights[ref], rel=1e-6), k
        if super_epoch == 1:
            assert all(r[2] == 0 and r[3] == 0 for r in record.values())

        for b in data:
            logs = method.train_step(b, opt, ctx)
            ref_loss = training_step(model, {**b["inputs"], "label": b["label"]}, weights, ref_opt)
            assert float(logs["loss"]) == pytest.approx(ref_loss.item(), rel=1e-9)
            for m in method.modalities:
                for k, v in method.encoders[m].state_dict().items():
                    torch.testing.assert_close(v, model.modality_encoder[m].state_dict()[k],
                                               rtol=0, atol=1e-9, msg=f"{m}.{k}")
            for k, v in method.head.fc.state_dict().items():
                torch.testing.assert_close(v, model.fusion_module.fc_out.state_dict()[k],
                                           rtol=0, atol=1e-9)


def test_the_comparison_covers_a_falling_and_a_rising_held_out_loss():
    """The reference's abs(): over the cases above, some copies' held-out loss fell (G > 0) and
    some rose (G < 0), so both signs reached the weights."""
    signs = set()
    for spec in (SPEC, SPEC3):
        cfg = checked_method_config("gblending", "concat", preset="reference",
                                    options={"super_epoch": 2, "heldout_fraction": FRACTION})
        torch.manual_seed(0)
        method = build_method(spec, MODEL, cfg).double()
        data = batches(spec)
        ctx = StepContext(device=torch.device("cpu"), train_batches=lambda data=data: iter(data))
        with torch_threads(1):
            method.before_epoch(sgd(method.parameters()), ctx)
        signs |= {bool(g > 0) for g in method.blend_g}
    assert signs == {True, False}
