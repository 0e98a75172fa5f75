"""OPM: On-the-fly Prediction Modulation (METHODS.md §9).

Wei, Hu, Du, Wen. "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(arXiv 2410.11582). Reference code: https://github.com/GeWu-Lab/BML_TPAMI2024 read at commit
4b3aa4fd841856c4acbebf48549e6c59fbf7635e: `code/models/Classifier.py` (`Classifier.forward`,
`calcu_q`, `Modality_drop.execute_drop`, `custom_autograd`), `code/models/fusion_model.py`
(`ConcatFusion`), `code/main.py` (`train`, the warm-up) and `code/scripts/train_opm.sh`. The
benchmark's re-implementation: https://github.com/GeWu-Lab/BalanceBenchmark,
`balancemm/trainer/OPM_trainer.py` and `configs/trainer_config.yaml`, commit
4c1482fca5aaa8d4278af8e26020daa039e3ccf3.

The model is the Normal baseline (encoders + `LateFusion`, one loss on the fused logits). Each
train step:
1. scores s_m = Σ_i softmax(z_m,i)[y_i] from the per-modality logits of the fusion head (its block
   for modality m plus b/M) on the *undropped* features, as the reference's `performance_m`;
2. ratio_m = tanh(relu(s_m / s_other − 1)), s_other the other modality's score (with more than
   two: the mean, or the sum, of the others');
3. drop probability q_m = clip(q_base·(1 + α·ratio_m), 0, 1) where ratio_m > 0, else 0: only a
   dominant modality is dropped;
4. with probability p_exe the step drops: each sample's features h_m are zeroed with probability
   q_m (one Bernoulli draw per sample and modality), and every modality's features, kept or not,
   are divided by 1 − θ, θ = Σ_m d_m q_m / Σ_m d_m (d_m the feature widths; 1 − θ is the
   expected share of the width kept); otherwise no feature is touched;
5. the fused logits are the head on those features; one CE loss on them, averaged over the
   samples that kept at least one modality (the reference's `update_flag`: a sample whose every
   modality was dropped leaves the loss).
Evaluation (`forward`, `predict`) never drops. Without BalanceBenchmark's `overwrite_scores` the
weakest modality always has ratio 0, so q = 0 for it, every sample keeps a modality and the
removal in step 5 never removes one.

A step logs the fused loss, each modality's own loss `loss/<m>` (CE of z_m, as the reference
logs), `opm/ratio_<m>`, `opm/drop_prob_<m>` (q_m; 0 outside the window), `opm/dropped_<m>` (the
fraction of the batch whose h_m was zeroed) and `opm/executed` (1 when the step dropped).

Presets (`method.preset`):
- `paper` ({}): the Config defaults: METHODS.md's formula, with the authors' code where it says
  more (the p_exe coin, the 1/(1 − θ) rescaling); with more than two modalities the ratio is
  taken over the mean of the others (mmray's choice), and every epoch is modulated.
- `reference`: the authors' code (`train_opm.sh`: `--q_base 0.5 --lam 0.5 --p_exe 0.7`, the
  Config defaults) quirk by quirk:
  - `modulation_starts: 6`: `main.py` hard-codes `warm_up = 1 if epoch <= 5`; epochs 0–5 train
    plainly and OPM runs from epoch 6 to the end (its `modulation_starts/ends` are OGM's only).
  - `theta_grad: theta`: the scores are not detached (only the head's weights are, in
    `Classifier.forward`), `calcu_q` assigns them into q, so θ carries a graph, and
    `custom_autograd.backward` returns `theta` itself as θ's gradient: besides the CE gradient
    every encoder gets θ·∂θ/∂φ through the scores of both modalities (steps that drop only).
    Descending it lowers θ, i.e. the dominant modality's lead. (The forward divides by
    1 − θ.item(): no gradient of the loss itself reaches θ.)
  - `ratio_over: sum`: the authors' code has two modalities only; for three, BalanceBenchmark's
    ρ_m = s_m / Σ_{n≠m} s_n (the same as the mean for two).
- `balancebench`: BalanceBenchmark's trainer, which produced the headline table and differs:
  - `overwrite_scores: true`: it computes the ratios modality by modality with
    `ratios[m] = scores[m]` followed by an in-place `ratios[m] /= (...)`, so each modality's
    score is replaced by its raw ratio s_m / s_other before the next modality's ratio is taken:
    with (audio, visual) the visual ratio is s_v / (s_a / s_v), above 1 whenever s_v² > s_a,
    i.e. nearly always (scores are sums over the batch), and near 1 once s_v² ≫ s_a. So the
    second modality is dropped in most steps whichever dominates, with q near q_base·(1 + α),
    besides the first when it dominates; samples that lose both leave the loss.
  - `theta_grad: rescale`: its scores are not detached either (the per-modality logits read
    `fc_out` with its graph) and its θ divides the features as a tensor, so the loss's own
    gradient through 1/(1 − θ + 1e-5) reaches the encoders and the fusion head through the
    scores (and through the overwritten ones).
  - `q_base: 0.4` (the authors' `config.py` value, which their argparse default 0.5 overrides).
  - No warm-up, and the window [0, 80] with its last epoch included (`modulation_ends: 80`,
    `window_includes_end: true`); outside it the trainer computes no loss at all and fails.
  - 1e-5 added to the ratio's denominator (`ratio_eps`) and to 1 − θ (`rescale_eps`).
  α = 0.5 and p_exe = 0.7 as the authors'. At that commit the trainer also calls
  `model.Unimodality_Calculate()`, which no model defines (they have `unimodality_calculate`,
  which their forward already runs); the port leaves the call out.

The reference's OGM (`main.py --use_modulation`, `train_ogm.sh`) is not part of this method: its
coefficient is OGM-GE's 1 − tanh(α·ρ) on 4-D encoder gradients with Gaussian noise, which is
`method.name=ogm_ge` with `preset: reference` and `alpha: 0.8, modulation_starts: 6,
modulation_ends: 60` (the warm-up, `train_ogm.sh`'s window); the one difference is its tie rule
(ρ = 1 exactly modulates the second modality, ogm_ge's reference chain the first). Its
`--use_OGM_plus` (the weak modality's gradients times 4) has no counterpart.

Where mmray differs from the reference implementation under every preset:
- Randomness comes from torch's global generator on the features' device (the loop seeds it each
  epoch, so a resumed run draws the same). The reference draws the p_exe coin with numpy
  (`np.random.rand(1)`) and the mask with torch (the authors' on the CPU); mmray draws the coin with
  `torch.rand` and, to avoid a host sync per step, always draws the mask (used only when the
  coin says drop), so the stream after a step that does not drop differs from the reference's.
  Within a step the draws are the reference's: the coin, then the mask as
  `Bernoulli(1 − q).sample([B, 1])` lays it out.
- The authors' `Classifier.py` at that commit does not parse (a stray `]` after `torch.chunk(...)`
  in `execute_drop`); mmray follows the evident intent, which BalanceBenchmark also runs.
- The scores are computed once per step with tensor ops, without the reference's Python loop and
  `.item()` per sample.
- The `sum` fusion head: the reference has concat fusion only (its `SumFusion` is not wired to
  OPM); with mmray's `sum` head the scores use its blocks plus b/M as for concat.
- Missing modalities: features of an absent modality are zero before the drop (mmray's rule);
  its logits z_m = b/M still enter s_m, as for every mmray method that scores modalities.
- A step in which every sample lost every modality (possible only with `overwrite_scores`) is
  skipped by the authors' code and fails in BalanceBenchmark's (a loss over no samples); mmray
  steps with a zero loss, so momentum and weight decay still move the weights.
- With several Ray Train workers the scores are summed over the workers (the global batch's),
  the coin is drawn alike on every worker and the mask is drawn for the global batch, each
  worker keeping its rows of it: N workers × batch B step as one process with batch N·B under
  `theta_grad: none` (the default) when no sample loses every modality. Under `theta_grad:
  theta`/`rescale` the gradient through the scores is each worker's own part (the value is the
  global one), and a sample that lost every modality leaves its worker's mean, not the global
  batch's: those steps differ from one process's.
- Multi-label datasets are rejected: s_m is the softmax probability of one label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from mmray.config import bounds
from mmray.methods.base import Batch, StepContext
from mmray.methods.normal import Normal


@dataclass
class Config:
    # Base drop probability q_base of a dominant modality (the authors' script: 0.5;
    # BalanceBenchmark: 0.4).
    q_base: float = field(default=0.5, metadata=bounds(0.0, 1.0))
    # α (the authors' `lam`) in q = q_base·(1 + α·ratio): how much the discrepancy raises q.
    alpha: float = field(default=0.5, metadata=bounds(0.0))
    # Probability that a step drops at all (the reference's `p_exe`); otherwise it trains plainly.
    p_exe: float = field(default=0.7, metadata=bounds(0.0, 1.0))
    # First epoch that drops (the authors' warm-up trains epochs 0–5 plainly: 6).
    modulation_starts: int = field(default=0, metadata=bounds(0))
    # Last epoch of the window, excluded unless window_includes_end; null: no end.
    modulation_ends: int | None = field(default=None, metadata=bounds(0))
    # Drop in epoch modulation_ends too ([starts, ends]), as BalanceBenchmark's `<=` does.
    window_includes_end: bool = False
    # s_other with more than two modalities: the mean of the others' scores, or their sum
    # (BalanceBenchmark's 3-modality branch). The same for two.
    ratio_over: Literal["mean", "sum"] = "mean"
    # Added to s_other in s_m / s_other (BalanceBenchmark: 1e-5).
    ratio_eps: float = field(default=0.0, metadata=bounds(0.0))
    # Divide the features by 1 − θ when a step drops (the reference does); false: dropped
    # features are zeroed and kept ones left as they are.
    rescale: bool = True
    # Added to 1 − θ (BalanceBenchmark: 1e-5).
    rescale_eps: float = field(default=0.0, metadata=bounds(0.0))
    # BalanceBenchmark's aliasing: ratios are taken modality by modality (the dataset's order),
    # each score replaced by its raw ratio s_m / s_other before the next modality's is computed.
    overwrite_scores: bool = False
    # A gradient through θ into the scores: none (q is a constant); theta: the authors' autograd
    # function hands θ itself to θ as its gradient, so the encoders also get θ·∂θ/∂φ (scores
    # from the head's detached weights); rescale: BalanceBenchmark's, the loss's own gradient
    # through 1/(1 − θ + eps) into the scores, the encoders and the fusion head.
    theta_grad: Literal["none", "theta", "rescale"] = "none"

    def validate(self, path: str, errors: list[str]) -> None:
        if self.modulation_ends is not None and self.modulation_ends < self.modulation_starts:
            errors.append(f"{path}.modulation_ends: {self.modulation_ends} is before "
                          f"modulation_starts={self.modulation_starts}; the window starts there")
        if (self.overwrite_scores and self.rescale and self.rescale_eps == 0
                and self.q_base * (1 + self.alpha) >= 1):
            # Every modality can then reach q = 1, θ = 1 and a division by zero.
            errors.append(f"{path}.rescale_eps: 0 with overwrite_scores and q_base·(1 + alpha) "
                          f"= {self.q_base * (1 + self.alpha):g} ≥ 1 divides by 1 − θ = 0 when "
                          f"every modality is dropped for sure; set rescale_eps > 0 (e.g. 1e-5)")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def opm_scores(per_modality_logits: dict[str, torch.Tensor], label: torch.Tensor,
               detach: bool = True) -> dict[str, torch.Tensor]:
    """s_m = Σ_i softmax(z_m,i)[y_i]: the batch's summed probability of the true class."""
    idx = label.view(-1, 1)
    return {m: F.softmax((z.detach() if detach else z).float(), dim=1).gather(1, idx).sum()
            for m, z in per_modality_logits.items()}


