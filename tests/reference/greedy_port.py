"""Ports of Greedy's two reference training steps, written from their code (test fixtures only).

The authors' code: nyukat/greedy_multimodal_learning at a190e03755bd8d0883b2c5c0cd7921d2561ce2ee,
`src/balanced_mmtm.py` MMTM_mitigate (SEonly=False, shareweight=False, no `mmtm_off`),
`src/model.py` MMTM_MVCNN.forward, `src/callbacks.py` Bias_Mitigation_Strong, `src/framework.py`
Model_.train_loop / _eval_generator and `train.py` blend_loss. The port keeps their computation:
the running averages as plain attributes updated in every forward (the second one from the first
branch's gates), the callback's Python-float sums and numpy log10 over parameters matched by
name, `zero_grad()` that zeroes (the PyTorch 1.x the code ran under), the mode passed to the
evaluation forwards too, and epochs counted from 1 with `unlock` from `starting_epoch`.

BalanceBenchmark: GeWu-Lab/BalanceBenchmark, `balancemm/trainer/Greedy_trainer.py` (identical in
its logic at 4c1482fca5aaa8d4278af8e26020daa039e3ccf3 and 3f27575), with the MMTM of
`balancemm/models/avclassify_model.py` at 3f27575 (at 4c1482f its forward first resets the
running average to {} and then reads it, which raises KeyError) and `ConcatFusion_N` of
`fusion_arch.py`. Its `zero_grad()` deletes gradients (PyTorch 2), its validation forwards use
`curation_mode=False`, and its epochs count from 0 with no warm-up.

What is not the references' is mmray's: the MMTMs sit on the encoders' output features instead of
inside ResNet18s (on (B, C) features their spatial squeeze is the identity, so the same code runs
unchanged at one position), and deep copies of mmray's toy encoders stand in for the ResNets.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# -- the authors' code ------------------------------------------------------------------------


class MMTMMitigate(nn.Module):
    """src/balanced_mmtm.py MMTM_mitigate with SEonly=False, shareweight=False."""

    def __init__(self, dim_visual, dim_skeleton, ratio):
        super().__init__()
        dim = dim_visual + dim_skeleton
        dim_out = int(2 * dim / ratio)
        self.running_avg_weight_visual = torch.zeros(dim_visual)
        self.running_avg_weight_skeleton = torch.zeros(dim_visual)
        self.step = 0
        self.fc_squeeze = nn.Linear(dim, dim_out)
        self.fc_visual = nn.Linear(dim_out, dim_visual)
        self.fc_skeleton = nn.Linear(dim_out, dim_skeleton)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Sigmoid()

    def forward(self, visual, skeleton, curation_mode=False, caring_modality=0):
        squeeze_array = []
        for tensor in [visual, skeleton]:
            tview = tensor.view(tensor.shape[:2] + (-1,))
            squeeze_array.append(torch.mean(tview, dim=-1))
        squeeze = torch.cat(squeeze_array, 1)
        excitation = self.relu(self.fc_squeeze(squeeze))
        vis_out = self.sigmoid(self.fc_visual(excitation))
        sk_out = self.sigmoid(self.fc_skeleton(excitation))

        self.running_avg_weight_visual = (vis_out.mean(0) + self.running_avg_weight_visual * self.step).detach() / (self.step + 1)
        # The reference's line, vis_out and all:
        self.running_avg_weight_skeleton = (vis_out.mean(0) + self.running_avg_weight_skeleton * self.step).detach() / (self.step + 1)
        self.step += 1

        if not curation_mode:
            vis_out = vis_out.view(vis_out.shape + (1,) * (len(visual.shape) - len(vis_out.shape)))
            sk_out = sk_out.view(sk_out.shape + (1,) * (len(skeleton.shape) - len(sk_out.shape)))
        elif caring_modality == 0:
            sk_out = sk_out.view(sk_out.shape + (1,) * (len(skeleton.shape) - len(sk_out.shape)))
            vis_out = torch.stack(vis_out.shape[0] * [self.running_avg_weight_visual]).view(
                vis_out.shape + (1,) * (len(visual.shape) - len(vis_out.shape)))
        elif caring_modality == 1:
            vis_out = vis_out.view(vis_out.shape + (1,) * (len(visual.shape) - len(vis_out.shape)))
            sk_out = torch.stack(sk_out.shape[0] * [self.running_avg_weight_skeleton]).view(
                sk_out.shape + (1,) * (len(skeleton.shape) - len(sk_out.shape)))
        return visual * vis_out, skeleton * sk_out


class Branch(nn.Module):
    """One `models.resnet18` of MMTM_MVCNN: its body (here an mmray encoder) and its `fc`."""

    def __init__(self, body, fc):
        super().__init__()
        self.body, self.fc = body, fc


class MMTMMVCNN(nn.Module):
    """src/model.py MMTM_MVCNN: net_view_0, net_view_1, one MMTM on the branches' features."""

    def __init__(self, net_view_0, net_view_1, mmtm):
        super().__init__()
        self.net_view_0, self.net_view_1, self.mmtm = net_view_0, net_view_1, mmtm

    def forward(self, x0, x1, curation_mode=False, caring_modality=None):
        f0, f1 = self.mmtm(self.net_view_0.body(x0), self.net_view_1.body(x1),
                           curation_mode=curation_mode, caring_modality=caring_modality)
        x_0, x_1 = self.net_view_0.fc(f0), self.net_view_1.fc(f1)
        return (x_0 + x_1) / 2, [x_0, x_1]


