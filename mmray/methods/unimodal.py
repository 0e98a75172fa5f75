"""Unimodal baselines: one modality trained alone, and the ensemble of such models (METHODS.md §9).

The references every imbalance study measures against. Joint training can leave a modality
under-optimized that would learn well on its own (OGM-GE §3; Huang et al., "Modality
Competition", ICML 2022; Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023): the gap between a modality trained alone and the same modality's logits
inside the fused model (`acc_<m>`) is how that is seen. BalanceBenchmark reports both baselines
(`audio-only`, `visual-only`); Du et al. find the uni-modal ensemble hard to beat.

- `unimodal`: the encoder of one modality (`modality`) and a linear head z = W h_m + b, loss CE
  (BCE-with-logits for multi-label). The other modalities are never read: no encoder is built
  for them, and the metrics, gradient norms and `per_modality` logits name this modality only,
  so a run logs `acc_<m>` equal to `acc`.
- `unimodal_ensemble`: one encoder and head per modality, z_m = W_m h_m + b_m, trained together
  with loss Σ_m L(z_m, y), each member on its own loss only (no shared parameter, no fused loss:
  every member's gradients are exactly those it would get trained alone). Prediction: the
  mean of the members' logits, z = (1/M) Σ_m z_m, not of their probabilities, for single- and
  multi-label alike (under softmax: the normalised geometric mean of the members' class
  probabilities). The logged `loss` is Σ_m L(z_m, y), with each member's as `loss/<m>`.

Missing modalities: like every method, an absent modality's features are zeroed
(`Method.features`), and each member trains on every sample of the batch, so a member sees what
`unimodal` on its modality would see. At prediction the ensemble averages over the members whose
modality is present in that sample; a sample with none present gets the mean over all members.

`method.fusion` is not used: neither model fuses features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig, build_encoder
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext


@dataclass
class Config:
    # The modality trained alone; empty: the dataset's first modality (in its spec's order:
    # audio, image, text for the synthetic data). A name the dataset lacks is an error.
    modality: str = ""


def present_mean(logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
    """z = Σ_m w_m z_m with w_m = present_m / Σ_n present_n per sample; 1/M where none is present."""
    mask = torch.stack([present[m] for m in logits]).to(next(iter(logits.values())).dtype)  # (M, B)
    count = mask.sum(0, keepdim=True)
    weights = torch.where(count > 0, mask / count.clamp(min=1), torch.full_like(mask, 1 / len(logits)))
    return sum(w.unsqueeze(1) * z for w, z in zip(weights, logits.values()))


class Unimodal(Method):
    """One modality's encoder and a linear head, trained alone."""

    name = "unimodal"
    Config = Config
    modalities_supported = (1, 2, 3)

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        self.modalities = [self.modality]  # the metrics and gradient norms follow what is read
        self.head = nn.Linear(self.encoders[self.modality].out_dim, spec.num_classes)

    def build_encoders(self, spec: DatasetSpec, model_cfg: ModelConfig) -> nn.ModuleDict:
        # Checked here, before any parameter is built: only the dataset knows its modalities.
        self.modality = self.options.modality or next(iter(spec.modalities))
        if self.modality not in spec.modalities:
            raise ValueError(f"method.options.modality: {self.options.modality!r} is not a modality "
                             f"of dataset {spec.name!r}; accepted: {list(spec.modalities)}")
        m = self.modality
        return nn.ModuleDict({m: build_encoder(spec.modalities[m], model_cfg, m)})

    def forward(self, batch: Batch) -> Output:
        logits = self.head(self.features(batch)[self.modality])
        return Output(logits, {self.modality: logits})


class UnimodalEnsemble(Method):
    """One unimodal model per modality, trained side by side; predicts the mean of their logits."""

    name = "unimodal_ensemble"

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        self.heads = nn.ModuleDict({m: nn.Linear(enc.out_dim, spec.num_classes)
                                    for m, enc in self.encoders.items()})

    def member_logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        feats = self.features(batch)
        return {m: self.heads[m](feats[m]) for m in self.modalities}

    def forward(self, batch: Batch) -> Output:
        per_mod = self.member_logits(batch)
        return Output(present_mean(per_mod, batch["present"]), per_mod)

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            per_mod = self.member_logits(batch)
        losses = {m: self.criterion(z, batch["label"]) for m, z in per_mod.items()}
        return self.backward_and_step(sum(losses.values()), optimizer, ctx,
                                      {f"loss/{m}": v for m, v in losses.items()})
