"""G-Blending: Gradient-Blending of unimodal and fused losses (METHODS.md §9).

Wang, Tran, Feiszli. "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020.
There is no author code; the reference is BalanceBenchmark's trainer,
https://github.com/GeWu-Lab/BalanceBenchmark (`balancemm/trainer/GBlending_trainer.py`:
`super_epoch_origin`, `training_step`; `balancemm/models/avclassify_model.py`; `balancemm/train.py`
for the copies' model and optimizer; `configs/trainer_config.yaml`: `super_epoch: 10`, `online`),
read at commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3. That trainer produced BalanceBenchmark's
headline numbers, so there is no second implementation to tell apart.

The model is late fusion (`LateFusion`) with a unimodal head per modality. Each step minimises
L = Σ_k w_k L_k over the losses k ∈ {each modality's unimodal loss, the fused loss}. The weights
are estimated at the start of every epoch that is a multiple of `super_epoch` (`before_epoch`):
for each loss k a copy of the model (deepcopy, an optimizer of the run's class and hyper-parameters
with fresh state) trains on L_k alone for `super_epoch` epochs; with L^T (train) and L^V
(held-out) measured at two points N (before) and N+n (after),

    G_k = L^V_N − L^V_{N+n}   (generalization: how much the held-out loss fell)
    O_k = (L^V_{N+n} − L^T_{N+n}) − (L^V_N − L^T_N)   (the change of the overfitting gap)
    w_k = (G_k / O_k²) / Σ_j (G_j / O_j²).

The held-out set is a fixed part of train: the samples whose id hashes (blake2b of
"<heldout_seed>:<id>") below `heldout_fraction`. The copies never train on it, and it gives their
held-out loss; the main model still trains on all of train. A step logs `loss/<k>` for every k;
each epoch logs `gblend/w_<k>`, `gblend/o_<k>`, `gblend/g_<k>` and `gblend/estimated_at` (the
epoch of the last estimate). The weights, O, G and the four measured losses are buffers, so a
resumed run goes on with exactly the weights it had (and an estimate epoch is redone exactly:
the loop re-seeds each epoch before `before_epoch`).

Guards (mmray's, every preset): O² is floored at `min_o2` (the reference divides the Python float
by 0.0 and raises ZeroDivisionError); a weight that is not finite counts as 0; when every weight
is 0 (no loss generalised), the weights are equal (1/K). A loss whose held-out loss rose (G < 0)
gets weight 0 (`negative_gain: zero`; the paper's weight would be negative) or |G|/O² (`abs`,
the reference's `abs((g)/(o**2))`).

Presets (`method.preset`):
- `paper` ({}): the Config defaults: separate linear unimodal heads, losses measured before the
  copies train and after their last epoch, both by an eval-mode pass (mean over samples), G < 0
  weighted 0, the copies' optimizer at the run's current learning rate.
- `reference`: what `GBlending_trainer.py` runs, quirk by quirk:
  - `unimodal_heads: fusion_blocks`: the unimodal losses are CE of the fused head's blocks,
    z_m = W_m h_m + b/M (`unimodality_calculate`), not of separate heads; they share the
    fused head's parameters.
  - `copy_zero_inputs: true`: the copy for modality m trains (and is measured on) the *fused*
    output with the other modalities' inputs set to zero (`padding`: `torch.zeros_like` of the
    input, the encoders still run on it), not m's unimodal loss.
  - `copy_lr: initial`: the copies' optimizer is a separate one built at the start and reset to
    its initial state before each copy (`optimizer.load_state_dict(optimizer_origin)`), so at
    the initial learning rate whatever the scheduler has made of the run's.
  - `first_point: after_first_epoch`: the first point is measured after the copies' first epoch
    (`if epoch == 0`), not before they train. With `super_epoch: 1` that epoch is also the last
    and only the first point is set: the second stays 0, so G = L^V and O = −(L^V − L^T) of the
    one epoch (the reference's default is 10).
  - `train_loss: running`: L^T is the sum of the step losses of that epoch (`_loss +=
    loss.item()`, train mode, each before its step), not a pass after it.
  - `loss_reduction: batch_sum`: losses are sums of per-batch mean losses over the batches (the
    train and held-out parts have different batch counts), not means over samples.
  - `negative_gain: abs`: w ∝ |G| / O².
  `super_epoch` keeps its default, 10, the reference's (`online`; its `offline` mode, one
  estimate at epoch 0, is a `super_epoch` of at least `train.epochs`).

Where mmray differs from the reference implementation under every preset:
- Held-out set: the reference measures the copies' held-out loss on its *validation* split (and
  trains them on all of train). A method in mmray does not see the val split, which is kept for
  model selection, so the held-out set is the hashed part of train, left out of the copies'
  training only.
- Each of a copy's epochs passes over this epoch's train batches in this epoch's order (what
  `ctx.train_batches()` yields); the reference's loader reshuffles every epoch.
- Missing modalities: a unimodal loss averages over the samples where its modality is present
  (the reference has no missing-modality path); the fused loss over all samples.
- Multi-label datasets are supported: every loss is BCE-with-logits, averaged over classes (the
  reference's losses are `nn.CrossEntropyLoss`).
- With several Ray Train workers the copies' gradients are averaged like the model's, losses are
  summed over workers (`ctx.reduce_sum`), and a batch whose samples are all held out steps with
  a zero loss (so every worker takes the same steps).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import (
    Batch,
    Method,
    MethodConfig,
    Output,
    StepContext,
    masked_mean,
    per_sample_loss,
)
from mmray.modules.fusion import LateFusion

FUSED = "fused"  # the name of the fused loss beside the modalities' names


@dataclass
class Config:
    # Epochs between weight estimates, and the epochs each copy trains for an estimate; the
    # weights are estimated at every epoch that is a multiple of it (reference: 10). A value of
    # at least train.epochs estimates once, at epoch 0 (the reference's `offline`).
    super_epoch: int = field(default=10, metadata=bounds(1))
    # The part of train held out from the copies' training (their held-out loss), by id hash.
    heldout_fraction: float = field(default=0.2, metadata=bounds(0.0, 1.0, lo_open=True))
    # Salt of the id hash: another value holds out another part of train.
    heldout_seed: int = 0
    # Unimodal losses of separate linear heads on h_m (paper), or of the fused head's blocks
    # z_m = W_m h_m + b/M (the reference's `unimodal_result`).
    unimodal_heads: Literal["separate", "fusion_blocks"] = "separate"
    # The copy for modality m trains the fused output with the other modalities' inputs zeroed
    # (the reference's `padding`) instead of m's unimodal loss.
    copy_zero_inputs: bool = False
    # The copies' learning rate: the run's optimizer's now, or its initial one (the reference's
    # separate, never-scheduled optimizer).
    copy_lr: Literal["current", "initial"] = "current"
    # The first measuring point: before the copies train (paper), or after their first epoch
    # (reference; with super_epoch 1 the second point then stays 0).
    first_point: Literal["before", "after_first_epoch"] = "before"
    # L^T: an eval-mode pass over the copies' train part, or the step losses of the epoch just
    # trained (reference; needs first_point after_first_epoch).
    train_loss: Literal["eval", "running"] = "eval"
    # A loss over a pass: the mean over samples, or the sum of each batch's mean (reference).
    loss_reduction: Literal["mean", "batch_sum"] = "mean"
    # G < 0 (the held-out loss rose): weight 0, or |G|/O² (reference).
    negative_gain: Literal["zero", "abs"] = "zero"
    # O² is floored at this before dividing (the reference raises on O = 0).
    min_o2: float = field(default=1e-12, metadata=bounds(0.0, None, lo_open=True))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.heldout_fraction >= 1.0:
            errors.append(f"{path}.heldout_fraction: {self.heldout_fraction} leaves the copies no "
                          f"train sample; take a value in (0, 1)")
        if self.train_loss == "running" and self.first_point == "before":
            errors.append(f"{path}.train_loss: running needs first_point=after_first_epoch (there "
                          f"are no step losses before the copies train)")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def blend_weights(points: torch.Tensor, negative_gain: Literal["zero", "abs"] = "zero",
                  min_o2: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, O, G), each (K,), from `points` (4, K): rows L^T_N, L^V_N, L^T_{N+n}, L^V_{N+n}.
    G = L^V_N − L^V_{N+n}; O = (L^V_{N+n} − L^T_{N+n}) − (L^V_N − L^T_N); w ∝ G⁺ (or |G|) / O²,
    normalised; equal weights when every one is 0."""
    train_n, held_n, train_nn, held_nn = points.double()
    gain = held_n - held_nn
    over = (held_nn - train_nn) - (held_n - train_n)
    num = gain.abs() if negative_gain == "abs" else gain.clamp(min=0)
    w = num / (over * over).clamp(min=min_o2)
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    total = w.sum()
    w = w / total if total > 0 else torch.full_like(w, 1 / len(w))
    return w, over, gain