def blend_loss(y_hat, y):
    """train.py blend_loss."""
    loss_func = torch.nn.CrossEntropyLoss()
    return sum(loss_func(y_pred, y) for y_pred in y_hat)


class ModelState:
    """The attributes of Model_ the callback reads and writes."""

    def __init__(self):
        self.curation_mode = False
        self.caring_modality = None


class BiasMitigationStrong:
    """src/callbacks.py Bias_Mitigation_Strong (on_train_begin in __init__)."""

    def __init__(self, model, model_pytoune, epsilon, curation_windowsize, starting_epoch=2,
                 branchnames=("net_view_0", "net_view_1"), MMTMnames=("visual", "skeleton")):
        self.model, self.model_pytoune = model, model_pytoune
        self.epsilon, self.curation_windowsize = epsilon, curation_windowsize
        self.starting_epoch, self.branchnames, self.MMTMnames = starting_epoch, branchnames, MMTMnames
        self.M_bypass_modal_0 = self.M_bypass_modal_1 = 0
        self.M_main_modal_0 = self.M_main_modal_1 = 0
        self.model_pytoune.curation_mode = False
        self.model_pytoune.caring_modality = None
        self.unlock = False

    def compute_BDR(self):
        wn_main, wn_bypass = [0] * len(self.branchnames), [0] * len(self.branchnames)
        gn_main, gn_bypass = [0] * len(self.branchnames), [0] * len(self.branchnames)
        for name, parameter in self.model.named_parameters():
            wn = (parameter ** 2).sum().item()
            gn = (parameter.grad.data ** 2).sum().item()
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(self.MMTMnames):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind, _ in enumerate(self.MMTMnames):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(self.branchnames):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
        self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
        self.M_main_modal_0 += gn_main[0] / wn_main[0]
        self.M_main_modal_1 += gn_main[1] / wn_main[1]
        BDR_0 = np.log10(self.M_bypass_modal_0 / self.M_main_modal_0)
        BDR_1 = np.log10(self.M_bypass_modal_1 / self.M_main_modal_1)
        return BDR_0 - BDR_1

    def on_backward_end(self):
        if self.unlock:
            if not self.model_pytoune.curation_mode:
                self.d_BDR = self.compute_BDR()
                if abs(self.d_BDR) > self.epsilon:
                    biased_direction = np.sign(self.d_BDR)
                    self.model_pytoune.curation_mode = True
                    self.curation_step = 0
                    if biased_direction == -1:
                        self.model_pytoune.caring_modality = 1
                    elif biased_direction == 1:
                        self.model_pytoune.caring_modality = 0
                else:
                    self.model_pytoune.curation_mode = False
                    self.model_pytoune.caring_modality = 0
            else:
                self.curation_step += 1
                if self.curation_step == self.curation_windowsize:
                    self.model_pytoune.curation_mode = False
        else:
            self.d_BDR = self.compute_BDR()
            self.model_pytoune.curation_mode = False
            self.model_pytoune.caring_modality = 0

    def on_epoch_begin(self, epoch):
        if epoch >= self.starting_epoch:
            self.unlock = True


def authors_train_step(model, state, callback, x0, x1, y, optimizer) -> tuple[float, bool, int]:
    """One step of Model_.train_loop; returns (loss, curation_mode, caring) of the step's forward."""
    mode = (state.curation_mode, state.caring_modality)
    optimizer.zero_grad(set_to_none=False)  # PyTorch 1.x zero_grad: zeroes, keeps the tensors
    _, pred_y = model(x0, x1, curation_mode=state.curation_mode,
                      caring_modality=state.caring_modality)
    loss = blend_loss(pred_y, y)
    loss.backward()
    callback.on_backward_end()
    optimizer.step()
    return loss.item(), *mode


@torch.no_grad()
def authors_eval(model, state, x0, x1) -> torch.Tensor:
    """Model_._eval_generator's forward: the current mode, the mean of the branches' logits."""
    model.eval()
    pred_y_eval, _ = model(x0, x1, curation_mode=state.curation_mode,
                           caring_modality=state.caring_modality)
    model.train()
    return pred_y_eval


# -- BalanceBenchmark -------------------------------------------------------------------------


