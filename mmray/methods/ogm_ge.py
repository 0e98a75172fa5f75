"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement (METHODS.md §2).

Peng et al. "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022.
Reference code: https://github.com/GeWu-Lab/OGM-GE_CVPR2022 (`main.py`, `train_epoch`).

The model is the Normal baseline (encoders + `LateFusion`, one loss on the fused logits). After
backward, each modality's discrepancy score s_m = Σ_i softmax(z_m,i)[y_i] is taken from the
per-modality logits of the fusion head, ρ_m = s_m / mean_{n≠m} s_n, and the dominant modality
(ρ_m > 1) has its encoder's gradients scaled by k_m = 1 − tanh(α·ρ_m); with Gaussian enhancement
N(0, std(g)²) is added, std taken per parameter tensor from the unmodulated gradient.

Where mmray differs from the reference implementation:
- The whole encoder φ_m is modulated; the reference touches only 4-D (conv) weight gradients.
  `conv_only: true` reproduces it.
- The modulation window is [modulation_starts, modulation_ends) (epochs 0–49 by default); the
  reference tests `starts <= epoch <= ends`, so it also modulates epoch `ends` (51 epochs).
- Ties: with ρ = 1 for both modalities nothing is modulated; the reference's if/else then
  modulates audio.
- More than two modalities: ρ_m = s_m / mean_{n≠m} s_n and every modality with ρ_m > 1 is
  modulated. The reference's 3-modality branch (in the MLA repository) divides by the *sum* of the
  other scores and modulates at most one modality (the first of visual, text, audio with ρ > 1).
- Per-modality logits come from `LateFusion` (the head's block for m plus b/M); the reference's
  `sum` fusion uses each branch's own bias over 2, the same quantity for two modalities.
- The noise std is computed without the reference's `.item()` host sync per parameter, and without
  its `+1e-8` (a zero std gives zero noise). Single-element gradients get no noise (their std is
  undefined).
- With several Ray Train workers the coefficients come from each worker's own batch; gradients are
  modulated *before* they are averaged (the `edit_grads` hook of `backward_and_step`), so the
  averaged gradient, and hence the parameters, stay identical on every worker (with one worker
  this is exactly the reference's order).
- Multi-label datasets are rejected: s_m is defined through the softmax probability of one label.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, MethodConfig, StepContext
from mmray.methods.normal import Normal


@dataclass
class Config:
    # α in k_m = 1 − tanh(α·ρ_m): 0.8 for CREMA-D (reference README), 0.1 for VGGSound, 0.3 in
    # MLA's re-run.
    alpha: float = field(default=0.8, metadata=bounds(0.0, None, lo_open=True))
    # First epoch that is modulated.
    modulation_starts: int = field(default=0, metadata=bounds(0))
    # First epoch that is no longer modulated (the window is [starts, ends)).
    modulation_ends: int = field(default=50, metadata=bounds(0))
    # OGM-GE: add N(0, std(g)²) noise after scaling; false = plain OGM.
    gaussian_enhance: bool = True
    # Modulate only 4-D (conv weight) gradients, as the reference does; false = whole encoder.
    conv_only: bool = False

    def validate(self, path: str, errors: list[str]) -> None:
        if self.modulation_ends < self.modulation_starts:
            errors.append(f"{path}.modulation_ends: {self.modulation_ends} is before "
                          f"modulation_starts={self.modulation_starts}; the window is [starts, ends)")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def ogm_scores(per_modality_logits: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
    """s_m = Σ_i softmax(z_m,i)[y_i]: the batch's summed probability of the true class."""
    idx = label.view(-1, 1)
    return {m: F.softmax(z.detach().float(), dim=1).gather(1, idx).sum()
            for m, z in per_modality_logits.items()}


def ogm_ratios(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ρ_m = s_m / mean_{n≠m} s_n (for two modalities: s_v / s_a and its inverse)."""
    ratios = {}
    for m, s in scores.items():
        others = torch.stack([scores[n] for n in scores if n != m])
        ratios[m] = s / others.mean()
    return ratios


def ogm_coefficients(scores: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """k_m = 1 − tanh(α·ρ_m) for a dominant modality (ρ_m > 1), else 1 (paper Eq. 10)."""
    return {m: torch.where(r > 1, 1 - torch.tanh(alpha * r), torch.ones_like(r))
            for m, r in ogm_ratios(scores).items()}


@torch.no_grad()
def modulate_(params: Iterable[nn.Parameter], coeff: torch.Tensor, gaussian_enhance: bool,
              conv_only: bool) -> None:
    """In place: g ← k·g (OGM) or g ← k·g + N(0, std(g)²) (OGM-GE), std of the unmodulated g."""
    for p in params:
        g = p.grad
        if g is None or (conv_only and g.dim() != 4):
            continue
        if gaussian_enhance and g.numel() > 1:
            # Drawn before scaling: the std is the unmodulated gradient's (reference behaviour).
            noise = torch.randn_like(g) * g.std()
            g.mul_(coeff.to(g.dtype)).add_(noise)
        else:
            g.mul_(coeff.to(g.dtype))


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class OGMGE(Normal):
    """Normal late fusion whose encoder gradients are modulated after every backward."""

    name = "ogm_ge"
    Config = Config

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        if spec.multilabel:
            raise ValueError(f"method.name=ogm_ge: OGM-GE is defined for single-label cross-entropy "
                             f"and dataset {spec.name!r} is multi-label; use a single-label "
                             f"dataset or another method (e.g. method.name=normal)")
        if len(spec.modalities) < 2:
            raise ValueError(f"method.name=ogm_ge needs at least 2 modalities; dataset "
                             f"{spec.name!r} has {list(spec.modalities)}")
        super().__init__(spec, model_cfg, method_cfg)

    def active(self, epoch: int) -> bool:
        return self.options.modulation_starts <= epoch < self.options.modulation_ends

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        out, loss = self.fused_loss(batch, ctx)
        scores = ogm_scores(out.per_modality, batch["label"])
        ratios = ogm_ratios(scores)
        coeffs = ogm_coefficients(scores, self.options.alpha)

        def modulate() -> None:
            # Before the average: each worker scales its own gradient by its own k, so the
            # average is the same on every worker (see the module docstring).
            for m in self.modalities:
                modulate_(self.encoders[m].parameters(), coeffs[m],
                          self.options.gaussian_enhance, self.options.conv_only)

        logs = {}
        for m in self.modalities:
            logs[f"ogm/coeff_{m}"] = coeffs[m]
            logs[f"ogm/ratio_{m}"] = ratios[m]
        return self.backward_and_step(loss, optimizer, ctx, logs,
                                      edit_grads=modulate if self.active(ctx.epoch) else None)