def is_heldout(sample_id: Any, fraction: float, seed: int = 0) -> bool:
    """Whether a sample is in the held-out part: a stable hash of its id (not Python's salted
    `hash`), uniform in [0, 1), below `fraction`. The same on every process and run."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def take_rows(batch: Batch, rows: torch.Tensor, n: int | None = None) -> Batch:
    """The batch restricted to `rows` (indices): its tensors, arrays and lists of one entry per
    sample (n, the length of batch["id"]), inside nested dicts too."""
    n = len(batch["id"]) if n is None else n
    out: Batch = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = take_rows(v, rows, n)
        elif torch.is_tensor(v) and v.dim() > 0 and len(v) == n:
            out[k] = v[rows.to(v.device)]
        elif isinstance(v, np.ndarray) and len(v) == n:
            out[k] = v[rows.numpy()]
        elif isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n:
            out[k] = [v[i] for i in rows.tolist()]
        else:
            out[k] = v
    return out


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, twin: nn.Module,
                   lr: Literal["current", "initial"] = "current") -> torch.optim.Optimizer:
    """A fresh optimizer of `optimizer`'s class over `twin` (a deepcopy of `model`), with the
    same parameter groups and hyper-parameters; `initial`: each group's lr before scheduling."""
    to_twin = dict(zip(map(id, model.parameters()), twin.parameters(), strict=True))
    groups = []
    for g in optimizer.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        if lr == "initial":
            hyper["lr"] = hyper.get("initial_lr", hyper["lr"])
        groups.append({**hyper, "params": [to_twin[id(p)] for p in g["params"]]})
    # Every group carries all its hyper-parameters; the constructor's defaults fill nothing.
    return type(optimizer)(groups)


