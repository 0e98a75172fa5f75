"""QMF: Quality-aware Multimodal Fusion (METHODS.md §3).

Zhang et al. "Provable Dynamic Fusion for Low-Quality Multimodal Data", ICML 2023. Reference code: https://github.com/QingyangZhang/QMF (`train_qmf.py`: `model_forward`,
`rank_loss`; `utils/crl_utils.py`: `History`; `src/models/late_fusion.py`).

Each modality has its own classifier z_m = W_m h_m + b_m. Its confidence is the scaled negative
energy c_m = T·logsumexp(z_m / T) / 10 (T = 1 in QMF), and the fused logits are
z = Σ_m stopgrad(c_m)·z_m: the fused loss trains the classifiers, never the confidences. The
confidences are trained by a ranking loss against each sample's history: the cumulative CE loss of
modality m on sample i over all training steps so far, min–max normalised → ℓ̄_m(i). Sample i is
paired with i+1 (a roll by one over the batch) and, with t = sign(ℓ̄(i) − ℓ̄(j)),

    L_rank,m = mean_i max(0, t·(c_m(i) − c_m(j)) − |ℓ̄(i) − ℓ̄(j)|).

Sign convention: t = +1 when sample i has the larger historical loss (the less reliable one); the
hinge fires when its confidence exceeds the other's by more than |ℓ̄(i) − ℓ̄(j)|, so the margin is a
tolerance, not a required gap. This is what the reference computes: MarginRankingLoss with margin 0
on (c(i), c(j) + |Δℓ̄|/t, −t). Loss = Σ_m CE(z_m) + CE(z) + λ_rank Σ_m L_rank,m.

Where mmray differs from the reference implementation:
- The history is keyed by the batch's stable sample ids (`batch["id"]`) instead of dataset
  positions, and it is min–max normalised over the ids seen so far; the reference normalises over
  an array sized to the whole dataset, where samples not yet seen count as zero. It is saved with
  the checkpoint (the reference rebuilds it empty on resume).
- The objective is the reference's (`train_qmf.py` sums the three CE terms and the ranking
  losses, λ_rank = 1); MLA's re-run uses λ_rank = 0.1, and its M3AE branches drop CE(z).
- `energy_temperature` generalises the fixed T = 1; multi-label datasets use BCE for every term,
  and the per-sample history loss is the BCE averaged over classes.
- `method.fusion` is not used: QMF fuses the per-modality classifiers by confidence.
- With several Ray Train workers each worker keeps the history of the ids it has trained on
  (shards need not give a worker the same ids every epoch), and the checkpoint holds rank 0's
  history, which every worker loads on resume. With one worker there is one history, as in the
  reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext


@dataclass
class Config:
    # λ_rank, weight of the confidence ranking loss: 1 in QMF, 0.1 in MLA's re-run.
    rank_weight: float = field(default=1.0, metadata=bounds(0.0, None))
    # T in c_m = T·logsumexp(z_m / T) / 10; QMF uses T = 1.
    energy_temperature: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def energy_confidence(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """c = T·logsumexp(z / T) / 10 per sample, shape (B,)."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1) / 10


def confidence_fusion(per_modality: dict[str, torch.Tensor],
                      confidence: dict[str, torch.Tensor]) -> torch.Tensor:
    """z = Σ_m stopgrad(c_m)·z_m, c_m broadcast over classes."""
    return sum(confidence[m].detach().unsqueeze(1) * z for m, z in per_modality.items())