class BBMMTM(nn.Module):
    """avclassify_model.py MMTM at 3f27575, on (B, C) features (its visual reshape is for frames
    of 4-D maps and does not apply)."""

    def __init__(self, modalities_dims, ratio, modalitys):
        super().__init__()
        total_dim = sum(modalities_dims)
        dim_out = int(2 * total_dim / ratio)
        self.fc_squeeze = nn.Linear(total_dim, dim_out)
        key = list(modalitys)
        self.fc_excites = nn.ModuleDict({key[0]: nn.Linear(dim_out, modalities_dims[0]),
                                         key[1]: nn.Linear(dim_out, modalities_dims[1])})
        self.running_avg_weight = {m: torch.zeros(d) for m, d in zip(modalitys, modalities_dims)}
        self.step = 0
        self.relu, self.sigmoid = nn.ReLU(), nn.Sigmoid()

    def forward(self, data, modalitys, curation_mode=False, caring_modality=0):
        squeeze_array = []
        for modality in modalitys:
            B, C = data[modality].shape[0], data[modality].shape[1]
            squeeze_array.append(torch.mean(data[modality].reshape(B, C, -1), dim=-1))
        excitation = self.relu(self.fc_squeeze(torch.cat(squeeze_array, 1)))
        out = {}
        for modality in modalitys:
            out[modality] = self.sigmoid(self.fc_excites[modality](excitation))
            self.running_avg_weight[modality] = (out[modality].mean(0) + self.running_avg_weight[modality] * self.step).detach() / (self.step + 1)
        self.step += 1
        key = list(modalitys)
        if curation_mode:
            care = key[caring_modality]
            out[care] = torch.stack(out[care].shape[0] * [self.running_avg_weight[care]])
        return {m: data[m] * out[m] for m in modalitys}


class BBGreedyModel(nn.Module):
    """BaseClassifierGreedyModel: modality_encoder, mmtm_layers, fusion_module (ConcatFusion_N)."""

    def __init__(self, encoders: dict, mmtm, fc_out):
        super().__init__()
        self.modalitys = list(encoders)
        self.modality_encoder = nn.ModuleDict(encoders)
        self.mmtm_layers = nn.ModuleDict({"mmtm1": mmtm})
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = fc_out

    def forward(self, batch, curation_mode=False, caring_modality=0):
        res = {m: self.modality_encoder[m](batch[m]) for m in self.modalitys}
        res = self.mmtm_layers["mmtm1"](res, self.modalitys, curation_mode, caring_modality)
        return self.fusion_module.fc_out(torch.cat(list(res.values()), dim=1))


class BBGreedyTrainer:
    """Greedy_trainer.py GreedyTrainer: its state, train_loop's per-batch logic, the speed."""

    def __init__(self, alpha, window_size):
        self.alpha, self.window_size = alpha, window_size
        self.M_bypass_modal_0 = self.M_bypass_modal_1 = 0
        self.M_main_modal_0 = self.M_main_modal_1 = 0
        self.curation_mode, self.caring_modality = False, 0
        self.curation_step = self.window_size
        self.speed = 0

    def step(self, model, batch, label, optimizer) -> tuple[float, bool, int]:
        mode = (self.curation_mode, self.caring_modality)
        out = model(batch, self.curation_mode, self.caring_modality)
        loss = nn.CrossEntropyLoss()(out, label)
        loss.backward()
        if not self.curation_mode:
            self.speed = self.compute_learning_speed(model)
            if abs(self.speed) > self.alpha:
                biased_direction = np.sign(self.speed)
                self.curation_mode = True
                self.curation_step = 0
                if biased_direction == -1:
                    self.caring_modality = 1
                elif biased_direction == 1:
                    self.caring_modality = 0
            else:
                self.curation_mode = False
                self.caring_modality = 0
        else:
            self.curation_step += 1
            if self.curation_step == self.window_size:
                self.curation_mode = False
        optimizer.step()
        optimizer.zero_grad()  # PyTorch 2: set_to_none
        return loss.item(), *mode

    def compute_learning_speed(self, model):
        modality_list = model.modalitys
        wn_main, wn_bypass = [0] * len(modality_list), [0] * len(modality_list)
        gn_main, gn_bypass = [0] * len(modality_list), [0] * len(modality_list)
        for name, parameter in model.named_parameters():
            wn = (parameter ** 2).sum().item()
            gn = (parameter.grad.data ** 2).sum().item()
            if "mmtm_layers" in name:
                shared = True
                for ind, modal in enumerate(modality_list):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind, _ in enumerate(modality_list):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(modality_list):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
        self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
        self.M_main_modal_0 += gn_main[0] / wn_main[0]
        self.M_main_modal_1 += gn_main[1] / wn_main[1]
        BDR_0 = np.log10(self.M_bypass_modal_0 / self.M_main_modal_0)
        BDR_1 = np.log10(self.M_bypass_modal_1 / self.M_main_modal_1)
        return BDR_0 - BDR_1


@torch.no_grad()
def bb_eval(model, batch) -> torch.Tensor:
    """validation_step's forward: curation_mode left at its default False."""
    model.eval()
    out = model(batch)
    model.train()
    return out
