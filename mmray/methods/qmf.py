"""QMF: Quality-aware Multimodal Fusion (METHODS.md §3).

Zhang et al. "Provable Dynamic Fusion for Low-Quality Multimodal Data", ICML 2023. Reference code:
https://github.com/QingyangZhang/QMF, read at commit fe6c4c6ef7cb23f0a89594ee413d485f1854268b.

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

Presets (`method.preset`). The reference repository has two training scripts that differ:

- `reference`: the text-image branch, the one the repository's README gives a QMF command for
  (`text-image-classification/train_qmf.py`), the one MLA's re-run follows, and the nearest to
  mmray's image-text and audio-visual datasets. Its quirks, each an option:
  - the fusion detaches the confidences (`src/models/late_fusion.py`, `args.df`, default true):
    `detach_confidence: true`;
  - the batch's per-sample losses enter the history before the ranking targets are read
    (`train_qmf.py: model_forward` calls `correctness_update` before `rank_loss`):
    `update_history_first: true`;
  - the ranking losses are added unweighted (`crl_loss = text_rank_loss + image_rank_loss`):
    `rank_weight: 1`;
  - the history is an array sized to the training set, zero for samples not seen yet, and the
    min–max runs over the whole array (`src/utils/utils.py: History.correctness_normalize`), so
    during the first epoch the minimum is 0: `unseen_as_zero: true`.
- `reference_rgbd`: the RGB-D branch (`RGBD-scene-recognition/train_QMF_nyud2.py:
  model_forward_train`, `models/QMF.py`, `utils/crl_utils.py: History`):
  - the fusion `depth_out*depth_conf + rgb_out*rgb_conf` does not detach, so the fused CE trains
    the confidences too: `detach_confidence: false`;
  - `rank_loss` reads the history before `correctness_update` adds the batch:
    `update_history_first: false`;
  - `loss = clf_loss + args.lamb*(...)` with `--lamb 0.1` for NYUD2 (`train_QMF_sun.py` uses 1):
    `rank_weight: 0.1`;
  - the same History array: `unseen_as_zero: true`.
- `mla`: MLA's re-run of QMF on CREMA-D (github.com/Cecile-hi/Multimodal-Learning-with-
  Alternating-Unimodal-Adaptation at ab6c184579f9ff390e9c9b8216c9900c2a43545b, `main.py:
  train_epoch` with `--modulation QMF`, and `utils/utils.py: History`): the text-image branch
  with `loss = cml_loss + clf_loss + 0.1 * crl_loss`, i.e. `reference` with `rank_weight: 0.1`
  (its M3AE branches, which mmray does not run, drop CE(z)).
- `paper`: {}, the Config defaults, which are METHODS.md §3's reading of the paper: the text-image
  branch with the history normalised over the samples seen so far.

Where mmray differs from the reference implementation, whatever the preset:
- The history is keyed by the batch's stable sample ids (`batch["id"]`) instead of dataset
  positions, and it is saved with the checkpoint (the reference rebuilds it empty on resume).
  `unseen_as_zero` knows that samples remain unseen from the loop's counters (first epoch, and
  not yet its last batch in the history), as the history cannot know the training set's size.
- When every history value is equal (the RGB-D branch's first batch, whose history is all
  zero), the reference's min–max is 0/0 and its logged ranking loss NaN (with a zero gradient);
  mmray counts those pairs as ties: a ranking loss of 0 and the same zero gradient.
- Training-loop settings are `train.*`, not method options: the reference accumulates gradients
  over 24 (text-image) or 3 (RGB-D) batches, dividing the loss by that count; mmray steps every
  batch. Text-image: Adam lr 5e-5; RGB-D: Adam lr 1e-4, weight decay 1e-5; both reduce the
  learning rate on a validation plateau.
- c_m uses the stable logsumexp where the reference takes log(Σ exp z) (the same unless a logit
  overflows exp); `energy_temperature` generalises the fixed T = 1; multi-label datasets use BCE
  for every term, and the per-sample history loss is the BCE averaged over classes.
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
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext, per_sample_loss


@dataclass
class Config:
    # λ_rank, weight of the confidence ranking loss: 1 in QMF's text-image and SUN RGB-D runs,
    # 0.1 in its NYUD2 run and in MLA's re-run.
    rank_weight: float = field(default=1.0, metadata=bounds(0.0, None))
    # T in c_m = T·logsumexp(z_m / T) / 10; QMF uses T = 1.
    energy_temperature: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))
    # Fuse with stopgrad(c_m), so only the ranking loss trains the confidences (text-image
    # branch); false: the fused CE trains them too (RGB-D branch).
    detach_confidence: bool = True
    # Add the batch's per-sample losses to the history before reading the ranking targets
    # (text-image branch); false: rank against the history of the batches before (RGB-D branch).
    update_history_first: bool = True
    # Min–max as over the reference's history array sized to the training set: in the first
    # epoch, while some samples are unseen, their zero loss takes part (the minimum is 0);
    # false: over the ids seen so far.
    unseen_as_zero: bool = False


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def energy_confidence(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """c = T·logsumexp(z / T) / 10 per sample, shape (B,)."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1) / 10