def opm_ratios(scores: dict[str, torch.Tensor], over: Literal["mean", "sum"] = "mean",
               eps: float = 0.0, overwrite_scores: bool = False) -> dict[str, torch.Tensor]:
    """ratio_m = tanh(relu(s_m / (s_other + eps) − 1)): 0 unless m dominates, below 1 always.
    `overwrite_scores`: in the dict's order, s_m is replaced by s_m / (s_other + eps) once its
    ratio is taken, and later modalities' s_other read the replaced values (BalanceBenchmark)."""
    current = dict(scores)
    out = {}
    for m in scores:
        others = torch.stack([current[n] for n in scores if n != m])
        raw = current[m] / ((others.sum() if over == "sum" else others.mean()) + eps)
        if overwrite_scores:
            current[m] = raw
        out[m] = torch.tanh(torch.relu(raw - 1))
    return out


def drop_probabilities(ratios: dict[str, torch.Tensor], q_base: float,
                       alpha: float) -> dict[str, torch.Tensor]:
    """q_m = clip(q_base·(1 + α·ratio_m), 0, 1) where ratio_m > 0, else 0."""
    return {m: torch.where(r > 0, q_base * (1 + alpha * r), torch.zeros_like(r)).clamp(0.0, 1.0)
            for m, r in ratios.items()}


