"""Independent ports of MMPareto's reference training steps, for tests/reference/test_ref_mmpareto.py.

Written from the reference code, not from mmray's functions:
- the authors' step: GeWu-Lab/MMPareto_ICML2024 `code/MMPareto.py` `train_epoch` (one batch),
  `code/min_norm_solvers.py` `MinNormSolver` (its two-task path) and `code/models/models.py`
  `AVClassifier`, commit a339db39cc25b157df376b50bb894917dc6c01d6;
- BalanceBenchmark's: GeWu-Lab/BalanceBenchmark `balancemm/trainer/MMPareto_trainer.py`
  `MMParetoTrainer.training_step` and `train_loop`'s step, with `balancemm/models/
  avclassify_model.py` `BaseClassifierModel` (concat fusion, `unimodality_calculate`) and
  `balancemm/models/fusion_arch.py` `ConcatFusion_N`, commit
  4c1482fca5aaa8d4278af8e26020daa039e3ccf3 (its trainer's call `model.Unimodality_Calculate()` is
  the model's `unimodality_calculate`, which `forward` already runs).

The encoders and heads are handed in by the caller (copies of the model under test); the
reference's ResNet18 pooling belongs to its encoders, whose outputs are already (B, d) here. The
models are wrapped like the reference's `DataParallel`, so parameter names start with `module.`.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Wrapped(nn.Module):
    """Stands in for `torch.nn.DataParallel`: parameters are named `module.<...>`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


# -- MinNormSolver, the two-task path ----------------------------------------------------------


def _min_norm_element_from2(v1v1, v1v2, v2v2):
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _min_norm_2d(vecs, dps):
    dmin = 1e8
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            if (i, j) not in dps:
                dps[(i, j)] = 0.0
                for k in range(len(vecs[i])):
                    dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
                dps[(j, i)] = dps[(i, j)]
            if (i, i) not in dps:
                dps[(i, i)] = 0.0
                for k in range(len(vecs[i])):
                    dps[(i, i)] += torch.mul(vecs[i][k], vecs[i][k]).sum().data.cpu()
            if (j, j) not in dps:
                dps[(j, j)] = 0.0
                for k in range(len(vecs[i])):
                    dps[(j, j)] += torch.mul(vecs[j][k], vecs[j][k]).sum().data.cpu()
            c, d = _min_norm_element_from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
            if d < dmin:
                dmin = d
                sol = [(i, j), c, d]
    return sol, dps


def find_min_norm_element(vecs):
    """`MinNormSolver.find_min_norm_element` for two vectors: (weights, cost)."""
    init_sol, dps = _min_norm_2d(vecs, {})
    init_sol = [item.numpy() if torch.is_tensor(item) else item for item in init_sol]
    assert len(vecs) == 2, "the port covers the two-task path only"
    sol_vec = np.zeros(len(vecs))
    sol_vec[init_sol[0][0]] = init_sol[1]
    sol_vec[init_sol[0][1]] = 1 - init_sol[1]
    return sol_vec, init_sol[2]


# -- the authors' code -------------------------------------------------------------------------


class AVClassifier(nn.Module):
    """models.py AVClassifier: audio_net, visual_net, head on [a; v], head_audio, head_video."""

    def __init__(self, audio_net, visual_net, head, head_audio, head_video):
        super().__init__()
        self.audio_net, self.visual_net = audio_net, visual_net
        self.head, self.head_audio, self.head_video = head, head_audio, head_video

    def forward(self, audio, visual):
        a, v = self.audio_net(audio), self.visual_net(visual)
        return self.head(torch.cat((a, v), 1)), self.head_audio(a), self.head_video(v)


def _record(store: dict, loss_type: str, names: list) -> None:
    for tensor_name, param in names:
        store.setdefault(loss_type, {})[tensor_name] = param.grad.data.clone()
    store[loss_type]["concat"] = torch.cat([store[loss_type][n].flatten() for n, _ in names])


def reference_step(model: nn.Module, audio, visual, label, optimizer) -> dict:
    """MMPareto.py train_epoch, one batch."""
    criterion = nn.CrossEntropyLoss()
    record_names_audio, record_names_visual = [], []
    for name, param in model.named_parameters():
        if "head" in name:
            continue
        if "audio" in name:
            record_names_audio.append((name, param))
            continue
        if "visual" in name:
            record_names_visual.append((name, param))
            continue

    optimizer.zero_grad()
    out, out_a, out_v = model(audio, visual)
    loss_mm, loss_a, loss_v = criterion(out, label), criterion(out_a, label), criterion(out_v, label)
    losses, all_loss = [loss_mm, loss_a, loss_v], ["both", "audio", "visual"]
    grads_audio, grads_visual = {}, {}
    for idx, loss_type in enumerate(all_loss):
        losses[idx].backward(retain_graph=True)
        if loss_type == "visual":
            _record(grads_visual, loss_type, record_names_visual)
        elif loss_type == "audio":
            _record(grads_audio, loss_type, record_names_audio)
        else:
            _record(grads_audio, loss_type, record_names_audio)
            _record(grads_visual, loss_type, record_names_visual)
        optimizer.zero_grad()

    cos_audio = F.cosine_similarity(grads_audio["both"]["concat"], grads_audio["audio"]["concat"], dim=0)
    cos_visual = F.cosine_similarity(grads_visual["both"]["concat"], grads_visual["visual"]["concat"], dim=0)
    if cos_audio > 0:
        audio_k = [0.5, 0.5]
    else:
        audio_k, _ = find_min_norm_element([list(grads_audio[t].values()) for t in ["both", "audio"]])
    if cos_visual > 0:
        visual_k = [0.5, 0.5]
    else:
        visual_k, _ = find_min_norm_element([list(grads_visual[t].values()) for t in ["both", "visual"]])

    gamma = 1.5
    loss = loss_mm + loss_a + loss_v
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            layer = re.split("[_.]", str(name))
            if "head" in layer:
                continue
            for key, k, grads in (("audio", audio_k, grads_audio), ("visual", visual_k, grads_visual)):
                if key in layer:
                    three_norm = torch.norm(param.grad.data.clone())
                    new_grad = 2 * k[0] * grads["both"][name] + 2 * k[1] * grads[key][name]
                    diff = three_norm / torch.norm(new_grad)
                    param.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
    optimizer.step()
    return {"loss": loss.item(), "losses": [loss_mm.item(), loss_a.item(), loss_v.item()],
            "cos": [cos_audio.item(), cos_visual.item()],
            "k": [float(audio_k[0]), float(visual_k[0])]}


