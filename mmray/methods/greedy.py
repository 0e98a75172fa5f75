"""Greedy: balanced multi-modal learning guided by the conditional learning speed (METHODS.md §9).

Wu, Jastrzębski, Cho, Geras. "Characterizing and overcoming the greedy nature of learning in
multi-modal deep neural networks", ICML 2022. Reference code:
https://github.com/nyukat/greedy_multimodal_learning, read at commit
a190e03755bd8d0883b2c5c0cd7921d2561ce2ee (`src/model.py` MMTM_MVCNN, `src/balanced_mmtm.py`
MMTM_mitigate, `src/callbacks.py` Bias_Mitigation_Strong, `src/framework.py` Model_.train_loop,
`train.py` blend_loss, `configs/training_guided.gin`). BalanceBenchmark's re-run:
https://github.com/GeWu-Lab/BalanceBenchmark at 4c1482fca5aaa8d4278af8e26020daa039e3ccf3
(`balancemm/trainer/Greedy_trainer.py`, `balancemm/models/avclassify_model.py`
BaseClassifierGreedyModel and MMTM, `configs/trainer_config.yaml` Greedy).

The model. Two branches, encoder φ_m → h_m, joined by a multimodal transfer module (MMTM) that
recalibrates each branch's features with a gate computed from both modalities:

    e = ReLU(W_s [h_0; h_1] + b_s)       (width ⌊2(d_0 + d_1) / ratio⌋, shared)
    g_m = σ(W_m e + b_m);  h̃_m = g_m ⊙ h_m
    z_m = head_m(h̃_m);  z = (z_0 + z_1) / 2;  loss = Σ_m CE(z_m, y)   (`loss: branches`)

Conditional learning speed. The parameters of branch m fall in two groups: main_m (φ_m and
head_m) and bypass_m (W_m, b_m and the shared W_s, b_s, counted in both), the path by which the
other modality reaches branch m. After each regular step's backward, each group's rate
‖∇θ‖² / ‖θ‖² (squares summed over the group's tensors, then divided) is added to a running sum
over the run, M_main,m and M_bypass,m, and

    BDR_m = log10(M_bypass,m / M_main,m);   d = BDR_0 − BDR_1

(the reference's names; BDR_m is how fast branch m learns from the other modality relative to
its own, the paper's conditional learning speed). Re-balancing: once the warm-up is over, a
regular step with |d| > α (`threshold`) starts `window` re-balancing steps that care for branch
m* = 0 if d > 0 else 1, the branch that leans on the other modality (its own modality m* is
the under-used one). In them branch m*'s gate
g_m* is replaced by the running average of its gates over the forwards so far (detached, one
vector for the whole batch): branch m* gets no sample-specific information from the other
modality and has to learn from its own features, and W_m* gets a zero gradient. The other
branch keeps its live gate. The speeds are neither measured nor summed in re-balancing steps;
after the window a regular step measures d again. The paper's conditional utilization rate (the
accuracy a branch gains from the other modality, measured with the cross-modal flow replaced by
training-set averages: the reference's `eval.py` with `mmtm_off`) is an analysis of a trained
model, not part of training; mmray does not compute it.

Presets (`method.preset`):
- `reference`: the authors' code (`configs/training_guided.gin`: epsilon 0.01, window 5,
  starting_epoch 2 of epochs counted from 1, MMTM ratio 4, `blend_loss`), with its quirks:
  - `average_in_eval: true`: MMTM_mitigate updates its running average (and its `step` counter)
    in every forward, validation and test included;
  - `eval_follows_curation: true`: Model_ passes its `curation_mode` to the evaluation forwards
    too, so an epoch that ends inside a window is evaluated with the averaged gate;
  - `shared_average: true`: `running_avg_weight_skeleton` is updated with `vis_out`, so both
    branches' averages are the average of the first branch's gates (the reference's two widths
    are equal; mmray needs equal feature widths for this).
- `balancebench`: BalanceBenchmark's trainer: `loss: fused` (its GreedyTrainer trains the concat
  fusion head's CE only; the head is in neither group of its `compute_learning_speed`),
  `threshold: 0.001`, `warmup_epochs: 0` (no unlock), `average_in_eval: true` (its MMTM counts
  every forward). Its validation forwards take the default `curation_mode=False`. Its MMTM at
  4c1482f resets `running_avg_weight` to {} at the start of each forward and then reads it (a
  KeyError on the first forward); the preset follows its commit 3f27575, where the average
  accumulates. Its optimizer deletes gradients (`zero_grad` in PyTorch 2), so a replaced gate's
  layer is skipped by the optimizer where mmray hands it a zero gradient (see below).
- `paper`: {}, the Config defaults: the reference's algorithm and hyper-parameters without the
  three quirks (each branch averages its own gates, over training forwards only; evaluation uses
  the live gates). The paper's text does not settle these details.

Where mmray differs from the reference implementation, whatever the preset:
- One MMTM on the encoders' output features (squeeze = the feature vector itself) instead of
  MMTMs inside the CNNs after ResNet stages 2, 3 and 4 (BalanceBenchmark: 1 to 4), since mmray's
  encoders are closed and output one vector per modality. On (B, C) features the reference's
  squeeze (a mean over spatial positions) is the identity, so this is its MMTM_mitigate at one
  position; the main group is then the whole encoder plus the head.
- The mode is kept as tensors and the replaced gate is chosen with `torch.where`, so a step needs
  no device-to-host copy; the replaced gate's excitation layer therefore gets a zero gradient,
  as under the reference's PyTorch (its `zero_grad` zeroes), not none (BalanceBenchmark): with
  momentum or Adam that layer still moves by its momentum.
- The rates are measured in `grad_norms`, which `backward_and_step` calls after the gradients are
  averaged across Ray Train workers and before the step: every worker measures the same d and
  keeps the same mode. The batch's mean gates are summed over workers before they enter the
  average (one small all-reduce per step), so the averages match too; with `average_in_eval`,
  evaluation forwards add each worker's own batches (the checkpoint holds rank 0's).
- All of this state (the sums, d, the mode, the caring branch, the step in the window, the
  averages and their count) is in buffers, so it is checkpointed; the reference keeps it in the
  callback and MMTM attributes (lost on resume).
- Missing modalities: each branch's loss averages over the samples where its modality is
  present, and the prediction averages the present branches' logits.
- Only trainable parameters enter the groups (frozen backbones have no gradient).
- `method.fusion` is used by `loss: fused` only; `branches` has a head per branch.
- Two modalities only, as in both references: d compares two branches and a window cares for one
  of the two. Multi-label datasets are supported: the criterion is BCE and nothing else of the
  method depends on the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext
from mmray.methods.unimodal import present_mean
from mmray.modules.fusion import LateFusion


@dataclass
class Config:
    # α: a regular step with |BDR_0 − BDR_1| > α starts re-balancing. Reference 0.01,
    # BalanceBenchmark 0.001.
    threshold: float = field(default=0.01, metadata=bounds(0.0))
    # Q: re-balancing steps per trigger (the reference's curation_windowsize); 5 in both.
    window: int = field(default=5, metadata=bounds(1))
    # Epochs whose steps measure the speeds but never start re-balancing. Reference 1
    # (starting_epoch=2, its epochs counted from 1); BalanceBenchmark 0.
    warmup_epochs: int = field(default=1, metadata=bounds(0))
    # MMTM bottleneck: the shared squeeze layer is ⌊2(d_0 + d_1) / ratio⌋ wide; 4 in both.
    ratio: int = field(default=4, metadata=bounds(1))
    # branches: a head per branch, loss Σ_m L(z_m), prediction their mean (the reference);
    # fused: the late-fusion head (`method.fusion`) on the gated features, loss L(z), the head in
    # neither group (BalanceBenchmark).
    loss: Literal["branches", "fused"] = "branches"
    # Evaluation forwards add their gates to the running average too (both references).
    average_in_eval: bool = False
    # Evaluation forwards inside a re-balancing window use the averaged gate (the reference).
    eval_follows_curation: bool = False
    # Both averages are built from the first branch's gates (the reference's
    # running_avg_weight_skeleton reads vis_out); needs equal feature widths.
    shared_average: bool = False


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t ‖t‖² in float64: each tensor's sum of squares in its own dtype, as the reference's
    `(p ** 2).sum().item()`, then added up in double precision."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([t.detach().pow(2).sum().double() for t in tensors]).sum()


def speed_gap(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the running sums (2 groups [main, bypass] × 2 branches): BDR_m =
    log10(M_bypass,m / M_main,m) per branch and d = BDR_0 − BDR_1."""
    bdr = torch.log10(sums[1] / sums[0])
    return bdr, bdr[0] - bdr[1]