def rank_loss(confidence: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """mean_i max(0, t·(c(i) − c(j)) − |ℓ̄(i) − ℓ̄(j)|), j = i+1 (mod B), t = sign(ℓ̄(i) − ℓ̄(j))."""
    diff = history - torch.roll(history, -1)
    t = torch.sign(diff)
    return torch.clamp(t * (confidence - torch.roll(confidence, -1)) - diff.abs(), min=0).mean()


class LossHistory:
    """Cumulative per-sample loss of each modality, keyed by sample id.

    `index` maps an id to its row of `sums` (ids × modalities, float64 on the CPU), so that the
    min–max over every id seen is one tensor reduction instead of a loop over a dict.
    """

    def __init__(self, modalities: list[str]):
        self.modalities = list(modalities)
        self.index: dict[str, int] = {}
        self.sums = torch.zeros(0, len(self.modalities), dtype=torch.float64)

    def rows(self, ids: list[str], grow: bool = False) -> torch.Tensor:
        if grow:
            new = [i for i in dict.fromkeys(ids) if i not in self.index]
            for i in new:
                self.index[i] = len(self.index)
            if new:
                pad = torch.zeros(len(new), len(self.modalities), dtype=torch.float64)
                self.sums = torch.cat([self.sums, pad])
        return torch.tensor([self.index[i] for i in ids], dtype=torch.long)

    def update(self, ids: list[str], losses: torch.Tensor) -> None:
        """Add each sample's losses (B × modalities) to its running sums."""
        rows = self.rows(ids, grow=True)  # before touching self.sums: it may grow
        # A device->host copy per step: the history lives on the CPU, sized by the dataset.
        self.sums.index_add_(0, rows, losses.detach().double().cpu())

    def normalised(self, ids: list[str]) -> torch.Tensor:
        """ℓ̄ = (sum − min) / (max − min) per modality over all ids seen; 0 where max = min."""
        lo, hi = self.sums.min(0).values, self.sums.max(0).values
        span = hi - lo
        out = (self.sums[self.rows(ids)] - lo) / torch.where(span > 0, span, torch.ones_like(span))
        return torch.where(span > 0, out, torch.zeros_like(out))

    def state(self) -> dict[str, Any]:
        ids = sorted(self.index, key=self.index.__getitem__)
        return {"modalities": self.modalities, "ids": ids, "sums": self.sums.clone()}

    def load(self, state: dict[str, Any]) -> None:
        if list(state["modalities"]) != self.modalities:
            raise ValueError(f"qmf history was saved for modalities {state['modalities']}, "
                             f"this model has {self.modalities}")
        self.index = {i: r for r, i in enumerate(state["ids"])}
        self.sums = state["sums"].detach().to("cpu", torch.float64).clone()


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class QMF(Method):
    """Per-modality classifiers fused by their energy confidence, calibrated by a ranking loss."""

    name = "qmf"
    Config = Config

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        self.heads = nn.ModuleDict({m: nn.Linear(enc.out_dim, spec.num_classes)
                                    for m, enc in self.encoders.items()})
        self.history = LossHistory(self.modalities)

    def unimodal_logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        feats = self.features(batch)
        return {m: self.heads[m](feats[m]) for m in self.modalities}

    def forward(self, batch: Batch) -> Output:
        per_mod = self.unimodal_logits(batch)
        t = self.options.energy_temperature
        conf = {m: energy_confidence(z, t) for m, z in per_mod.items()}
        return Output(confidence_fusion(per_mod, conf), per_mod)

    def sample_losses(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per-sample loss for the history: CE, or BCE averaged over classes (multi-label)."""
        if self.spec.multilabel:
            return F.binary_cross_entropy_with_logits(logits.float(), label.float(),
                                                      reduction="none").mean(1)
        return F.cross_entropy(logits.float(), label, reduction="none")

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        label, ids = batch["label"], [str(i) for i in batch["id"]]
        with ctx.autocast():
            per_mod = self.unimodal_logits(batch)
        per_mod = {m: z.float() for m, z in per_mod.items()}
        conf = {m: energy_confidence(z, self.options.energy_temperature) for m, z in per_mod.items()}
        fused = confidence_fusion(per_mod, conf)
        # History first, then the ranking targets, as in the reference: the current batch's
        # losses are part of ℓ̄.
        self.history.update(ids, torch.stack([self.sample_losses(per_mod[m], label)
                                              for m in self.modalities], dim=1))
        hist = self.history.normalised(ids).to(fused.device, torch.float32)
        ranks = {m: rank_loss(conf[m], hist[:, j]) for j, m in enumerate(self.modalities)}
        loss = (sum(self.criterion(per_mod[m], label) for m in self.modalities)
                + self.criterion(fused, label)
                + self.options.rank_weight * sum(ranks.values()))
        return self.backward_and_step(loss, optimizer, ctx, {
            **{f"qmf/conf_{m}": conf[m].mean() for m in self.modalities},
            **{f"qmf/rank_{m}": ranks[m] for m in self.modalities}})

    # The history is method state that must survive a checkpoint: nn.Module.state_dict() stores
    # it under "_extra_state" and load_state_dict() hands it back here.
    def get_extra_state(self) -> dict[str, Any]:
        return {"history": self.history.state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history.load(state["history"])
