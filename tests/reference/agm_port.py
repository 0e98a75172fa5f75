"""An independent port of the AGM reference training step, for tests/reference/test_ref_agm.py.

Written from lihong2303/AGM_ICCV2023 at 5a65542c70b1c7c15c5df291e77fa9cf2bbb9549:
- two modalities: `model/CREMAD_net.py` (`GradMod`, `AVClassifier`, `ConcatFusion`,
  `Modality_Audio`, `Modality_Visual`, `Modality_out`) and `run/CREMAD_main.py` (`train`, the
  Multimodal branch with `--methods AGM --fusion_type late_fusion`);
- three modalities: `model/URFunny_net.py` (`GradMod`, `Later_Fusion_Model` with a one-layer
  `MLP` head, `Modality_Audio/Visual/Text`) and `run/URFunny_main.py` (`train`).

It keeps the reference's computation: the network run once per coalition with zeroed inputs, the
masked runs in eval mode, the responses as the reference's closed forms, the scale applied by a
full backward hook on each `Modality_out`, scores as Python loops over the batch (with the 1e-8
floor in the two-modality script, none in the three-modality one), ratios, coefficients and
running means as Python floats, the window test on 1-based epochs, the held scale outside the
window, and the conditional gradient clip. What is not AGM is the caller's: the encoders
(copies of mmray's toy encoders stand in for the reference's ResNet18 / Transformers) and
mmray's precision rule (logits go to float32 before the loss and the scores, as mmray's
criterion does; the caller runs the models in float64).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ModalityOut(nn.Module):
    """`Modality_out`: the identity, where the backward hook sits."""

    def forward(self, x):
        return x


class HookedScales(nn.Module):
    """The scale attributes, `update_scale` and one hooked `Modality_out` per modality."""

    def __init__(self, names):
        super().__init__()
        self.names = list(names)
        self.scale = {n: 1.0 for n in self.names}
        self.outs = nn.ModuleDict({n: ModalityOut() for n in self.names})
        for n in self.names:
            self.outs[n].register_full_backward_hook(self._hook(n))

    def _hook(self, name):
        def hook(m, ginp, gout):  # hooka: gnew = ginp[0].clone(); return gnew * self.scale_a,
            gnew = ginp[0].clone()
            return (gnew * self.scale[name],)
        return hook

    def update_scale(self, *coeffs):
        self.scale = dict(zip(self.names, coeffs, strict=True))


class Net(nn.Module):
    """`AVClassifier` / `Later_Fusion_Model`: encoders, concatenation, one linear layer."""

    def __init__(self, encoders: dict[str, nn.Module], head: nn.Linear):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head

    def forward(self, inputs: dict[str, torch.Tensor], pad=()):
        feats = []
        for m, enc in self.encoders.items():
            x = torch.zeros_like(inputs[m], device=inputs[m].device) if m in pad else inputs[m]
            feats.append(enc(x))
        return self.head(torch.cat(feats, dim=1))


class GradMod2(nn.Module):
    """CREMAD_net.py GradMod, late fusion: modality order (audio, visual)."""

    def __init__(self, net: Net):
        super().__init__()
        self.net, self.mode = net, "train"
        self.a, self.v = list(net.encoders)
        self.hooks = HookedScales([self.a, self.v])

    def forward(self, inputs):
        a, v = self.a, self.v
        total_out = self.net(inputs)
        self.net.eval()
        pad_visual_out = self.net(inputs, pad=(v,))
        pad_audio_out = self.net(inputs, pad=(a,))
        zero_padding_out = self.net(inputs, pad=(a, v))
        if self.mode == "train":
            self.net.train()
        m_a = self.hooks.outs[a](0.5 * (total_out - pad_audio_out + pad_visual_out))
        m_v = self.hooks.outs[v](0.5 * (total_out - pad_visual_out + pad_audio_out))
        return total_out, pad_visual_out, pad_audio_out, zero_padding_out, m_a + m_v


class GradMod3(nn.Module):
    """URFunny_net.py GradMod: modality order (audio, visual, text) as in its concatenation."""

    def __init__(self, net: Net):
        super().__init__()
        self.net, self.mode = net, "train"
        self.a, self.v, self.t = list(net.encoders)
        self.hooks = HookedScales([self.a, self.v, self.t])

    def forward(self, inputs):
        a, v, t = self.a, self.v, self.t
        total_out = self.net(inputs)
        self.net.eval()
        pad_audio_out = self.net(inputs, pad=(a,))
        pad_visual_out = self.net(inputs, pad=(v,))
        pad_text_out = self.net(inputs, pad=(t,))
        pad_visual_audio_out = self.net(inputs, pad=(v, a))
        pad_visual_text_out = self.net(inputs, pad=(v, t))
        pad_audio_text_out = self.net(inputs, pad=(a, t))
        zero_padding_out = self.net(inputs, pad=(a, v, t))
        if self.mode == "train":
            self.net.train()
        m_a = self.hooks.outs[a]((total_out - pad_audio_out + pad_visual_text_out) / 3
                                 + (pad_visual_out - pad_audio_text_out + pad_text_out
                                    - pad_visual_audio_out) / 6)
        m_v = self.hooks.outs[v]((total_out - pad_visual_out + pad_audio_text_out) / 3
                                 + (pad_audio_out - pad_visual_text_out + pad_text_out
                                    - pad_visual_audio_out) / 6)
        m_t = self.hooks.outs[t]((total_out - pad_text_out + pad_visual_audio_out) / 3
                                 + (pad_visual_out - pad_audio_text_out + pad_audio_out
                                    - pad_visual_text_out) / 6)
        del zero_padding_out  # only the marginal contributions (unused in training) read it
        return m_a, m_v, m_t, m_a + m_v + m_t


def _score(out, label, floor: bool) -> torch.Tensor:
    """The reference's per-batch score: Σ_k −log softmax(out)[k][label[k]] / B."""
    softmax = nn.Softmax(dim=1)
    out = out.float()
    score = 0.
    for k in range(out.size(0)):
        p = softmax(out)[k][label[k]]
        if floor and (torch.isinf(torch.log(p)) or p < 1e-8):
            score += - torch.log(torch.tensor(1e-8, dtype=out.dtype, device=out.device))
        else:
            score += - torch.log(p)
    return score / out.size(0)