# -- BalanceBenchmark --------------------------------------------------------------------------


class ConcatFusionN(nn.Module):
    """fusion_arch.py ConcatFusion_N: fc_out on the concatenated encoder results."""

    def __init__(self, fc_out: nn.Linear):
        super().__init__()
        self.fc_out = fc_out

    def forward(self, encoder_res: dict):
        return self.fc_out(torch.cat(list(encoder_res.values()), dim=1))


class BaseClassifierModel(nn.Module):
    """avclassify_model.py BaseClassifierModel, concat fusion: unimodal logits are the fused
    head's blocks plus bias / M."""

    def __init__(self, encoders: dict[str, nn.Module], fc_out: nn.Linear, sizes: dict[str, int]):
        super().__init__()
        self.modalitys = list(encoders)
        self.modality_encoder = nn.ModuleDict(encoders)
        self.fusion_module = ConcatFusionN(fc_out)
        self.modality_size = sizes

    def forward(self, batch: dict):
        self.encoder_result = {m: self.modality_encoder[m](batch[m]) for m in self.modalitys}
        self.encoder_result["output"] = self.fusion_module(self.encoder_result)
        all_nums = len(self.encoder_result.keys()) - 1
        self.unimodal_result, now_size = {}, 0
        fc_out = self.fusion_module.fc_out
        for modality in self.encoder_result:
            if modality == "output":
                self.unimodal_result[modality] = self.encoder_result[modality]
                continue
            block = fc_out.weight[:, now_size:now_size + self.modality_size[modality]]
            self.unimodal_result[modality] = (torch.mm(self.encoder_result[modality],
                                                       torch.transpose(block, 0, 1))
                                              + fc_out.bias / all_nums)
            now_size += self.modality_size[modality]
        return self.unimodal_result


def balancebench_step(model: nn.Module, batch: dict, label, optimizer, alpha: float = 1.5) -> dict:
    """MMParetoTrainer: train_loop's record_names, training_step, optimizer.step, zero_grad."""
    inner = model.module
    record_names = {modality: [] for modality in inner.modalitys}
    for name, param in model.named_parameters():
        if "head" in name:
            continue
        for modality in inner.modalitys:
            if modality in name:
                record_names[modality].append((name, param))
                continue

    criterion = nn.CrossEntropyLoss()
    model(batch)
    modality_list = inner.modalitys
    grads = {modality: {} for modality in modality_list}
    loss = {}
    for modality in inner.unimodal_result:
        loss[modality] = criterion(inner.unimodal_result[modality], label)
        loss[modality].backward(retain_graph=True)
    for modality in modality_list:
        for loss_type in loss:
            if loss_type == modality or loss_type == "output":
                _record(grads[modality], loss_type, record_names[modality])
    optimizer.zero_grad()

    this_cos = {m: F.cosine_similarity(grads[m]["output"]["concat"], grads[m][m]["concat"], dim=0)
                for m in modality_list}
    weight = {modality: [0, 0] for modality in modality_list}
    for modality in modality_list:
        if this_cos[modality] > 0:
            weight[modality][0] = 0.5
            weight[modality][1] = 0.5
        else:  # the trainer assigns the solution to its loop variable: the weights stay [0, 0]
            modality, _ = find_min_norm_element([list(grads[modality][t].values()) for t in grads[modality]])

    total_loss = sum(loss.values())
    total_loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            layer = re.split("[_.]", str(name))
            if "head" in layer:
                continue
            for modality in modality_list:
                if modality in layer:
                    three_norm = torch.norm(param.grad.data.clone())
                    new_grad = (2 * weight[modality][0] * grads[modality]["output"][name]
                                + 2 * weight[modality][1] * grads[modality][modality][name])
                    diff = three_norm / torch.norm(new_grad)
                    param.grad = diff * new_grad * alpha if diff > 1 else new_grad * alpha
    optimizer.step()
    optimizer.zero_grad()
    return {"loss": total_loss.item(), "cos": {m: c.item() for m, c in this_cos.items()},
            "losses": {m: v.item() for m, v in loss.items()}}
