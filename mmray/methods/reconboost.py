"""ReconBoost: alternating boosting of one modality learner at a time (METHODS.md §9).

Hua, Xu, Bao, Yang, Huang. "ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024.
Reference code: https://github.com/huacong/ReconBoost, read at commit
14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932 (`train.py` `main` for two modalities, `train_MSA.py` for
three, `models/dynamic_net.py` `DynamicNet`, `schedule.py` `schedule_model`). BalanceBenchmark's
re-implementation, which produced its headline table (CREMA-D 74.01): `balancemm/trainer/
ReconBoost_trainer.py` and `BaseClassifierReconBoostModel` in `balancemm/models/avclassify_model.py`
of https://github.com/GeWu-Lab/BalanceBenchmark at 4c1482fca5aaa8d4278af8e26020daa039e3ccf3.

Each modality m has a learner f_m = g(φ_m(x_m)): its encoder and a head g shared by every
modality (the reference's `common_space`: `model.fc = net_ensemble.head`). The model is the
ensemble F = β Σ_m f_m with one learned boost rate β; `forward` returns F as the fused logits and
each f_m as that modality's logits. Training runs in stages; stage s makes modality
m = order[s mod M] the active one and has two phases, each a whole number of epochs:

1. boosting (`boost_epochs`): only f_m learns (φ_m and g), every step, on
       L = mean_i −(w1 − w2·q_i)·log p_m(y_i | x_i) + α · MSE(softmax f_m, softmax f_prev),
   q_i = softmax(F_{−m}(x_i))[y_i] the true-class probability of the ensemble of the other
   learners F_{−m} = β Σ_{n≠m} f_n (computed in the same step, without gradient), f_prev the
   learner of the previous stage (order[s−1 mod M]). The first term is cross-entropy re-weighted
   toward the samples the others get wrong: the gradient-boosting form the paper derives from its
   KL-based reconcilement against the other learners. The second is the code's `ga_loss`
   (METHODS.md §9's α·MSE "to the previous round's ensemble output"; the code takes the previous
   stage's learner f_prev, without β, which for two modalities is the only other learner); it is
   absent at stage 0.
2. global rectification (`correct_epochs`): every learner in the ensemble, g and β learn
   together on CE(F(x), y).

A learner joins the ensemble when its first boosting phase ends (the reference from scratch): at
stage 0 no other learner exists and q_i = 1 (the reference's constant c0 expanded to one column,
whose softmax is 1), and the fused logits are the active learner's, β f_m, until others join.

Presets (`method.preset`):
- `paper` ({}): the Config defaults: METHODS.md §9's loss (the reconcilement term's gradient
  reaches f_m), summed over classes, with the reference's hyper-parameters and schedule.
- `reference`: what the authors' `train.py` runs (without `--use_pretrain`), quirk by quirk:
  - `recon_grad: false`: `ga_loss = mse(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))`
    detaches both sides, so the reconcilement term is logged but adds no gradient.
  - `class_mean: true`: the boosting loss is `(target * ...).mean(-1)` over the one-hot product, so
    it is divided by the number of classes C.
  - `rerun_previous: true`: `pre_out_obj = pre_model(...)` runs the previous learner a second time
    in train mode after the ensemble forward ran it once, so its batch-norm running statistics
    move twice per step (and its dropout is drawn twice).
  - `reset_optimizer: true` (also the default): each phase builds a new SGD (`optim.SGD(...)`,
    momentum 0.9, weight decay 5e-4), so momentum starts from zero at every phase.
  The README's CREMA-D command (w1 = 5, w2 = 1, α = 0.5 by default, 4 + 4 epochs per stage, β₀ =
  1, the head Linear(512, 256)–ReLU–Linear(256, C)) is the Config default; its lr (0.01 for both
  phases, ×0.1 every 30 stages, 1001 stages) is `train.*`'s business. That command also loads
  pretrained unimodal learners (`--use_pretrain`), every one in the ensemble from the start;
  mmray does not load them, and `ensemble_from_start: true` gives that run's ensemble.
- `balancebench`: BalanceBenchmark's trainer, which differs materially: one phase-1 and one
  phase-2 epoch per modality per epoch (`T_epochs: 1`), β₀ = 0.01, a shared single Linear head
  (`SharedHead.fc_out`), every learner in the ensemble from the start, one optimizer for the whole
  run (its global config: AdamW, lr 1e-3, weight decay 0.01), the reconcilement term skipped in
  its first epoch (`current_epoch == 0`: the first M stages, `recon_starts: 2` for its two
  modalities), detached, class-mean and a second forward of the previous learner as above. Under
  the torch 1.12 it pins, `optimizer.zero_grad()` zeroes gradients instead of deleting them, so
  once a parameter has had a gradient the optimizer steps it at every later step, with a zero
  gradient in the boosting phases of the other modalities (`zero_grad_steps: true`: AdamW's
  moments and weight decay keep moving the inactive learners).

Where mmray differs from the reference implementation under every preset:
- The schedule is counted in mmray epochs (a stage is `boost_epochs + correct_epochs` of them),
  and the stage, phase and ensemble membership follow from the epoch, which the checkpoint holds
  (`get_extra_state`): a resumed run, and the best epoch's weights kept for the test, use the
  ensemble of their own epoch. The learning rate of both phases is `train.lr` under mmray's
  scheduler (the reference has `m_lr` and `e_lr`, equal by default).
- `reset_optimizer` clears the one optimizer's state at each phase's first epoch rather than
  building a new one per phase; with `train.optimizer: sgd` that is the reference's optimizer
  (parameters that get no gradient are not stepped, as they are not in the reference's).
- In BalanceBenchmark's ensemble every learner is summed in the dataset's order; here, as in the
  authors' `DynamicNet` (which re-appends the learner it trained), the learners are summed (and
  run) starting after the active one: the same values for two modalities, dropout drawn in
  another order.
- Missing modalities: a learner whose modality is absent from a sample leaves that sample's
  ensembles, its boosting and reconcilement losses average over the samples where it is present
  (the reconcilement also needs the previous learner's modality), and a sample none of whose
  ensemble learners is present gets q = 1 (the reference has no missing-modality path).
- `method.fusion` is not used: the learners are fused by the boosted sum.
- Multi-label datasets are rejected (see `unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext, masked_mean


@dataclass
class Config:
    # w1: weight of the learner's own cross-entropy −w1·log p_m(y). README: 5 CREMA-D, 4 AVE and
    # ModelNet40; train_MSA.py: 1.
    weight1: float = field(default=5.0, metadata=bounds(0.0))
    # w2: weight of +w2·q·log p_m(y), q the other learners' ensemble probability of y. README 1;
    # train_MSA.py 0.25.
    weight2: float = field(default=1.0, metadata=bounds(0.0))
    # α: weight of the reconcilement MSE between the active and the previous learner's class
    # probabilities.
    alpha: float = field(default=0.5, metadata=bounds(0.0))
    # The reconcilement term's gradient reaches the active learner; false: both sides detached,
    # as the reference code does, so it is logged but changes nothing.
    recon_grad: bool = True
    # First stage with the reconcilement term (stage 0 has no previous learner). BalanceBenchmark
    # skips its first epoch, i.e. the first M stages.
    recon_starts: int = field(default=1, metadata=bounds(0))
    # Run the previous learner a second time for the reconcilement term, as the reference does
    # (its batch-norm statistics move twice per step); false: reuse its logits from the ensemble.
    rerun_previous: bool = False
    # Divide the boosting loss by the number of classes, as the reference's mean over the
    # one-hot product does.
    class_mean: bool = False
    # Epochs of a stage in which the active learner trains alone (`--epochs_per_stage`).
    boost_epochs: int = field(default=4, metadata=bounds(1))
    # Epochs of global rectification that follow (`--correct_epoch`); 0: none.
    correct_epochs: int = field(default=4, metadata=bounds(0))
    # β at the start; learned in the rectification. Reference `--boost_rate` 1; BalanceBenchmark
    # 0.01.
    boost_rate_init: float = 1.0
    # One head for every modality (the reference's common space); false: a head per modality.
    shared_head: bool = True
    # Hidden width of the head Linear-ReLU-Linear (the reference's `Head`: 256); 0: one Linear
    # (BalanceBenchmark's `SharedHead`).
    head_hidden: int = field(default=256, metadata=bounds(0))
    # Every learner is in the ensemble from the start (BalanceBenchmark; the reference with
    # pretrained learners); false: a learner joins when its first boosting phase ends.
    ensemble_from_start: bool = False
    # Clear the optimizer's state (momentum, moments) when a phase starts, as the reference's new
    # SGD per phase does; false: one optimizer state for the run (BalanceBenchmark).
    reset_optimizer: bool = True
    # Step every parameter that has had a gradient earlier in the run with a zero gradient where
    # the loss does not reach it (momentum and weight decay go on), as BalanceBenchmark's one
    # optimizer does under torch 1.12, whose zero_grad zeroes gradients rather than deleting them.
    zero_grad_steps: bool = False
    # Order of the alternation; empty: the dataset's modality order. Reference: audio, visual;
    # text, visual, audio on MOSEI.
    modality_order: list[str] = field(default_factory=list)

    def validate(self, path: str, errors: list[str]) -> None:
        if len(set(self.modality_order)) != len(self.modality_order):
            errors.append(f"{path}.modality_order: {self.modality_order} repeats a modality")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def _promote(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits under autocast); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def boosting_loss(logits: torch.Tensor, label: torch.Tensor, others: torch.Tensor | None,
                  weight1: float, weight2: float, class_mean: bool = False,
                  has_others: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample −(w1 − w2·q)·log softmax(logits)[y], q = softmax(others)[y] (no gradient); q = 1
    where there is no other learner (`others` None, or `has_others` False). `class_mean`: ÷ C."""
    logp = F.log_softmax(_promote(logits), dim=1).gather(1, label.view(-1, 1)).squeeze(1)
    q = torch.ones_like(logp)
    if others is not None:
        q_others = F.softmax(_promote(others.detach()), dim=1).gather(1, label.view(-1, 1)).squeeze(1)
        q = q_others if has_others is None else torch.where(has_others, q_others, q)
    per = -(weight1 - weight2 * q.to(logp.dtype)) * logp
    return per / logits.shape[1] if class_mean else per


