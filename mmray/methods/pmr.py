"""PMR: Prototypical Modal Rebalance (METHODS.md §9).

Fan, Xu, Wang, Wang, Guo. "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023.
Reference code: https://github.com/fanyunfeng-bit/Modal-Imbalance-PMR, read at commit
3615e48983555089b0e693380087617c3797a641 (`main_Prototype_grad.py`: `train_epoch` with
`--modulation Proto`, `calculate_prototype`, `EU_dist`, `main`). BalanceBenchmark's re-run:
https://github.com/GeWu-Lab/BalanceBenchmark, `balancemm/trainer/PMR_trainer.py` and
`configs/trainer_config.yaml`, read at commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3.

The model is the Normal baseline (encoders + `LateFusion`, CE on the fused logits). Before each
epoch every modality gets class prototypes c_k^m, the mean feature of class k over (part of)
the train set, taken in eval mode without gradients and mixed with the previous ones,
c ← (1 − μ)·mean + μ·c_old. The features are the encoders' outputs h_m = `self.features(batch)`,
the fusion head's inputs; the reference's are the same place: `AVClassifier.forward` returns the
ResNet18 outputs after adaptive average pooling (over the frames too, for visual), flattened,
the inputs of its fusion module. Each step, per modality, the prototype logits are −d(h_m, c_k^m),
p^m = softmax over classes; the prototype score s_m = mean_i p^m_{y_i} over the batch, the ratio
ρ_m = s_m / mean_{n≠m} s_n, and

    loss = CE(z, y) + Σ_m β_m · PCE_m + Σ_m γ_m · Σ_k p^m_k log p^m_k   (batch means)

with PCE_m = CE(−d(h_m, c^m), y), β_m = α for a slow modality (ρ_m < 1), else 0 (nothing on a
tie); γ_m = μ_ent for a dominant one (ρ_m > 1) in the early epochs (< `entropy_ends`), else 0:
maximising the entropy of its prototype predictions slows its premature convergence. All of it
only inside the modulation window; elsewhere the step is Normal's. For two modalities (audio,
visual) this is the reference's `if ratio_a_p > 1: beta, lam = 0, alpha / elif < 1: alpha, 0 /
else: 0, 0`. Three modalities: the same rule on ρ_m over the mean of the others, mmray's
generalisation (see BalanceBenchmark's below). A step logs `loss/<m>` (CE of the head's
per-modality logits, as the reference logs), `pmr/pce_<m>`, `pmr/score_<m>`, `pmr/ratio_<m>`,
`pmr/ratio` (ρ of the first modality: the reference's `ratio_a_p`), `pmr/coef_<m>` (β_m) and
`pmr/entropy_coef_<m>` (γ_m); the prototype pass logs `pmr/proto_samples`.

Presets (`method.preset`):
- `reference`: what `main_Prototype_grad.py` runs, quirk by quirk:
  - `distance: euclidean`: `EU_dist` is sqrt((x − c)·(x − c)), the distance, not its square.
  - `proto_fraction: 0.1`: `calculate_prototype` stops once `sample_count >= all_num // 10`, so
    the prototypes are the class means over the first max(1, ⌊n/10⌋) of the n train batches
    (for AVE and CGMNIST it reads the whole validation set instead; not reproduced).
  - `momentum_from_epoch: 2`: `main` computes prototypes before epoch 0 and after each epoch e
    with `calculate_prototype(..., epoch=e, ...)`, which mixes in the old ones only if
    `epoch > 0`; so the prototypes used in epoch 1 are fresh class means, momentum from epoch 2.
  - `window_includes_end: true`: the test is `modulation_starts <= epoch <= modulation_ends`.
  - `entropy_weight: 0`: no script of the repository has the paper's entropy regularizer.
  The rest are the reference's argparse defaults and the Config defaults: α = 1 (`--alpha`),
  μ = 0.2 (`--momentum_coef`), the window 0..100 (of 150 epochs).
- `balancebench`: BalanceBenchmark's two-modality PMR (the headline table's): `alpha: 0.6`,
  `momentum: 0.5`, window 0..80 inclusive, euclidean distance, the first tenth of the batches,
  and `momentum_from_epoch: 1` (it computes the prototypes at the start of each epoch and mixes
  from epoch 1). It has no entropy term either. Its three-modality branch is another method:
  no prototype loss at all, but after the fused CE's backward an OGM-GE-like edit of every
  non-1-D gradient whose parameter name holds a modality's name: g ← k_m·g − N(0, (std g +
  1e-8)²), k_m = 1 − tanh(η·ρ_m) where ρ_m = s_m / min_n s_n > 1, else 1 (η = 0.01). Not
  reproduced: with three modalities this preset runs mmray's generalisation above.
- `paper`: {}, the Config defaults, METHODS.md §9's reading of the paper: squared Euclidean
  distance −‖h − c_k‖², prototypes over the whole train set, momentum as soon as earlier
  prototypes exist (epoch 1), the window [starts, ends), β_m by the code's α-or-0 rule, and the
  entropy regularizer on the dominant modality. Its weight μ_ent = 0.1 and its span (the first 10 epochs) are mmray's
  choices: the reference code has no value for them.

Where mmray differs from the reference implementation under every preset:
- Prototypes are refreshed in `before_epoch`, from the first `proto_fraction` of that epoch's
  own train batches (the order its steps get them); the reference computes them after each
  epoch (and before the first) on a fresh shuffle of the train loader. Both are a random part
  of the train set at the same weights, drawn differently. They are not refreshed after the
  window ends (the reference keeps computing them for its validation's prototype accuracy).
- A class without a sample in the pass keeps its previous prototype (zero before the first);
  the reference divides by a zero count (NaN prototypes, NaN loss).
- s_m is a mean over the batch where the reference sums: the same ratio when every modality is
  present. Missing modalities: prototypes, scores, PCE and entropy count only the samples where
  the modality is present; a modality absent from the whole batch has ρ = 1 (no term) and is
  left out of the others' means. The reference has no missing-modality path.
- The Euclidean distance is floored at 1e-6 (its square root's gradient at 0 is infinite).
- With several Ray Train workers the class sums and counts are summed over the workers
  (`ctx.reduce_sum`), so every worker holds the same prototypes, and so are the scores s_m of
  each step, so β, γ are the global batch's: N workers × batch B step as one process with batch
  N·B (with missing modalities PCE and entropy are each worker's masked means, averaged, which
  differ from the global batch's when the workers' counts of present samples differ).
- The `sum` fusion head has one bias (see OGM-GE's module docstring); the reference's
  `SumFusion` has one per branch. Only the reference's `concat` head is the same model.
- Multi-label datasets are rejected: prototypes are class means of samples of one label.
- Training-loop settings are `train.*`: the reference's defaults are SGD (momentum 0.9, weight
  decay 1e-4), lr 1e-4 decayed ×0.1 every 70 epochs, batch 64, 150 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, MethodConfig, StepContext, masked_mean
from mmray.methods.normal import Normal


@dataclass
class Config:
    # α, the weight of the slow modality's prototype cross-entropy: 1 in the reference
    # (`--alpha`), 0.6 in BalanceBenchmark.
    alpha: float = field(default=1.0, metadata=bounds(0.0, None))
    # First epoch of the modulation window (prototype and entropy terms).
    modulation_starts: int = field(default=0, metadata=bounds(0))
    # Last epoch of the window: excluded ([starts, ends)) unless window_includes_end. The
    # reference's default is 100 (of 150 epochs), BalanceBenchmark's 80.
    modulation_ends: int = field(default=100, metadata=bounds(0))
    # Include epoch modulation_ends ([starts, ends]), as the reference's `<=` does.
    window_includes_end: bool = False
    # d in the prototype logits −d(h, c_k): the squared distance ‖h − c_k‖² or the distance
    # ‖h − c_k‖ (the reference's EU_dist).
    distance: Literal["squared", "euclidean"] = "squared"
    # μ in c ← (1 − μ)·mean + μ·c_old: 0.2 in the reference (`--momentum_coef`), 0.5 in
    # BalanceBenchmark.
    momentum: float = field(default=0.2, metadata=bounds(0.0, 1.0))
    # First epoch whose prototypes are mixed with the previous ones (before it: fresh means);
    # the reference's is 2 (see the module docstring).
    momentum_from_epoch: int = field(default=1, metadata=bounds(1))
    # Part of the epoch's train batches the prototypes are averaged over: the first
    # max(1, ⌊n·fraction⌋) of its n batches; 1 = all. The reference's is 0.1. The pass costs
    # that part of an epoch in eval-mode forwards, each epoch.
    proto_fraction: float = field(default=1.0, metadata=bounds(0.0, 1.0, lo_open=True))
    # μ_ent, the weight of the dominant modality's negative prototype entropy Σ_k p_k log p_k
    # (maximising its entropy); 0 = no entropy term (the reference code has none).
    entropy_weight: float = field(default=0.1, metadata=bounds(0.0, None))
    # The entropy term acts in the epochs of the window before this one ("early training").
    entropy_ends: int = field(default=10, metadata=bounds(0))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.modulation_ends < self.modulation_starts:
            errors.append(f"{path}.modulation_ends: {self.modulation_ends} is before "
                          f"modulation_starts={self.modulation_starts}; the window starts there")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def prototype_logits(h: torch.Tensor, prototypes: torch.Tensor,
                     distance: Literal["squared", "euclidean"] = "squared") -> torch.Tensor:
    """−d(h_i, c_k) for every sample and class, (B, C): d = ‖h − c‖² or ‖h − c‖."""
    # The difference, not ‖h‖² − 2h·c + ‖c‖²: exact for near prototypes (B·C·d floats).
    sq = (h.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
    if distance == "euclidean":
        return -sq.clamp_min(1e-12).sqrt()  # sqrt's gradient at 0 is infinite
    return -sq


def prototype_scores(logits: torch.Tensor, label: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """s = mean_i softmax(−d(h_i, c))[y_i] over the present samples (no gradient)."""
    p = F.softmax(logits.detach(), dim=1).gather(1, label.view(-1, 1)).squeeze(1)
    return masked_mean(p, present)


def imbalance_ratios(scores: dict[str, torch.Tensor],
                     counted: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """ρ_m = s_m / mean_{n≠m} s_n over the modalities `counted` (those with a present sample in
    the batch); ρ = 1 for a modality not counted or with no counted other. Two modalities:
    s_a / s_v and its inverse."""
    names = list(scores)
    s = torch.stack([scores[m] for m in names])
    w = (torch.stack([counted[m] for m in names]) if counted is not None
         else torch.ones_like(s, dtype=torch.bool)).to(s.dtype)
    others_sum, others_n = (s * w).sum() - s * w, w.sum() - w
    ratio = s * others_n / others_sum  # s_m / (others_sum / others_n)
    ratio = torch.where((w > 0) & (others_n > 0), ratio, torch.ones_like(ratio))
    return dict(zip(names, ratio.unbind(), strict=True))


def pce_coefficients(ratios: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """β_m = α for a slow modality (ρ_m < 1), else 0; a tie (ρ = 1) weights nothing."""
    return {m: torch.where(r < 1, torch.full_like(r, alpha), torch.zeros_like(r))
            for m, r in ratios.items()}


def entropy_coefficients(ratios: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """γ_m = μ_ent for a dominant modality (ρ_m > 1), else 0."""
    return {m: torch.where(r > 1, torch.full_like(r, weight), torch.zeros_like(r))
            for m, r in ratios.items()}


def negative_entropy(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """mean_i Σ_k p_ik log p_ik over the present samples: minimising it maximises the entropy."""
    logp = F.log_softmax(logits, dim=1)
    return masked_mean((logp.exp() * logp).sum(1), present)


def refresh_prototypes(old: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                       momentum: float, mix: bool) -> torch.Tensor:
    """The class means sums / counts, mixed as (1 − μ)·mean + μ·old when `mix`; a class with
    no sample keeps `old`. sums (C, d), counts (C,)."""
    seen = counts > 0
    mean = sums / counts.clamp(min=1).unsqueeze(1)
    new = (1 - momentum) * mean + momentum * old if mix else mean
    return torch.where(seen.unsqueeze(1), new, old)


def proto_batch_count(batches_per_epoch: int, fraction: float) -> int | None:
    """How many of the epoch's first batches the prototypes read: max(1, ⌊n·fraction⌋), the
    reference's `sample_count >= all_num // 10` for 0.1; None = all of them."""
    if fraction >= 1:
        return None
    return max(1, int(batches_per_epoch * fraction + 1e-9))  # + 1e-9: n·0.3 may fall under an integer


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class PMR(Normal):
    """Normal late fusion plus prototype cross-entropy on the slow modality and prototype
    entropy on the dominant one, from class prototypes refreshed before each epoch."""

    name = "pmr"
    single_label = ("its prototypes are class means of samples of one label and its prototype "
                    "cross-entropy a softmax over them")
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # main_Prototype_grad.py's quirks, each named in the module docstring.
        "reference": {"distance": "euclidean", "proto_fraction": 0.1, "momentum_from_epoch": 2,
                      "window_includes_end": True, "entropy_weight": 0.0},
        # BalanceBenchmark's PMR_trainer.py with its trainer_config.yaml.
        "balancebench": {"alpha": 0.6, "modulation_ends": 80, "window_includes_end": True,
                         "distance": "euclidean", "momentum": 0.5, "momentum_from_epoch": 1,
                         "proto_fraction": 0.1, "entropy_weight": 0.0},
        # The Config defaults are METHODS.md's reading of the paper.
        "paper": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        for m, enc in self.encoders.items():
            self.register_buffer(f"prototypes_{m}", torch.zeros(spec.num_classes, enc.out_dim))
        self.refreshes = 0  # prototype passes so far (checkpointed as extra state)

    def prototypes(self, m: str) -> torch.Tensor:
        return getattr(self, f"prototypes_{m}")

    def active(self, epoch: int) -> bool:
        o = self.options
        if o.window_includes_end:
            return o.modulation_starts <= epoch <= o.modulation_ends
        return o.modulation_starts <= epoch < o.modulation_ends

    def window_over(self, epoch: int) -> bool:
        o = self.options
        return epoch > o.modulation_ends or (epoch == o.modulation_ends and not o.window_includes_end)

    # -- prototypes ---------------------------------------------------------------------------
    def before_epoch(self, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict[str, float]:
        """Refresh the class prototypes from this epoch's train batches (summed over workers)."""
        if self.window_over(ctx.epoch):
            return {}
        sums, counts, read = self._class_sums(ctx)
        o = self.options
        mix = self.refreshes > 0 and ctx.epoch >= o.momentum_from_epoch
        for m in self.modalities:
            buf = self.prototypes(m)
            buf.copy_(refresh_prototypes(buf.double(), sums[m], counts[m], o.momentum, mix))
        self.refreshes += 1
        return {"pmr/proto_samples": float(read)}

    @torch.no_grad()
    def _class_sums(self, ctx: StepContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                    torch.Tensor]:
        """Per modality, the sum of the features of each class (C, d) and their count (C,), over
        the first batches of the epoch (eval mode, as the reference), and the samples read; all
        summed over workers."""
        C = self.spec.num_classes
        limit = proto_batch_count(ctx.batches_per_epoch, self.options.proto_fraction)
        sums = {m: self.prototypes(m).new_zeros(self.prototypes(m).shape, dtype=torch.float64)
                for m in self.modalities}
        counts = {m: s.new_zeros(C) for m, s in sums.items()}
        read = next(iter(sums.values())).new_zeros(1)
        was_training = self.training
        self.eval()  # BatchNorm's running statistics, no dropout
        try:
            for i, batch in enumerate(ctx.train_batches()):
                if limit is not None and i >= limit:
                    break
                with ctx.autocast():
                    feats = self.features(batch)
                read += len(batch["label"])
                for m in self.modalities:
                    w = batch["present"][m].to(torch.float64)
                    sums[m].index_add_(0, batch["label"], feats[m].double() * w.unsqueeze(1))
                    counts[m].index_add_(0, batch["label"], w)
        finally:
            self.train(was_training)
        # One all-reduce for everything: every worker calls it once, whatever its batch count.
        flat = ctx.reduce_sum(torch.cat([read, *(t.flatten() for m in self.modalities
                                                 for t in (sums[m], counts[m]))]))
        out_sums, out_counts, at = {}, {}, 1
        for m in self.modalities:
            n = sums[m].numel()
            out_sums[m] = flat[at:at + n].view_as(sums[m])
            out_counts[m] = flat[at + n:at + n + C]
            at += n + C
        return out_sums, out_counts, flat[0]

    # -- training -----------------------------------------------------------------------------
    def prototype_terms(self, feats: dict[str, torch.Tensor], batch: Batch, epoch: int,
                        ctx: StepContext | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Σ_m β_m·PCE_m + γ_m·(−H_m) and the values to log; s_m over the global batch (summed
        over the workers with `ctx`)."""
        o = self.options
        label, present = batch["label"], batch["present"]
        logits, pce, scores = {}, {}, {}
        for m in self.modalities:
            h = feats[m]
            h = h.to(torch.promote_types(h.dtype, torch.float32))  # bf16 under autocast
            logits[m] = prototype_logits(h, self.prototypes(m).to(h.dtype), o.distance)
            pce[m] = masked_mean(F.cross_entropy(logits[m], label, reduction="none"), present[m])
            scores[m] = prototype_scores(logits[m], label, present[m])
        counts = {m: present[m].to(torch.float64).sum() for m in self.modalities}
        if ctx is not None and ctx.world_size > 1:  # the global batch's means: Σ s·n / Σ n
            local = torch.stack([t for m in self.modalities
                                 for t in (scores[m].double() * counts[m], counts[m])])
            summed = ctx.reduce_sum(local).view(-1, 2)
            for i, m in enumerate(self.modalities):
                counts[m] = summed[i, 1]
                scores[m] = (summed[i, 0] / counts[m].clamp(min=1)).to(scores[m].dtype)
        ratios = imbalance_ratios(scores, {m: counts[m] > 0 for m in self.modalities})
        on = self.active(epoch)
        betas = pce_coefficients(ratios, o.alpha if on else 0.0)
        ent_weight = o.entropy_weight if on and epoch < o.entropy_ends else 0.0
        gammas = entropy_coefficients(ratios, ent_weight)
        penalty = sum(betas[m] * pce[m] for m in self.modalities)
        if ent_weight > 0:
            penalty = penalty + sum(gammas[m] * negative_entropy(logits[m], present[m])
                                    for m in self.modalities)
        logs = {"pmr/ratio": ratios[self.modalities[0]]}
        for m in self.modalities:
            logs.update({f"pmr/pce_{m}": pce[m], f"pmr/score_{m}": scores[m],
                         f"pmr/ratio_{m}": ratios[m], f"pmr/coef_{m}": betas[m],
                         f"pmr/entropy_coef_{m}": gammas[m]})
        return penalty, logs

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            feats = self.features(batch)
            fused, per_mod = self.head(feats)
        label = batch["label"]
        loss = self.criterion(fused, label)
        logs = {f"loss/{m}": self.criterion(per_mod[m].detach(), label) for m in self.modalities}
        # Without prototypes yet (a step before any `before_epoch`) or after the window: Normal.
        if self.refreshes and not self.window_over(ctx.epoch):
            penalty, extra = self.prototype_terms(feats, batch, ctx.epoch, ctx)
            loss = loss + penalty
            logs.update(extra)
        return self.backward_and_step(loss, optimizer, ctx, logs)

    # The prototypes are buffers (in state_dict); the pass count that decides the momentum and
    # whether prototypes exist rides along as extra state.
    def get_extra_state(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.refreshes = int(state["refreshes"])
