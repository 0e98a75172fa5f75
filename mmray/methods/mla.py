"""MLA: Multimodal Learning with Alternating Unimodal Adaptation (METHODS.md §4).

Zhang, Yoon, Bansal, Yao. "Multimodal Representation Learning by Alternating Unimodal
Adaptation", CVPR 2024. Reference code:
https://github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, read at
its latest commit ab6c184579f9ff390e9c9b8216c9900c2a43545b (`main.py`: `train_epoch` with
`gs_flag`, `valid`, `calculate_gating_weights`; `utils/utils.py`: `GSPlugin`).

One head g = Linear(d → C) is shared by every modality. Each batch runs every encoder once, then
for m in a fixed order takes one optimizer step on loss_m = CE(g(h_m)) alone, so encoder φ_m only
ever receives gradients from loss_m while the head learns from every modality in turn. To keep the
head from forgetting the previous modalities it receives its weight gradient through an
orthogonal-weight-modification projector P (P₀ = I_d, the bias is not projected). At each step,
with r = mean_batch(h_m) (1×d) and α = 0.1^(1 + batch_idx / batches):

    k = P rᵀ;  P ← P − k kᵀ / (α + r k);  P ← P / ‖P‖_F;   ∇W_g ← ∇W_g Pᵀ.

At inference the unimodal logits z_m = g(h_m) are fused by fixed weights (z = Σ w_m z_m) or by
test-time uncertainty: per sample e_m = −Σ_c p log p with p = softmax(z_m), w_m = softmax_m(−e_m).
The fusion rule plays no part in training.

Presets (`method.preset`):
- `reference`: what the reference's latest commit runs under the PyTorch it pins
  (`requirements.txt`: torch 1.8.1): no projection at all, the dynamic rule with one entropy per
  batch (the README's "MLA (dynamic fusion)"), and the inert projector options set as its
  `GSPlugin` writes them, so that `project: true` on top of it is the projecting `GSPlugin` of the
  first commit, 4735bbcb8e33e56da8e08d4408a1939e73d01047. Its quirks, each an option:
  - `project: false`. `GSPlugin.before_update` (`utils/utils.py`) acts only on a parameter named
    "module.weight", but `main.py` hands it the bare `model.module.fusion_module.fc_out`, whose
    parameters are "weight" and "bias", so the projection never runs and P stays I. Commit
    4735bbc also matched "weight" and so projected; 11ae1ee5aee9ecd7db2aefa16f9b44d2ea548c89
    ("Fix bugs") dropped that match. (4735bbc's `main.py` never reaches a step: it passes the
    `GSPlugin` class, not an instance, and reads an undefined `args.ewc_flag`.)
  - `update_first: true`: `before_update`, called between backward and step, updates P with the
    current modality's r, then projects the gradient with that P (as OWM's `pro_weight` does).
  - `skip_first_step: true`: `before_update` does nothing while its step counter
    (`train_exp_counter`, counted over the whole run) is 0, i.e. at the very first step.
  - `outer_divisor: true`: it divides by `alpha + torch.mm(k, r)`, the d×d outer product,
    element-wise, where OWM's scalar is α + r k.
  - `zero_grad_steps: true`: `main.py` zeroes gradients after each step and deletes them only at
    the end of the batch; PyTorch 1.8.1's `zero_grad` zeroes rather than deletes, so the encoders
    already stepped in a batch are stepped again at each later step with a zero gradient (their
    momentum and weight decay advance once more per later modality).
  - `fusion_rule: dynamic, batch_entropy: true`: `calculate_entropy` in `main.py` takes the
    softmax over the batch axis (dim 0) of the B×C logits and sums −p log p over the whole matrix,
    so one weight per modality and batch, depending on the other samples; w = softmax_m(−e_m) is
    its exp(max e − e_m) normalisation. (The README's command for it passes `-dynamic`, which
    argparse refuses; `--dynamic` runs it.) The README's "MLA (fixed fusion)" is
    `fusion_rule: fixed` with `fusion_weights` {audio: 0.55, visual: 0.45} (`main(av_alpha=0.55)`;
    0.35/0.25/0.4 for audio/visual/text), which a preset cannot name for every dataset.
- `paper`: METHODS.md §4 as written: project, updating P with the current modality's features
  before projecting (OWM's order; the scalar divisor).
- `mmray`: the Config defaults. They project with the P built from the steps before (the current
  modality's r is added to P after its step): OWM keeps the head's response to what earlier inputs
  taught it, and this order leaves the current modality's own mean-feature direction in its head
  update. Neither the paper preset nor the reference does this.

Where mmray differs from the reference implementation beyond these options:
- P is sized from the head (`head.in_features`) and stored as a buffer, so it is checkpointed;
  the reference hard-codes 512 and keeps P outside the model (lost on resume). P is updated in
  float64.
- Fixed fusion weights are read per modality name (`fusion_weights`); empty gives equal weights.
- Missing modalities: loss_m and r average over the samples where m is present, and the dynamic
  rule gives an absent modality zero weight (the reference has no missing-modality path).
- With several Ray Train workers r is the global batch's mean feature (summed over workers), so
  P is the same on every worker, and the projection acts on the averaged gradient (`edit_grads`
  runs after the average): N workers × batch B step as one process with batch N·B. With
  missing modalities loss_m is each worker's mean over its present samples, averaged over the
  workers, which differs from the global batch's masked mean when the workers' counts differ.
- `method.fusion` is not used: MLA has one shared head and fuses at the logit level.
- The logged `loss` is the mean of the unimodal losses (the reference logs
  0.55·loss_a + 0.45·loss_v, also with three modalities).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext


@dataclass
class Config:
    # Project the shared head's weight gradient through P (paper); false = the reference's
    # final code, where the projection never runs.
    project: bool = True
    # Update P with the current modality's features before projecting its gradient (paper,
    # OWM, the reference's GSPlugin); false = project with the P of the earlier steps, then
    # update it (mmray).
    update_first: bool = False
    # The very first step of the run (epoch 0, batch 0, first modality) neither updates P nor
    # projects, as the reference's GSPlugin, which acts only from its second call.
    skip_first_step: bool = False
    # Divide k kᵀ element-wise by the d×d matrix α + k r, as the reference's GSPlugin writes it;
    # false = by the scalar α + r k of orthogonal weight modification.
    outer_divisor: bool = False
    # Step the encoders already stepped in this batch again at each later modality's step, with
    # a zero gradient (momentum and weight decay advance): the reference under its PyTorch
    # 1.8.1, whose zero_grad zeroes the gradients instead of deleting them.
    zero_grad_steps: bool = False
    # Inference fusion of the unimodal logits: fixed weights or test-time entropy weights.
    fusion_rule: Literal["fixed", "dynamic"] = "dynamic"
    # Weights of the fixed rule per modality; empty = equal weights. Reference: audio 0.55,
    # visual 0.45.
    fusion_weights: dict[str, float] = field(default_factory=dict)
    # Dynamic rule with the reference's one entropy per modality over the whole batch.
    batch_entropy: bool = False
    # Order of the unimodal steps in each batch; empty = the dataset's modality order.
    modality_order: list[str] = field(default_factory=list)

    def validate(self, path: str, errors: list[str]) -> None:
        for m, w in self.fusion_weights.items():
            if w < 0:
                errors.append(f"{path}.fusion_weights.{m}: {w} is negative")
        if len(set(self.modality_order)) != len(self.modality_order):
            errors.append(f"{path}.modality_order: {self.modality_order} repeats a modality")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def projector_alpha(batch_idx: int, batches_per_epoch: int) -> float:
    """α = 0.1^(1 + batch_idx / batches_per_epoch): the regulariser of the projector update."""
    return 0.1 ** (1 + batch_idx / max(batches_per_epoch, 1))


def projector_update(P: torch.Tensor, r: torch.Tensor, alpha: float,
                     outer_divisor: bool = False) -> torch.Tensor:
    """k = P rᵀ; P ← P − k kᵀ / (α + r k); P ← P / ‖P‖_F. r: (d,) mean feature. Returns new P.
    `outer_divisor`: divide element-wise by the d×d matrix α + k r instead (the reference's)."""
    # In float64: P accumulates one rank-one update per step over the whole run, and the d×d
    # cost is negligible next to a backward.
    P64, r64 = P.double(), r.detach().double().reshape(-1, 1)
    k = P64 @ r64
    P64 = P64 - (k @ k.T) / (alpha + (k @ r64.T if outer_divisor else r64.T @ k))
    return (P64 / torch.linalg.matrix_norm(P64)).to(P.dtype)


@torch.no_grad()
def project_gradient_(head: nn.Linear, P: torch.Tensor) -> None:
    """In place: ∇W ← ∇W Pᵀ for the head's weight; its bias gradient is left as it is."""
    if head.weight.grad is not None:
        head.weight.grad.copy_(head.weight.grad @ P.T.to(head.weight.grad.dtype))


def entropy_weights(per_modality: dict[str, torch.Tensor],
                    present: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per sample: e_m = −Σ_c p log p, p = softmax(z_m); w_m = softmax_m(−e_m), shape (B,)."""
    names = list(per_modality)
    logp = [F.log_softmax(per_modality[m].float(), dim=1) for m in names]
    neg_e = torch.stack([(lp.exp() * lp).sum(1) for lp in logp], dim=1)  # (B, M) = −e
    if present is not None:
        mask = torch.stack([present[m].to(neg_e.device) for m in names], dim=1)
        # A finite floor rather than −inf: a sample with no modality present gets equal weights.
        neg_e = torch.where(mask, neg_e, torch.full_like(neg_e, torch.finfo(neg_e.dtype).min))
    w = torch.softmax(neg_e, dim=1)
    return {m: w[:, j] for j, m in enumerate(names)}


def batch_entropy_weights(per_modality: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's rule: e_m = −Σ_{i,c} p log p with p = softmax(z_m, dim=0) (over the batch);
    w_m = softmax_m(−e_m), one scalar per modality."""
    names = list(per_modality)
    neg_e = []
    for m in names:
        logp = F.log_softmax(per_modality[m].float(), dim=0)
        neg_e.append((logp.exp() * logp).sum())
    w = torch.softmax(torch.stack(neg_e), dim=0)
    return {m: w[j] for j, m in enumerate(names)}


def fuse(per_modality: dict[str, torch.Tensor],
         weights: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """z = Σ_m w_m z_m; a weight is a scalar or one value per sample (B,)."""
    total = 0
    for m, z in per_modality.items():
        w = torch.as_tensor(weights[m], dtype=z.dtype, device=z.device)
        total = total + (w.unsqueeze(1) if w.dim() == 1 else w) * z
    return total


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class MLA(Method):
    """Per-modality encoders, one shared head, one optimizer step per modality per batch."""

    name = "mla"
    Config = Config
    presets = {
        # The latest commit of the reference (see the module docstring for each quirk).
        "reference": {"project": False, "update_first": True, "skip_first_step": True,
                      "outer_divisor": True, "zero_grad_steps": True, "fusion_rule": "dynamic",
                      "batch_entropy": True},
        "paper": {"update_first": True},
        "mmray": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"method.name=mla needs one feature width for the shared head; the "
                             f"encoders output {dims} (set model.feature_dim)")
        self.head = nn.Linear(next(iter(dims.values())), spec.num_classes)
        self.register_buffer("projector", torch.eye(self.head.in_features))
        self.order = self._check_options()

    def _check_options(self) -> list[str]:
        opts, known = self.options, sorted(self.modalities)
        order = list(opts.modality_order) or list(self.modalities)
        if sorted(order) != known:
            raise ValueError(f"method.options.modality_order={opts.modality_order} must list each "
                             f"modality of dataset {self.spec.name!r} once: {known}")
        if opts.fusion_weights and sorted(opts.fusion_weights) != known:
            raise ValueError(f"method.options.fusion_weights={opts.fusion_weights} must give a "
                             f"weight for each modality of dataset {self.spec.name!r}: {known}")
        return order

    # -- inference ----------------------------------------------------------------------------
    def inference_weights(self, per_mod: dict[str, torch.Tensor],
                          present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        opts = self.options
        if opts.fusion_rule == "fixed":
            return dict(opts.fusion_weights) or {m: 1 / len(per_mod) for m in per_mod}
        if opts.batch_entropy:
            return batch_entropy_weights(per_mod)
        return entropy_weights(per_mod, present)

    def forward(self, batch: Batch) -> Output:
        feats = self.features(batch)
        per_mod = {m: self.head(feats[m]) for m in self.modalities}
        return Output(fuse(per_mod, self.inference_weights(per_mod, batch["present"])), per_mod)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        opts = self.options
        with ctx.autocast():
            feats = self.features(batch)  # one forward of every encoder
        alpha = projector_alpha(ctx.batch_idx, ctx.batches_per_epoch)
        first_batch = ctx.epoch == 0 and ctx.batch_idx == 0
        stepped: dict[int, nn.Parameter] = {}  # parameters given a gradient in this batch
        logs: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.order):
            # Recomputed after the previous modality's step: the head has moved since.
            with ctx.autocast():
                logits = self.head(feats[m])
            present = batch["present"][m].to(feats[m].device)
            loss_m = self.masked_criterion(logits, batch["label"], present)
            r = self._mean_feature(feats[m], present, ctx)
            projects = opts.project and not (opts.skip_first_step and first_batch and i == 0)

            def edit(r: torch.Tensor = r, projects: bool = projects) -> None:
                # After the average, with the global batch's r: see the module docstring.
                if opts.zero_grad_steps:
                    self._zero_grads_of_stepped(stepped)
                if projects and opts.update_first:
                    self._update_projector(r, alpha)
                if projects:
                    project_gradient_(self.head, self.projector)

            # Each encoder's graph is separate and used once, so no retain_graph is needed; the
            # other encoders' gradients stay None and the optimizer skips them.
            # fp16: a step skipped for non-finite gradients undoes what its edit changed.
            kept = (self.projector.clone(), dict(stepped)) if ctx.scaler is not None else None
            step = self.backward_and_step(
                loss_m, optimizer, ctx,
                edit_grads=edit if projects or opts.zero_grad_steps else None)
            logs[f"loss/{m}"] = step["loss"]
            logs[f"grad/{m}"] = step[f"grad/{m}"]
            if ctx.last_step_skipped and kept is not None:
                self.projector.copy_(kept[0])
                stepped.clear()
                stepped.update(kept[1])
            elif projects and not opts.update_first:
                self._update_projector(r, alpha)
        logs["loss"] = torch.stack([logs[f"loss/{m}"] for m in self.order]).mean()
        return logs

    def _update_projector(self, r: torch.Tensor, alpha: float) -> None:
        self.projector.copy_(projector_update(self.projector, r, alpha, self.options.outer_divisor))

    def _zero_grads_of_stepped(self, stepped: dict[int, nn.Parameter]) -> None:
        """`zero_grad_steps`: a parameter that had a gradient at an earlier step of this batch and
        has none now gets a zero one, so the optimizer steps it; `stepped` gains this step's."""
        for p in stepped.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stepped.update((id(p), p) for p in self.parameters() if p.grad is not None)

    @staticmethod
    def _mean_feature(h: torch.Tensor, present: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """r = mean over the global batch (summed over workers) of h_m (absent samples are zero
        rows and are not counted), in float64 like P: the reference's element-wise divisor
        α + k r amplifies rounding in r."""
        n = present.to(device=h.device, dtype=torch.float64).sum().reshape(1)
        summed = ctx.reduce_sum(torch.cat([h.detach().double().sum(0), n]))
        return summed[:-1] / summed[-1].clamp(min=1)