def dropped_share(q: dict[str, torch.Tensor], dims: dict[str, int]) -> torch.Tensor:
    """θ = Σ_m d_m q_m / Σ_m d_m: the expected share of the feature width a drop removes."""
    return sum(d * q[m] for m, d in dims.items()) / sum(dims.values())


def returned_theta(theta: torch.Tensor, executed: torch.Tensor) -> torch.Tensor:
    """A zero-valued term whose gradient is θ·∂θ/∂φ when the step dropped: what the authors'
    `custom_autograd` adds by returning θ as θ's gradient."""
    term = theta.detach() * theta * executed.to(theta.dtype)
    return term - term.detach()


def kept_loss(logits: torch.Tensor, label: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """CE averaged over the samples that kept at least one modality (keep: (B, M)); 0 when none
    did (the reference skips such a step; a zero loss steps with a zero gradient)."""
    ce = F.cross_entropy(logits.float(), label, reduction="none")
    kept = (keep.sum(1) > 0).to(ce.dtype)
    return (ce * kept).sum() / kept.sum().clamp(min=1)


def drop_features(feats: dict[str, torch.Tensor], q: dict[str, torch.Tensor], p_exe: float,
                  rescale: bool = True, rescale_eps: float = 0.0,
                  rows: tuple[int, int, int] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Zero h_m of each sample with probability q_m, and divide every h by 1 − θ (+ eps), when a
    coin with probability p_exe says so. Returns the features, the keep mask (B, M) in `feats`'
    order and whether the step dropped (a 0-dim bool tensor: no host sync).

    Draws, from torch's global generator on the features' device: the coin, then the (B, M)
    mask in the layout of the reference's `Bernoulli(1 − q).sample([B, 1])`. The mask is drawn
    even when the coin says no (instead of a host sync to skip it). `rows` (global batch size,
    rank, workers): draw the global batch's mask and keep this worker's rows of it (rank,
    rank + workers, ...), so that workers seeded alike drop what one process would."""
    mods = list(feats)
    h0 = feats[mods[0]]
    batch, device = h0.shape[0], h0.device
    qs = torch.stack([q[m] for m in mods]).to(device)
    executed = torch.rand((), device=device) >= 1 - p_exe
    total, rank, world = rows or (batch, 0, 1)
    drawn = torch.bernoulli((1 - qs.detach()).expand(total, len(mods)))[rank::world]
    keep = torch.where(executed, drawn, torch.ones_like(drawn))
    if rescale:  # a q with a graph (theta_grad: rescale) passes its gradient on through θ
        theta = dropped_share(q, {m: feats[m].shape[1] for m in mods}).to(device)
        denom = torch.where(executed, 1 - theta + rescale_eps, torch.ones_like(theta))
    else:
        denom = torch.ones((), device=device, dtype=qs.dtype)
    out = {m: feats[m] * keep[:, i:i + 1].to(feats[m].dtype) / denom.to(feats[m].dtype)
           for i, m in enumerate(mods)}
    return out, keep, executed


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class OPM(Normal):
    """Normal late fusion whose dominant modality's features are dropped at random in training."""

    name = "opm"
    single_label = "its discrepancy scores are the softmax probability of one label"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The authors' code's quirks, each named in the module docstring.
        "reference": {"modulation_starts": 6, "ratio_over": "sum", "theta_grad": "theta"},
        # BalanceBenchmark's OPM trainer (the headline table).
        "balancebench": {"overwrite_scores": True, "theta_grad": "rescale", "q_base": 0.4, "modulation_ends": 80, "window_includes_end": True,
                         "ratio_over": "sum", "ratio_eps": 1e-5, "rescale_eps": 1e-5},
        # The Config defaults are the paper's reading.
        "paper": {},
    }

    def active(self, epoch: int) -> bool:
        o = self.options
        if o.modulation_ends is None:
            return o.modulation_starts <= epoch
        if o.window_includes_end:
            return o.modulation_starts <= epoch <= o.modulation_ends
        return o.modulation_starts <= epoch < o.modulation_ends

    def score_logits(self, feats: dict[str, torch.Tensor],
                     per_mod: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logits s_m is taken from: the head's per-modality logits, or under
        `theta_grad: theta` the same from the head's detached weights (the authors' scores)."""
        if self.options.theta_grad != "theta":
            return per_mod
        head = self.head
        share = (head.fc.bias if head.mode == "concat" else head.bias).detach() / len(feats)
        return {m: F.linear(h, head.weight_of(m).detach()) + share for m, h in feats.items()}

    def global_scores(self, scores: dict[str, torch.Tensor], rows: int, ctx: StepContext
                      ) -> tuple[dict[str, torch.Tensor], int]:
        """The scores and row count of the global batch (summed over the workers; the same with
        one). A score with a graph (theta_grad) keeps only this worker's part of its gradient."""
        if ctx.world_size == 1:
            return scores, rows
        local = torch.stack([scores[m] for m in self.modalities])
        summed = ctx.reduce_sum(torch.cat([local.detach().double(),
                                           torch.tensor([float(rows)], dtype=torch.float64, device=local.device)]))
        glob = local + (summed[:-1].to(local.dtype) - local).detach()
        return dict(zip(self.modalities, glob.unbind(), strict=True)), int(summed[-1])

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        o = self.options
        on = self.active(ctx.epoch)
        with ctx.autocast():
            feats = self.features(batch)
            logits, per_mod = self.head(feats)  # scores from the undropped features
            scores = opm_scores(self.score_logits(feats, per_mod), batch["label"],
                                detach=o.theta_grad == "none")
        scores, total = self.global_scores(scores, len(batch["label"]), ctx)
        ratios = opm_ratios(scores, o.ratio_over, o.ratio_eps, o.overwrite_scores)
        q = drop_probabilities(ratios, o.q_base, o.alpha)
        if on:
            q_drop = q if o.theta_grad == "rescale" else {m: v.detach() for m, v in q.items()}
            dropped, keep, executed = drop_features(feats, q_drop, o.p_exe, o.rescale, o.rescale_eps,
                                                    rows=(total, ctx.rank, ctx.world_size))
            with ctx.autocast():
                logits, _ = self.head(dropped)
            loss = kept_loss(logits, batch["label"], keep)
            if o.theta_grad == "theta" and o.rescale:
                dims = {m: h.shape[1] for m, h in feats.items()}
                loss = loss + returned_theta(dropped_share(q, dims), executed)
        else:  # outside the window: the Normal step, nothing drawn
            q = {m: torch.zeros_like(v) for m, v in q.items()}
            keep = torch.ones(len(batch["label"]), len(self.modalities), device=logits.device)
            executed = torch.zeros((), dtype=torch.bool, device=logits.device)
            loss = self.criterion(logits, batch["label"])
        logs: dict[str, Any] = {"opm/executed": executed.float()}
        for i, m in enumerate(self.modalities):
            logs[f"loss/{m}"] = self.criterion(per_mod[m].detach(), batch["label"])
            logs[f"opm/ratio_{m}"] = ratios[m]
            logs[f"opm/drop_prob_{m}"] = q[m]
            logs[f"opm/dropped_{m}"] = 1 - keep[:, i].mean()
        return self.backward_and_step(loss, optimizer, ctx, logs)
