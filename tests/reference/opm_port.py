"""Independent ports of the OPM reference training steps, for tests/reference/test_ref_opm.py.

Written from:
- the authors' code, GeWu-Lab/BML_TPAMI2024 at 4b3aa4fd841856c4acbebf48549e6c59fbf7635e:
  `code/models/Classifier.py` (`custom_autograd`, `Modality_drop.execute_drop`, `calcu_q`,
  `Classifier.forward`), `code/models/fusion_model.py` (`ConcatFusion`) and `code/main.py`
  (`train`, one batch, with `--use_adam_drop` and without `--use_modulation`);
- BalanceBenchmark's re-implementation, GeWu-Lab/BalanceBenchmark at
  4c1482fca5aaa8d4278af8e26020daa039e3ccf3: `balancemm/trainer/OPM_trainer.py`
  (`Modality_drop.execute_drop`, `OPMTrainer.training_step`) with the per-modality logits of
  `balancemm/models/avclassify_model.py` (`unimodality_calculate`, concat fusion).

Kept as the reference has them: the scores as Python sums over the batch, `calcu_q`'s assignment
into a float32 CPU tensor, BalanceBenchmark's in-place `/=` on the aliased score tensors, the mask
`Bernoulli(1 − q).sample([B, 1]).permute(2, 1, 0)`, the θ rescaling through the custom autograd
function, and the removal of samples that lost every modality. Changed: the encoders are the
caller's (copies of mmray's toy encoders, which output (B, D) directly, so the ResNet pooling is
gone); the authors' hard-coded 512-wide blocks are the encoders' widths; the p_exe coin
`np.random.rand(1)` is `torch.rand(())`, so that both sides draw from torch's global generator;
and the stray `]` that keeps the authors' `execute_drop` from parsing is left out. It uses no
mmray code.
"""

from __future__ import annotations

import torch
from torch import nn

# -- the authors' code ------------------------------------------------------------------------


class CustomAutograd(torch.autograd.Function):
    """`custom_autograd`: x / (1 − θ) forward, g / (1 − θ) backward (θ as a Python float)."""

    @staticmethod
    def forward(ctx, input, theta):
        ctx.save_for_backward(input, theta)
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        input, theta = ctx.saved_tensors
        return 1 / (1 - theta.item()) * grad_output.clone(), theta


class ModalityDrop:
    """`Modality_drop` (the authors')."""

    def __init__(self, dim_list: torch.Tensor, p_exe: float):
        self.dim_list, self.p_exe = dim_list, p_exe

    def execute_drop(self, fead_list, q):
        B, D = fead_list[0].shape[0], fead_list[0].shape[1]
        exe_drop = torch.rand(()) >= 1 - self.p_exe  # np.random.rand(1) in the reference
        if not exe_drop:
            return fead_list, torch.ones([B], dtype=torch.int32), False
        num_mod = len(fead_list)
        d_sum = sum(self.dim_list)
        q_sum = sum(self.dim_list * q)
        theta = q_sum / d_sum
        mask = torch.distributions.Bernoulli(1 - q).sample([B, 1]).permute(2, 1, 0).contiguous() \
            .reshape(num_mod, B, -1)
        concat_list = torch.stack(fead_list, dim=0)
        concat_list = torch.mul(concat_list, mask)
        concat_list = CustomAutograd.apply(concat_list, theta)
        mask = torch.transpose(mask, 0, 1).squeeze(-1)
        update_flag = torch.sum(mask, dim=1) > 0
        cleaned_fea = torch.masked_select(concat_list, update_flag.unsqueeze(-1)).reshape(num_mod, -1, D)
        cleaned_fea = torch.chunk(cleaned_fea, num_mod, dim=0)
        cleaned_fea = [_.squeeze(0) for _ in cleaned_fea]
        return cleaned_fea, update_flag, True


def calcu_q(performance_1, performance_2, q_base, fix_lambda):
    q = torch.tensor([0.0, 0.0])
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))
    lamda = fix_lambda
    q[0] = q_base * (1 + lamda * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + lamda * ratio_2) if ratio_2 > 0 else 0
    q = torch.clip(q, 0.0, 1.0)
    return q, (ratio_1.item(), ratio_2.item())


class Classifier(nn.Module):
    """`Classifier` with `use_adam_drop`: encoder_1, encoder_2 and `ConcatFusion.fxy`."""

    def __init__(self, encoder_1, encoder_2, fxy: nn.Linear, q_base=0.5, lam=0.5, p_exe=0.7):
        super().__init__()
        self.encoder_1, self.encoder_2, self.fxy = encoder_1, encoder_2, fxy
        self.softmax = nn.Softmax(dim=1)
        self.q_base, self.lam = q_base, lam
        self.d1 = encoder_1.out_dim
        self.modality_drop = ModalityDrop(torch.tensor([encoder_1.out_dim, encoder_2.out_dim]), p_exe)
        self.record: dict = {}

    def fusion_model(self, x, y):
        return x, y, self.fxy(torch.cat([x, y], dim=1))

    def forward(self, mod_1, mod_2, label, warm_up=1):
        out_1, out_2 = self.encoder_1(mod_1), self.encoder_2(mod_2)
        B = out_1.shape[0]
        w = self.fxy.weight.clone().detach()
        b = self.fxy.bias.clone().detach()
        t1 = torch.mm(out_1, torch.transpose(w[:, :self.d1], 0, 1)) + b / 2
        t2 = torch.mm(out_2, torch.transpose(w[:, self.d1:], 0, 1)) + b / 2
        performance_1 = sum([self.softmax(t1)[i][int(label[i].item())] for i in range(t1.shape[0])])
        performance_2 = sum([self.softmax(t2)[i][int(label[i].item())] for i in range(t2.shape[0])])
        if warm_up == 0:
            q, ratios = calcu_q(performance_1, performance_2, self.q_base, fix_lambda=self.lam)
            cleaned_fea, update_flag, executed = self.modality_drop.execute_drop([out_1, out_2], q)
            _, _, out = self.fusion_model(cleaned_fea[0], cleaned_fea[1])
            self.record = {"q": q.tolist(), "ratios": list(ratios), "executed": executed}
            return t1, t2, out, update_flag, performance_1, performance_2
        _, _, out = self.fusion_model(out_1, out_2)
        self.record = {"q": [0.0, 0.0], "ratios": None, "executed": False}
        return t1, t2, out, torch.ones([B], dtype=torch.int32), performance_1, performance_2