class Trainer:
    """`train`'s per-batch body with its state: the running scores `train_score_*` (0. at the
    start, `each_epoch_score_* = 0.` in main) carried from epoch to epoch."""

    def __init__(self, model, optimizer, alpha, starts, ends, batches_per_epoch):
        self.model, self.optimizer = model, optimizer
        self.alpha, self.starts, self.ends = alpha, starts, ends
        self.total_batch = batches_per_epoch
        self.train_score = {n: 0. for n in model.hooks.names}

    def step(self, inputs, label, epoch: int, step: int) -> dict:
        """One batch of the 1-based `epoch`; returns what the test compares."""
        return (self._step2 if len(self.train_score) == 2 else self._step3)(inputs, label, epoch, step)

    def _step2(self, inputs, label, epoch, step):
        """CREMAD_main.py train, Multimodal, AGM."""
        model, criterion = self.model, nn.CrossEntropyLoss()
        a, v = model.a, model.v
        iteration = (epoch - 1) * self.total_batch + step + 1
        total_out, pad_visual_out, pad_audio_out, zero_padding_out, out = model(inputs)
        out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
        out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
        loss = criterion(out.float(), label)
        self.optimizer.zero_grad()
        score_audio, score_visual = _score(out_a, label, True), _score(out_v, label, True)
        ratio_a = math.exp(score_visual.item() - score_audio.item())
        ratio_v = math.exp(score_audio.item() - score_visual.item())
        ts = self.train_score
        optimal_ratio_a = math.exp(ts[v] - ts[a])
        optimal_ratio_v = math.exp(ts[a] - ts[v])
        clamped = max(optimal_ratio_a - ratio_a, optimal_ratio_v - ratio_v) > 10
        coeff_a = math.exp(self.alpha * (min(optimal_ratio_a - ratio_a, 10)))
        coeff_v = math.exp(self.alpha * (min(optimal_ratio_v - ratio_v, 10)))
        ts[a] = ts[a] * (iteration - 1) / iteration + score_audio.item() / iteration
        ts[v] = ts[v] * (iteration - 1) / iteration + score_visual.item() / iteration
        modulated = self.starts <= epoch <= self.ends
        if modulated:
            model.hooks.update_scale(coeff_a, coeff_v)
        loss.backward()  # outside the window: the "normal" branch, the hooks keep their scale
        clipped = self._clip(1.0)
        self.optimizer.step()
        return {"loss": loss.item(), "scores": [score_audio.item(), score_visual.item()],
                "coeffs": [model.hooks.scale[a], model.hooks.scale[v]], "modulated": modulated,
                "clipped": clipped, "clamped": clamped}

    def _step3(self, inputs, label, epoch, step):
        """URFunny_main.py train, Multimodal, AGM."""
        model, loss_fn = self.model, nn.CrossEntropyLoss()
        a, v, t = model.a, model.v, model.t
        iteration = (epoch - 1) * self.total_batch + step + 1
        self.optimizer.zero_grad()
        m_a_out, m_v_out, m_t_out, out = model(inputs)
        loss = loss_fn(out.float(), label)
        score_visual = _score(m_v_out, label, False)
        score_audio = _score(m_a_out, label, False)
        score_text = _score(m_t_out, label, False)
        mean_score = (score_visual.item() + score_audio.item() + score_text.item()) / 3
        ratio = {n: math.exp((mean_score - s.item()) * 3 / 2)
                 for n, s in ((v, score_visual), (a, score_audio), (t, score_text))}
        ts = self.train_score
        optimal_mean_score = (ts[v] + ts[a] + ts[t]) / 3
        optimal = {n: math.exp((optimal_mean_score - ts[n]) * 3 / 2) for n in (v, a, t)}
        clamped = max(optimal[n] - ratio[n] for n in (a, v, t)) > 7
        coeff = {n: math.exp(self.alpha * (min(optimal[n] - ratio[n], 7))) for n in (a, v, t)}
        for n, s in ((v, score_visual), (a, score_audio), (t, score_text)):
            ts[n] = ts[n] * (iteration - 1) / iteration + s.item() / iteration
        modulated = self.starts <= epoch <= self.ends
        if modulated:
            model.hooks.update_scale(coeff[a], coeff[v], coeff[t])
        loss.backward()
        clipped = self._clip(5.0)
        self.optimizer.step()
        return {"loss": loss.item(),
                "scores": [score_audio.item(), score_visual.item(), score_text.item()],
                "coeffs": [model.hooks.scale[n] for n in (a, v, t)], "modulated": modulated,
                "clipped": clipped, "clamped": clamped}

    def _clip(self, limit: float) -> bool:
        """if grad_max > limit or grad_min < -limit: clip_grad_norm_(model.parameters(), limit)."""
        grad = self.model.net.head.weight.grad
        if torch.max(grad) > limit or torch.min(grad) < -limit:
            nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=limit)
            return True
        return False