def confidence_fusion(per_modality: dict[str, torch.Tensor], confidence: dict[str, torch.Tensor],
                      detach: bool = True) -> torch.Tensor:
    """z = Σ_m stopgrad(c_m)·z_m (or Σ_m c_m·z_m without `detach`), c_m broadcast over classes."""
    return sum((confidence[m].detach() if detach else confidence[m]).unsqueeze(1) * z
               for m, z in per_modality.items())


def rank_loss(confidence: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """mean_i max(0, t·(c(i) − c(j)) − |ℓ̄(i) − ℓ̄(j)|), j = i+1 (mod B), t = sign(ℓ̄(i) − ℓ̄(j)).

    t and the margin are taken in the history's precision (float64) before they meet the
    confidences, so that two histories closer than float32 can resolve still rank.
    """
    diff = history - torch.roll(history, -1)
    t, margin = torch.sign(diff).to(confidence), diff.abs().to(confidence)
    return torch.clamp(t * (confidence - torch.roll(confidence, -1)) - margin, min=0).mean()


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

    def normalised(self, ids: list[str], unseen_remain: bool = False) -> torch.Tensor:
        """ℓ̄ = (sum − min) / (max − min) per modality over all ids seen; 0 where max = min.

        `unseen_remain`: samples not seen yet take part with a zero sum (min ≤ 0 ≤ max).
        """
        lo, hi = self.sums.min(0).values, self.sums.max(0).values
        if unseen_remain:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
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
    # The module docstring names the file and commit each option comes from.
    presets = {
        "reference": {"rank_weight": 1.0, "detach_confidence": True,
                      "update_history_first": True, "unseen_as_zero": True},
        "reference_rgbd": {"rank_weight": 0.1, "detach_confidence": False,
                           "update_history_first": False, "unseen_as_zero": True},
        "mla": {"rank_weight": 0.1, "detach_confidence": True,
                "update_history_first": True, "unseen_as_zero": True},
        "paper": {},
    }

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

    def unseen_remain(self, ctx: StepContext) -> bool:
        """Whether, as the ranking targets are read, some training samples have not entered the
        history yet (`unseen_as_zero`): in the first epoch, unless this is its last batch and the
        history already holds it."""
        if not self.options.unseen_as_zero or ctx.epoch > 0:
            return False
        last = ctx.batch_idx >= ctx.batches_per_epoch - 1
        return not (last and self.options.update_history_first)

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        label, ids = batch["label"], [str(i) for i in batch["id"]]
        opts = self.options
        with ctx.autocast():
            per_mod = self.unimodal_logits(batch)
        per_mod = {m: z.float() for m, z in per_mod.items()}
        conf = {m: energy_confidence(z, opts.energy_temperature) for m, z in per_mod.items()}
        fused = confidence_fusion(per_mod, conf, detach=opts.detach_confidence)
        losses = torch.stack([per_sample_loss(per_mod[m], label, self.spec.multilabel) for m in self.modalities], 1)
        if opts.update_history_first:  # the batch's own losses are part of ℓ̄
            self.history.update(ids, losses)
        else:  # ℓ̄ of the batches before; an id seen for the first time enters with a zero sum
            self.history.rows(ids, grow=True)
        hist = self.history.normalised(ids, self.unseen_remain(ctx))
        ranks = {m: rank_loss(conf[m], hist[:, j]) for j, m in enumerate(self.modalities)}
        if not opts.update_history_first:
            self.history.update(ids, losses)
        loss = (sum(self.criterion(per_mod[m], label) for m in self.modalities)
                + self.criterion(fused, label)
                + opts.rank_weight * sum(ranks.values()))
        return self.backward_and_step(loss, optimizer, ctx, {
            **{f"qmf/conf_{m}": conf[m].mean() for m in self.modalities},
            **{f"qmf/rank_{m}": ranks[m] for m in self.modalities}})

    # The history is method state that must survive a checkpoint: nn.Module.state_dict() stores
    # it under "_extra_state" and load_state_dict() hands it back here.
    def get_extra_state(self) -> dict[str, Any]:
        return {"history": self.history.state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history.load(state["history"])