def authors_step(model: Classifier, audio, visual, label, optimizer, epoch) -> dict:
    """`main.py` `train`, one batch, `--use_adam_drop` (the OGM branch off)."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    warm_up = 1 if epoch <= 5 else 0
    out_1, out_2, out, update_flag, _, _ = model(audio, visual, label, warm_up)
    if warm_up == 0:
        if torch.sum(update_flag, dim=0) == 0:
            return {"skipped": True, **model.record}
        select_mask = update_flag != 0
        label, out_1, out_2 = label[select_mask], out_1[select_mask], out_2[select_mask]
    loss, loss_1, loss_2 = loss_fn(out, label), loss_fn(out_1, label), loss_fn(out_2, label)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "losses": [loss_1.item(), loss_2.item()], "skipped": False,
            "kept": len(label), **model.record}


# -- BalanceBenchmark -------------------------------------------------------------------------


class ModalityDropBB:
    """BalanceBenchmark's `Modality_drop`."""

    def __init__(self, dim_list: dict, p_exe: float):
        self.dim_list, self.p_exe = dim_list, p_exe

    def execute_drop(self, feat_list: dict, q: dict, modality_list: list):
        B = feat_list[modality_list[0]].shape[0]
        exe_drop = torch.rand(()) >= 1 - self.p_exe  # np.random.rand(1) in the reference
        if not exe_drop:
            return feat_list, torch.ones([B], dtype=torch.float32), False
        d_sum = sum(self.dim_list.values())
        q_sum = sum(self.dim_list[m] * q[m] for m in modality_list)
        theta = q_sum / d_sum
        num_mod = len(modality_list)
        q_temp = torch.tensor([q[m] for m in modality_list])  # (a warning: q has a graph)
        mask = torch.distributions.Bernoulli(1 - q_temp).sample([B, 1]).permute(2, 1, 0).contiguous() \
            .reshape(num_mod, B, -1)
        cleaned = {}
        for idx, modality in enumerate(modality_list):
            D = feat_list[modality].shape[1]
            current_mask = mask[idx].expand(-1, D)
            cleaned_fea = torch.mul(feat_list[modality], current_mask)
            cleaned[modality] = cleaned_fea / (1 - theta + 1e-5)
        mask = mask.squeeze(-1).transpose(0, 1)
        update_flag = torch.sum(mask, dim=1) > 0
        for modality in modality_list:
            cleaned[modality] = cleaned[modality][update_flag]
        return cleaned, update_flag, True


def clip(a, b, c):
    if b < a:
        return a
    if c < b:
        return c
    return b


def balancebench_step(encoders: dict, fc_out: nn.Linear, inputs: dict, label, optimizer,
                      q_base=0.4, alpha=0.5, p_exe=0.7) -> dict:
    """`OPMTrainer.training_step` inside the window (concat fusion), then the optimizer step."""
    softmax, criterion = nn.Softmax(dim=1), nn.CrossEntropyLoss()
    relu, tanh = nn.ReLU(inplace=True), nn.Tanh()
    optimizer.zero_grad()
    modality_list = list(encoders)
    encoder_result = {m: encoders[m](inputs[m]) for m in modality_list}
    unimodal_result, now = {}, 0
    for m in modality_list:  # avclassify_model.unimodality_calculate
        d = encoder_result[m].shape[1]
        unimodal_result[m] = (torch.mm(encoder_result[m], torch.transpose(fc_out.weight[:, now:now + d], 0, 1))
                              + fc_out.bias / len(modality_list))
        now += d
    n = len(modality_list)
    scores, ratios, coeffs = {}, {}, {}
    for modality in modality_list:
        scores[modality] = sum([softmax(unimodal_result[modality])[i][label[i]] for i in range(len(label))])
    for modality in modality_list:
        ratios[modality] = scores[modality]
        if n == 2:
            for another in modality_list:
                if another == modality:
                    continue
                ratios[modality] /= (scores[another] + 1e-5)  # in place: scores[modality] too
                ratios[modality] = tanh(relu(ratios[modality] - 1))
        if n == 3:
            temp_score = 0.0
            for another in modality_list:
                if another == modality:
                    continue
                temp_score += scores[another]
            ratios[modality] /= (temp_score + 1e-5)
            ratios[modality] = tanh(relu(ratios[modality] - 1))
    for modality in modality_list:
        coeffs[modality] = q_base * (1 + alpha * ratios[modality]) if ratios[modality] > 0 else 0
        coeffs[modality] = clip(coeffs[modality], 0.0, 1.0)
    drop = ModalityDropBB({m: encoder_result[m].shape[1] for m in modality_list}, p_exe)
    cleaned, update_flag, executed = drop.execute_drop(encoder_result, coeffs, modality_list)
    output = fc_out(torch.cat([cleaned[m] for m in modality_list], dim=1))
    select_mask = update_flag != 0
    label = label[select_mask]
    loss = criterion(output, label)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "ratios": [float(ratios[m]) for m in modality_list],
            "q": [float(coeffs[m]) for m in modality_list], "executed": executed,
            "kept": len(label)}