def next_mode(curation: torch.Tensor, caring: torch.Tensor, step: torch.Tensor, gap: torch.Tensor,
              unlocked: bool, threshold: float, window: int):
    """The mode after a step, as Bias_Mitigation_Strong.on_backward_end sets it. A regular step
    (not `curation`) starts a window when unlocked and |d| > α, caring for branch 0 if d > 0
    else 1, and otherwise leaves caring at 0; a window step counts, and the window ends when the
    count reaches `window`. Tensor ops only. Returns (curation, caring, step)."""
    regular = ~curation
    trigger = regular & (gap.abs() > threshold) if unlocked else torch.zeros_like(curation)
    side = torch.where(gap > 0, 0, 1).to(caring)
    new_caring = torch.where(trigger, side, torch.where(regular, torch.zeros_like(caring), caring))
    counted = step + 1
    new_step = torch.where(trigger, torch.zeros_like(step), torch.where(curation, counted, step))
    new_curation = torch.where(regular, trigger, counted != window)
    return new_curation, new_caring, new_step


# ---------------------------------------------------------------------------------------------
# The multimodal transfer module at the feature level
# ---------------------------------------------------------------------------------------------


class FeatureMMTM(nn.Module):
    """g_m = σ(W_m ReLU(W_s [h_0; h_1] + b_s) + b_m), and the running average of each g_m."""

    def __init__(self, dims: dict[str, int], ratio: int):
        super().__init__()
        total = sum(dims.values())
        width = int(2 * total / ratio)
        self.squeeze = nn.Linear(total, width)
        self.excite = nn.ModuleDict({m: nn.Linear(width, d) for m, d in dims.items()})
        for m, d in dims.items():
            self.register_buffer(f"average_{m}", torch.zeros(d))
        # How many batch means the averages hold (the reference's MMTM `step`).
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def gates(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        e = F.relu(self.squeeze(torch.cat([feats[m] for m in self.excite], dim=1)))
        return {m: torch.sigmoid(fc(e)) for m, fc in self.excite.items()}

    def average(self, m: str) -> torch.Tensor:
        return getattr(self, f"average_{m}")

    @torch.no_grad()
    def add_to_average(self, means: dict[str, torch.Tensor]) -> None:
        """avg ← (mean + avg·n) / (n + 1): the reference's running mean of the batch means."""
        n = self.count
        for m, mean in means.items():
            avg = self.average(m)
            avg.copy_((mean.to(avg.dtype) + avg * n) / (n + 1))
        self.count += 1


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class Greedy(Method):
    """Two MMTM-joined branches, re-balanced when their conditional learning speeds drift apart."""

    name = "greedy"
    mixed_branches = ("its gate recalibrates each branch's features with a squeeze of both "
                      "modalities, so a branch's logits see the other modality too")
    Config = Config
    modalities_supported = (2,)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # Each quirk is named in the module docstring.
        "reference": {"average_in_eval": True, "eval_follows_curation": True,
                      "shared_average": True},
        "balancebench": {"loss": "fused", "threshold": 0.001, "warmup_epochs": 0,
                         "average_in_eval": True},
        "paper": {},
    }

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str:
        if len(spec.modalities) != 2:
            return (f"greedy needs exactly 2 modalities: its conditional learning speed compares "
                    f"two branches (d = BDR_0 − BDR_1) and a re-balancing window cares for one "
                    f"of the two; dataset {spec.name!r} has {list(spec.modalities)}")
        return ""

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        o = self.options
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        if o.shared_average and len(set(dims.values())) != 1:
            raise ValueError(f"method.options.shared_average: the reference builds both averages "
                             f"from the first branch's gates, which needs equal feature widths; "
                             f"the encoders output {dims} (set model.feature_dim, or "
                             f"shared_average=false)")
        if 2 * sum(dims.values()) < o.ratio:
            raise ValueError(f"method.options.ratio={o.ratio} leaves the MMTM's squeeze layer "
                             f"⌊2·{sum(dims.values())}/{o.ratio}⌋ = 0 wide; use a ratio of at "
                             f"most {2 * sum(dims.values())}")
        self.mmtm = FeatureMMTM(dims, o.ratio)
        if o.loss == "branches":
            self.heads = nn.ModuleDict({m: nn.Linear(d, spec.num_classes) for m, d in dims.items()})
        else:
            self.head = LateFusion(dims, spec.num_classes, method_cfg.fusion)
        # [main, bypass] × branch running sums of ‖∇θ‖²/‖θ‖² (float64, as the reference's floats).
        self.register_buffer("speed_sums", torch.zeros(2, 2, dtype=torch.float64))
        self.register_buffer("gap", torch.zeros((), dtype=torch.float64))  # d, last measured
        self.register_buffer("curation", torch.zeros((), dtype=torch.bool))
        self.register_buffer("caring", torch.zeros((), dtype=torch.long))
        self.register_buffer("curation_step", torch.zeros((), dtype=torch.long))
        for m in self.modalities:
            for kind, params in zip(("main", "bypass"), self.groups(m), strict=True):
                if not params:
                    raise ValueError(f"method.name=greedy: branch {m!r} has no trainable {kind} "
                                     f"parameters to measure its learning speed")

    def groups(self, m: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(main, bypass) trainable parameters of branch m (see the module docstring)."""
        main = list(self.encoders[m].parameters())
        if self.options.loss == "branches":
            main += list(self.heads[m].parameters())
        bypass = [*self.mmtm.excite[m].parameters(), *self.mmtm.squeeze.parameters()]
        return ([p for p in main if p.requires_grad], [p for p in bypass if p.requires_grad])

    # -- forward ------------------------------------------------------------------------------
    def caring_mask(self) -> dict[str, torch.Tensor]:
        """Per branch, whether this step replaces its gate by its average (0-dim bool)."""
        return {m: self.curation & (self.caring == i) for i, m in enumerate(self.modalities)}

    def gate_means(self, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch mean of each gate; both the first branch's under `shared_average`."""
        first = self.modalities[0]
        out = {}
        for m in self.modalities:
            g = gates[first if self.options.shared_average else m].detach()
            out[m] = g.to(torch.promote_types(g.dtype, torch.float32)).mean(0)  # bf16: in float32
        return out

    def outputs(self, batch: Batch, feats: dict[str, torch.Tensor], gates: dict[str, torch.Tensor],
                care: dict[str, torch.Tensor] | None) -> Output:
        """Gate the features (the averaged gate where `care` says so) and read the heads."""
        gated = {}
        for m in self.modalities:
            g = gates[m]
            if care is not None:
                g = torch.where(care[m], self.mmtm.average(m).to(g.dtype).expand_as(g), g)
            gated[m] = feats[m] * g
        if self.options.loss == "fused":
            fused, per_mod = self.head(gated)
            return Output(fused, per_mod)
        per_mod = {m: self.heads[m](gated[m]) for m in self.modalities}
        return Output(present_mean(per_mod, batch["present"]), per_mod)

    def forward(self, batch: Batch) -> Output:
        o = self.options
        feats = self.features(batch)
        gates = self.mmtm.gates(feats)
        if not self.training and o.average_in_eval:
            self.mmtm.add_to_average(self.gate_means(gates))
        routed = self.training or o.eval_follows_curation
        return self.outputs(batch, feats, gates, self.caring_mask() if routed else None)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        o = self.options
        regular = ~self.curation.clone()  # the mode this step runs in
        care = self.caring_mask()
        with ctx.autocast():
            feats = self.features(batch)
            gates = self.mmtm.gates(feats)
            self.mmtm.add_to_average(self.worker_mean(self.gate_means(gates), ctx))
            out = self.outputs(batch, feats, gates, care)
        logs: dict[str, torch.Tensor] = {}
        if o.loss == "fused":
            loss = self.masked_criterion(out.logits, batch["label"])
        else:
            for m in self.modalities:
                logs[f"loss/{m}"] = self.masked_criterion(out.per_modality[m], batch["label"],
                                                   batch["present"][m])
            loss = sum(logs.values())
        step = self.backward_and_step(loss, optimizer, ctx, logs)
        rates = torch.stack([torch.stack([step.pop(f"greedy/rate_{kind}_{m}")
                                          for m in self.modalities])
                             for kind in ("main", "bypass")])
        self.advance(rates, regular, unlocked=ctx.epoch >= o.warmup_epochs)
        bdr, _ = speed_gap(self.speed_sums)
        step["greedy/curation"] = (~regular).float()
        step["greedy/d_speed"] = self.gap.clone()
        for i, m in enumerate(self.modalities):
            step[f"greedy/bdr_{m}"] = bdr[i]
            step[f"greedy/rebalance_{m}"] = care[m].float()
        return step

    @staticmethod
    def worker_mean(means: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The mean over Ray Train workers of each worker's batch means (itself with one)."""
        names = list(means)
        one = means[names[0]].new_ones(1)  # counts the workers
        flat = ctx.reduce_sum(torch.cat([*(means[m] for m in names), one]))
        parts = flat[:-1].split([means[m].numel() for m in names])
        return {m: p / flat[-1] for m, p in zip(names, parts, strict=True)}

    def grad_norms(self) -> dict[str, torch.Tensor]:
        """The encoders' gradient norms, and each group's rate ‖∇θ‖²/‖θ‖² for the speed: this
        runs after the average across workers and before the step, where the reference's
        `on_backward_end` measures (a parameter without a gradient counts as zero)."""
        out = super().grad_norms()
        for m in self.modalities:
            for kind, params in zip(("main", "bypass"), self.groups(m), strict=True):
                grads = squared_norm([p.grad for p in params if p.grad is not None])
                out[f"greedy/rate_{kind}_{m}"] = grads.to(params[0].device) / squared_norm(params)
        return out

    @torch.no_grad()
    def advance(self, rates: torch.Tensor, regular: torch.Tensor, unlocked: bool) -> None:
        """After a step: a regular step adds its rates to the sums and measures d; then the mode
        moves on (`next_mode`)."""
        o = self.options
        self.speed_sums.copy_(torch.where(regular, self.speed_sums + rates.to(self.speed_sums),
                                          self.speed_sums))
        _, gap = speed_gap(self.speed_sums)
        self.gap.copy_(torch.where(regular, gap, self.gap))
        mode = next_mode(self.curation, self.caring, self.curation_step, self.gap, unlocked,
                         o.threshold, o.window)
        for buf, value in zip((self.curation, self.caring, self.curation_step), mode, strict=True):
            buf.copy_(value)