def reconcile_loss(logits: torch.Tensor, previous: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Per sample mean_c (softmax(logits) − softmax(previous))²; `previous` never gets a gradient,
    `logits` only with `grad`."""
    p = F.softmax(_promote(logits if grad else logits.detach()), dim=1)
    q = F.softmax(_promote(previous.detach()), dim=1)
    return ((p - q) ** 2).mean(1)


@dataclass(frozen=True)
class Stage:
    """Where an epoch falls in the schedule."""

    index: int  # the stage, from 0
    active: str  # the modality boosted in this stage
    previous: str  # the modality of the previous stage (the reconcilement's other side)
    rectify: bool  # in the global rectification phase
    phase_start: bool  # the first epoch of its phase
    members: tuple[str, ...]  # the ensemble's learners, in summation order


def schedule(epoch: int, order: list[str], boost_epochs: int, correct_epochs: int,
             from_start: bool) -> Stage:
    """The stage of `epoch`: `boost_epochs` boosting then `correct_epochs` rectification epochs,
    modality order[s mod M] in stage s. The ensemble holds every learner that has been active
    (or all, `from_start`), summed from the one after the active one round to it."""
    epoch = max(epoch, 0)
    index, within = divmod(epoch, boost_epochs + correct_epochs)
    k, n = index % len(order), len(order)
    cyclic = [order[(k + 1 + j) % n] for j in range(n)]
    members = tuple(m for m in cyclic if from_start or order.index(m) <= index)
    return Stage(index=index, active=order[k], previous=order[(k - 1) % n],
                 rectify=within >= boost_epochs, phase_start=within in (0, boost_epochs),
                 members=members)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class ReconBoost(Method):
    """Per-modality learners on a shared head, boosted one at a time, then rectified jointly."""

    name = "reconboost"
    single_label = ("its boosting loss weights log p_m(y) by the ensemble's softmax probability of "
                    "the one true class, and its rectification is softmax cross-entropy")
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The authors' train.py (see the module docstring for each quirk).
        "reference": {"recon_grad": False, "class_mean": True, "rerun_previous": True},
        "paper": {},
        # BalanceBenchmark's ReconBoost_trainer.py.
        "balancebench": {"recon_grad": False, "class_mean": True, "rerun_previous": True,
                         "recon_starts": 2, "boost_epochs": 1, "correct_epochs": 1,
                         "boost_rate_init": 0.01, "head_hidden": 0, "ensemble_from_start": True,
                         "reset_optimizer": False, "zero_grad_steps": True},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        opts = self.options
        self.order = list(opts.modality_order) or list(self.modalities)
        if sorted(self.order) != sorted(self.modalities):
            raise ValueError(f"method.options.modality_order={opts.modality_order} must list each "
                             f"modality of dataset {spec.name!r} once: {sorted(self.modalities)}")
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        if opts.shared_head:
            if len(set(dims.values())) != 1:
                raise ValueError(f"method.name=reconboost: the shared head needs one feature width; "
                                 f"the encoders output {dims} (set model.feature_dim, or "
                                 f"method.options.shared_head=false)")
            self.head = self._make_head(next(iter(dims.values())))
        else:
            self.heads = nn.ModuleDict({m: self._make_head(d) for m, d in dims.items()})
        self.boost_rate = nn.Parameter(torch.tensor(float(opts.boost_rate_init)))
        self.epoch = 0  # the epoch being trained or last trained; in the checkpoint
        self.stepped: set[str] = set()  # parameters that have had a gradient (zero_grad_steps)

    def _make_head(self, dim: int) -> nn.Module:
        hidden, classes = self.options.head_hidden, self.spec.num_classes
        if hidden == 0:
            return nn.Linear(dim, classes)
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    # -- schedule and state -------------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        o = self.options
        return schedule(self.epoch, self.order, o.boost_epochs, o.correct_epochs,
                        o.ensemble_from_start)

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stepped": sorted(self.stepped)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.stepped = set(state["stepped"])

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def before_epoch(self, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict[str, float]:
        self.epoch = ctx.epoch
        st = self.stage
        if self.options.reset_optimizer and st.phase_start:
            optimizer.state.clear()  # a new optimizer per phase, as the reference builds
        return {"recon/active": float(self.modalities.index(st.active)),
                "recon/stage": float(st.index), "recon/rectify": float(st.rectify)}

    # -- forward ------------------------------------------------------------------------------
    def learner(self, batch: Batch, m: str) -> torch.Tensor:
        """f_m(x_m) = g(φ_m(x_m)), with φ_m's features zeroed where m is absent."""
        h = self.encoders[m](batch["inputs"][m])
        h = h * batch["present"][m].to(h.dtype).unsqueeze(1)
        return (self.head if self.options.shared_head else self.heads[m])(h)

    def ensemble(self, logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                 members: tuple[str, ...] | list[str]) -> torch.Tensor:
        """β Σ_{m in members} f_m, each learner only where its modality is present."""
        total = None
        for m in members:
            z = logits[m] * present[m].to(logits[m].device, logits[m].dtype).unsqueeze(1)
            total = z if total is None else total + z
        return self.boost_rate * total

    def forward(self, batch: Batch) -> Output:
        per_mod = {m: self.learner(batch, m) for m in self.modalities}
        return Output(self.ensemble(per_mod, batch["present"], self.stage.members), per_mod)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        self.epoch = ctx.epoch
        st = self.stage
        logs = {"recon/boost_rate": self.boost_rate.detach().clone()}
        if st.rectify:
            loss = self._rectify_loss(batch, ctx, st, logs)
        else:
            loss = self._boost_loss(batch, ctx, st, logs)
        zero_stale = self._zero_stale_grads if self.options.zero_grad_steps else None
        out = self.backward_and_step(loss, optimizer, ctx, logs, edit_grads=zero_stale)
        if self.options.zero_grad_steps:
            self.stepped.update(n for n, p in self.named_parameters() if p.grad is not None)
        return out

    def _zero_stale_grads(self) -> None:
        """`zero_grad_steps`: a zero gradient for each parameter stepped before that has none now."""
        for n, p in self.named_parameters():
            if p.grad is None and n in self.stepped:
                p.grad = torch.zeros_like(p)

    def _boost_loss(self, batch: Batch, ctx: StepContext, st: Stage, logs: dict) -> torch.Tensor:
        """Phase 1: only the active learner (its encoder and the head) gets gradients."""
        o, m, label = self.options, st.active, batch["label"]
        present = {n: p.to(ctx.device) for n, p in batch["present"].items()}
        others = [n for n in st.members if n != m]
        with torch.no_grad(), ctx.autocast():  # the others' ensemble, in train mode as the reference
            other_logits = {n: self.learner(batch, n) for n in others}
        with ctx.autocast():
            logits = self.learner(batch, m)
        ens, has_others = None, None
        if others:
            ens = self.ensemble(other_logits, present, others).detach()
            has_others = torch.stack([present[n] for n in others]).any(0)
        per = boosting_loss(logits, label, ens, o.weight1, o.weight2, o.class_mean, has_others)
        loss = logs["loss/boost"] = masked_mean(per, present[m])
        if st.index >= o.recon_starts:
            prev = st.previous
            if o.rerun_previous or prev not in other_logits:
                with torch.no_grad(), ctx.autocast():
                    other_logits[prev] = self.learner(batch, prev)
            rec = masked_mean(reconcile_loss(logits, other_logits[prev], o.recon_grad),
                                present[m] & present[prev])
            logs["loss/recon"] = rec
            loss = loss + o.alpha * rec
        return loss

    def _rectify_loss(self, batch: Batch, ctx: StepContext, st: Stage, logs: dict) -> torch.Tensor:
        """Phase 2: the ensemble's cross-entropy; every member, the head and β get gradients."""
        with ctx.autocast():
            logits = {n: self.learner(batch, n) for n in st.members}
            fused = self.ensemble(logits, batch["present"], st.members)
        loss = logs["loss/ensemble"] = F.cross_entropy(_promote(fused), batch["label"])
        return loss