class PassLoss:
    """A loss accumulated over a pass of batches, on the device (no host sync per batch): the
    sample-weighted mean (`mean`) or the sum of each batch's mean (`batch_sum`)."""

    def __init__(self, reduction: Literal["mean", "batch_sum"]):
        self.reduction = reduction
        self.total: torch.Tensor | None = None  # [Σ, count]

    def add(self, per: torch.Tensor, weight: torch.Tensor) -> None:
        per, weight = per.detach().double(), weight.double()
        s, n = (per * weight).sum(), weight.sum()
        if self.reduction == "batch_sum":  # a batch with no sample of this part adds nothing
            s, n = torch.where(n > 0, s / n.clamp(min=1), 0.0), (n > 0).double()
        part = torch.stack([s, n])
        self.total = part if self.total is None else self.total + part

    def value(self, ctx: StepContext, what: Literal["train", "held-out"]) -> float:
        total = ctx.reduce_sum(self.total if self.total is not None
                               else torch.zeros(2, dtype=torch.float64))
        if float(total[1]) == 0:  # one host sync per pass
            change = "raise" if what == "held-out" else "lower"
            raise ValueError(f"method.name=gblending: no sample of train is in the copies' {what} "
                             f"part; {change} method.options.heldout_fraction")
        return float(total[0] / total[1]) if self.reduction == "mean" else float(total[0])


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class GBlending(Method):
    """Late fusion with unimodal heads, trained on Σ_k w_k L_k with G-Blending's weights."""

    name = "gblending"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # GBlending_trainer.py's quirks, each named in the module docstring.
        "reference": {"unimodal_heads": "fusion_blocks", "copy_zero_inputs": True,
                      "copy_lr": "initial", "first_point": "after_first_epoch",
                      "train_loss": "running", "loss_reduction": "batch_sum",
                      "negative_gain": "abs"},
        "paper": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        if FUSED in self.modalities:
            raise ValueError(f"method.name=gblending names the fused loss {FUSED!r}; dataset "
                             f"{spec.name!r} has a modality of that name")
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        self.head = LateFusion(dims, spec.num_classes, method_cfg.fusion)
        if self.options.unimodal_heads == "separate":
            self.unimodal_heads = nn.ModuleDict({m: nn.Linear(d, spec.num_classes)
                                                 for m, d in dims.items()})
        self.loss_names = [*self.modalities, FUSED]
        k = len(self.loss_names)
        # The blend and its estimate: buffers, so checkpoints hold them (float64: small).
        self.register_buffer("blend_w", torch.full((k,), 1 / k, dtype=torch.float64))
        self.register_buffer("blend_o", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("blend_g", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("blend_points", torch.zeros(4, k, dtype=torch.float64))
        self.register_buffer("estimated_at", torch.tensor(-1))

    # -- forward and losses -------------------------------------------------------------------
    def unimodal_logits(self, h: torch.Tensor, m: str) -> torch.Tensor:
        if self.options.unimodal_heads == "separate":
            return self.unimodal_heads[m](h)
        bias = self.head.fc.bias if self.head.mode == "concat" else self.head.bias
        return F.linear(h, self.head.weight_of(m)) + bias / len(self.head.modalities)

    def forward(self, batch: Batch) -> Output:
        feats = self.features(batch)
        fused, _ = self.head(feats)
        return Output(fused, {m: self.unimodal_logits(feats[m], m) for m in self.modalities})

    def sample_losses(self, batch: Batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss `name` per sample and the samples' weights in its mean: a unimodal loss counts
        the samples where its modality is present. What a copy trains and is measured on."""
        ones = torch.ones(len(batch["id"]), device=batch["label"].device)
        if name == FUSED or self.options.copy_zero_inputs:
            if name != FUSED:  # the reference's padding: the other inputs are zeros
                batch = {**batch, "inputs": {m: x if m == name else torch.zeros_like(x)
                                             for m, x in batch["inputs"].items()}}
            logits, weight = self.head(self.features(batch))[0], ones
        else:  # only modality `name`'s encoder runs
            present = batch["present"][name]
            h = self.encoders[name](batch["inputs"][name])
            logits = self.unimodal_logits(h * present.to(h.dtype).unsqueeze(1), name)
            weight = present.to(ones.dtype)
        return per_sample_loss(logits, batch["label"], self.spec.multilabel), weight

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            out = self(batch)
        label = batch["label"]
        losses = {m: masked_mean(per_sample_loss(out.per_modality[m], label, self.spec.multilabel),
                                   batch["present"][m])
                  for m in self.modalities}
        losses[FUSED] = per_sample_loss(out.logits, label, self.spec.multilabel).mean()
        loss = sum(w.to(losses[k].dtype) * losses[k]
                   for w, k in zip(self.blend_w, self.loss_names, strict=True))
        return self.backward_and_step(loss, optimizer, ctx, {f"loss/{k}": v for k, v in losses.items()})

    # -- the estimate -------------------------------------------------------------------------
    def before_epoch(self, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict[str, float]:
        o = self.options
        if ctx.epoch % o.super_epoch:
            return {}
        points = self.estimate(optimizer, ctx)
        w, over, gain = blend_weights(points, o.negative_gain, o.min_o2)
        for buf, value in ((self.blend_w, w), (self.blend_o, over), (self.blend_g, gain),
                           (self.blend_points, points)):
            buf.copy_(value)
        self.estimated_at.fill_(ctx.epoch)
        return {}

    def estimate(self, optimizer: torch.optim.Optimizer, ctx: StepContext) -> torch.Tensor:
        """(4, K): L^T_N, L^V_N, L^T_{N+n}, L^V_{N+n} of each loss, from a copy trained on it."""
        o, n = self.options, self.options.super_epoch
        points = torch.zeros(4, len(self.loss_names), dtype=torch.float64)
        for i, name in enumerate(self.loss_names):
            if o.first_point == "before":  # every copy starts as this model
                points[:2, i] = torch.tensor(self.measure(self, name, ctx), dtype=torch.float64)
            twin = copy.deepcopy(self)
            opt = copy_optimizer(optimizer, self, twin, o.copy_lr)
            for epoch in range(n):
                running = self.train_copy_epoch(twin, opt, name, ctx)
                first = epoch == 0 and o.first_point == "after_first_epoch"
                if not first and epoch < n - 1:
                    continue
                train, held = self.measure(twin, name, ctx)
                row = 0 if first else 2  # with n = 1 and `first`, row 2 stays 0 (reference)
                train = running if o.train_loss == "running" else train
                points[row:row + 2, i] = torch.tensor([train, held], dtype=torch.float64)
            del twin, opt
        return points

    def heldout_rows(self, batch: Batch) -> torch.Tensor:
        o = self.options
        return torch.tensor([is_heldout(i, o.heldout_fraction, o.heldout_seed) for i in batch["id"]],
                            dtype=torch.bool)

    def train_copy_epoch(self, twin: GBlending, opt: torch.optim.Optimizer, name: str,
                         ctx: StepContext) -> float:
        """One epoch of `twin` on loss `name` over the train part; returns its step losses."""
        running = PassLoss(self.options.loss_reduction)
        for batch in ctx.train_batches():
            fit = (~self.heldout_rows(batch)).nonzero().squeeze(1)
            if len(fit) == 0:  # all held out: a zero step, as the other workers step
                twin.eval()
                with ctx.autocast():
                    per, _ = twin.sample_losses(batch, name)
                twin.train()
                twin.backward_and_step(per.sum() * 0.0, opt, ctx)
                continue
            with ctx.autocast():
                per, weight = twin.sample_losses(take_rows(batch, fit), name)
            running.add(per, weight)
            twin.backward_and_step(masked_mean(per, weight), opt, ctx)
        return running.value(ctx, "train")

    @torch.no_grad()
    def measure(self, model: GBlending, name: str, ctx: StepContext) -> tuple[float, float]:
        """Loss `name` of `model` in eval mode over the train part and the held-out part."""
        parts = {False: PassLoss(self.options.loss_reduction), True: PassLoss(self.options.loss_reduction)}
        was_training = model.training
        model.eval()
        try:
            for batch in ctx.train_batches():
                held = self.heldout_rows(batch).to(batch["label"].device)
                with ctx.autocast():
                    per, weight = model.sample_losses(batch, name)
                parts[False].add(per, weight * ~held)
                parts[True].add(per, weight * held)
        finally:
            model.train(was_training)
        return parts[False].value(ctx, "train"), parts[True].value(ctx, "held-out")

    def epoch_metrics(self) -> dict[str, float]:
        out = {"gblend/estimated_at": float(self.estimated_at)}
        for i, k in enumerate(self.loss_names):
            out[f"gblend/w_{k}"] = float(self.blend_w[i])
            out[f"gblend/o_{k}"] = float(self.blend_o[i])
            out[f"gblend/g_{k}"] = float(self.blend_g[i])
        return out
