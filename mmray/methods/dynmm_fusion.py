"""DynMM, fusion level: a gate picks how many encoder stages fuse the second modality (METHODS.md §5).

Xue & Marculescu, "Dynamic Multimodal Fusion", CVPR-W 2023. Reference code:
https://github.com/zihuixue/DynMM (`FusionDynMM/src/models/model_skip_mod_globalgate.py`:
`SkipGateESANet`, `GlobalGate`; `FusionDynMM/train.py`; `ExpDecayTemp` in `FusionDynMM/src/utils.py`;
defaults in `FusionDynMM/src/args.py`), read at commit cbab632cd943195fd7ddaffb43d2d0a5388a9068.

Two small-CNN stage stacks with S = 3 stages: the primary modality (RGB) and the secondary one
(depth). Choice k ∈ {0, …, S}: the secondary's stage-j output is added to the primary's for
j ≤ k, and the primary's next stage reads the fused map (the secondary's next stage reads its own).
A gate MLP on cheap inputs gives w over the S + 1 choices; during training every stage runs and
stage j is fused with weight f_j = Σ_{k ≥ j} w_k. The temperature decays per epoch as

    τ_e = τ₀ · (τ_end / τ₀)^(min(e, E_hard) / E_hard)        (1.0 → 0.001 by default)

with soft gating before epoch E_hard and straight-through hard gating from it. The loss is
task + λ · max(0, E[FLOPs] / C_S − budget), E[FLOPs] = Σ_k mean(w_k) · C_k, with the cost C_k of
every choice measured by `mmray.cost.flops_per_sample` when the method is built. At evaluation
each sample runs only the secondary stages its choice needs.

Presets (`method.preset`):
- `reference`: what `train.py --dynamic --global-gate` runs with the README's best command
  (`--loss-ratio 1e-4 --temp 1.0 --end-temp 0.001 --epoch_ini 0 --epoch_hard 500`), which are
  the `src/args.py` defaults except λ (`--loss-ratio` defaults to 0.0, which drops the term):
  - `epochs_hard: 500`: `--epoch-hard` 500 = `--epochs` 500, so the gate is soft for all of
    training (`model.hard_gate = epoch >= args.epoch_hard`) and hard only in validation.
  - `hold_end_temperature: false`: `ExpDecayTemp.get_t` is τ₀ · b^e, b = (τ_end/τ₀)^(1/E_hard),
    with no floor at τ_end.
  - `resource_secondary_gflops: true`: the term is the mean over the choices of
    mean_batch(w_k) · D_k, D_k the depth encoder's GFLOPs for choice k (`SkipGateESANet.forward`,
    typed in as `depth_enc_flop`), and `train.py` adds λ · max(0, term − `--flop-budget`).
  - `resource_weight: 1e-4`, `flops_budget: 0.0`, `init_epochs: 0` (`--epoch-ini`), τ₀ 1.0, τ_end
    0.001 (the last two are the Config defaults).
  Not options (set them in `train`, where mmray can): SGD lr 0.01 (scaled by batch / 8),
  momentum 0.9, Nesterov (mmray's SGD has none), weight decay 1e-4, OneCycleLR stepped per epoch,
  batch 8, 500 epochs; the best run fine-tunes a checkpoint trained with hard gating (`--finetune`).
  The README spells `--epoch_ini`, `--epoch_hard`, which `src/args.py` does not define (it has
  `--epoch-ini`, `--epoch-hard`); their values are its defaults.
- `paper`: {} — the Config defaults: the paper's resource-aware loss (expected cost of the chosen
  fusion operations, here E[FLOPs] / C_S, with no budget) and its annealed temperature.

Where mmray differs from the reference implementation (under any preset):
- Classification with `SmallCNN` stages (3 stages, 4 choices); the reference segments with an
  ESANet whose ResNet has 4 stages plus an always-fused stem (5 choices).
- The gate reads the pooled raw inputs (`mmray.modules.gating.GateInput`), not the stem features
  through two convs.
- By default the resource term is normalised: E[FLOPs] / C_S against a budget given as a fraction
  of C_S; `resource_secondary_gflops` computes the reference's, with D_k measured (the secondary's
  first k stages, so D_0 = 0: there is no always-fused stem) rather than typed in.
- By default τ stays at τ_end after E_hard; the reference keeps decaying (with hard gating it then
  only scales the straight-through gradient). E_hard = 0 means no decay, as in the reference.
- `init_epochs` gives each sample a random choice with the gate idle (the reference's `ini_stage`);
  the reference still adds λ · max(0, term − budget) of those one-hot weights to the loss (a
  constant), mmray leaves the term out then. Everything trains jointly from scratch (the
  reference fine-tunes a pretrained ESANet).
- Fusion is plain addition (the reference's `add`; `SE-add`, the default of `src/args.py`'s
  `--fuse_depth_in_rgb_encoder`, is not offered). A secondary map of another size is
  average-pooled to the primary's; missing secondary samples add nothing, and a missing primary's
  first-stage map is zeroed, so only the fused secondary stages inform it.
- Per-modality logits are a decomposition of the last stage: z_secondary = f_S · W_h W_p pool(s_S)
  + b_h / 2 and z_primary = z − z_secondary (head W_h, b_h; projection W_p). Computing them is
  part of the measured C_S (2·(4w·d + d·C) FLOPs, small next to a conv stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.cost import flops_per_sample
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.encoders.small import SmallCNN
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext
from mmray.modules.gating import (
    GateInput,
    example_batch,
    expected_flops,
    gate_mlp,
    gate_weights,
    subset,
)

STAGES = 3  # SmallCNN's conv stages: body[0], body[1], body[2]


@dataclass
class Config:
    # The backbone modality (RGB); the other one (depth) is fused into its stages. Empty: the
    # dataset's first modality.
    primary: str = ""
    # τ₀ and τ_end of the exponential temperature decay.
    temperature: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))
    end_temperature: float = field(default=0.001, metadata=bounds(0.0, None, lo_open=True))
    # E_hard: epochs of soft gating over which τ decays; straight-through hard gating from then on.
    epochs_hard: int = field(default=2, metadata=bounds(0))
    # Epochs with a random choice per sample and the gate idle (trains every fusion depth).
    init_epochs: int = field(default=0, metadata=bounds(0))
    # Add Gumbel(0, 1) noise to the gate logits during training.
    gumbel: bool = False
    # λ of the resource loss λ · max(0, E[FLOPs] / C_S − budget).
    resource_weight: float = field(default=0.1, metadata=bounds(0.0, None))
    # FLOPs budget: a fraction of C_S (every stage fused), or with resource_secondary_gflops in
    # that term's units (GFLOPs averaged over the choices); 0 pushes towards fusing less.
    flops_budget: float = field(default=0.0, metadata=bounds(0.0, None))
    # Hidden width of the gate MLP.
    gate_hidden: int = field(default=32, metadata=bounds(1))
    # Hold τ at τ_end from epoch E_hard on; false: keep decaying past it, as the reference does.
    hold_end_temperature: bool = True
    # The reference's resource term: mean over the S + 1 choices of mean_batch(w_k) · D_k, D_k the
    # GFLOPs per sample of the secondary stages choice k runs; false: E[FLOPs] / C_S.
    resource_secondary_gflops: bool = False

    def validate(self, path: str, errors: list[str]) -> None:
        if self.init_epochs > self.epochs_hard:
            errors.append(f"{path}.init_epochs: {self.init_epochs} is after epochs_hard="
                          f"{self.epochs_hard}; random-path epochs must come before hard gating")
        if not self.resource_secondary_gflops and self.flops_budget > 1:
            errors.append(f"{path}.flops_budget: {self.flops_budget} is a fraction of C_S, in "
                          "[0, 1] (a budget in GFLOPs needs resource_secondary_gflops: true)")


def temperature_at(epoch: int, start: float, end: float, epochs_hard: int,
                   hold: bool = True) -> float:
    """τ_e = τ₀ (τ_end / τ₀)^(e / E_hard), e capped at E_hard when `hold`; τ₀ when E_hard = 0."""
    if epochs_hard <= 0:
        return start
    e = min(epoch, epochs_hard) if hold else epoch
    return start * (end / start) ** (e / epochs_hard)


def stage_fusion_weights(weights: torch.Tensor) -> torch.Tensor:
    """f_j = Σ_{k ≥ j} w_k for stages j = 1..S: the weight with which stage j is fused, (B, S)."""
    tail_sums = weights.flip(-1).cumsum(-1).flip(-1)  # [Σ_{k≥0}, Σ_{k≥1}, …, w_S]
    return tail_sums[:, 1:]


def _align(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s if s.shape[-2:] == like.shape[-2:] else F.adaptive_avg_pool2d(s, like.shape[-2:])


class DynMMFusion(Method):
    """A primary CNN into whose first k stages the secondary CNN's features are added; k is gated."""

    name = "dynmm_fusion"
    Config = Config
    modalities_supported = (2,)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {"epochs_hard": 500, "hold_end_temperature": False,
                      "resource_secondary_gflops": True, "resource_weight": 1e-4,
                      "flops_budget": 0.0, "init_epochs": 0},
        "paper": {},
    }

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str:
        flat = [m for m, s in spec.modalities.items() if len(s.shape) != 3]
        return super().unsupported(spec) or (
            f"{cls.name} fuses (C, H, W) maps stage by stage; modalities {flat} of dataset "
            f"{spec.name!r} are not images or spectrograms (use method.name=dynmm for feature "
            "vectors)" if flat else "")

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        if not all(isinstance(e, SmallCNN) for e in self.encoders.values()):
            raise ValueError("method.name=dynmm_fusion needs model.encoder=small (it fuses "
                             "inside the SmallCNN stages)")
        primary = self.options.primary or self.modalities[0]
        if primary not in spec.modalities:
            raise ValueError(f"method.options.primary: {primary!r} is not a modality of dataset "
                             f"{spec.name!r} ({list(spec.modalities)})")
        self.primary = primary
        self.secondary = next(m for m in self.modalities if m != primary)
        # Only the secondary's stages are used; its pooling and projection never run.
        self.encoders[self.secondary].proj = nn.Identity()
        self.head = nn.Linear(self.encoders[primary].out_dim, spec.num_classes)
        self.gate_input = GateInput(spec)
        self.gate = gate_mlp(self.gate_input.out_dim, self.options.gate_hidden, STAGES + 1)
        self.temperature = self.options.temperature
        self.hard = False
        self.random_paths = False
        example = example_batch(spec)
        costs = [flops_per_sample(self, example, call=lambda b, k=k: self.forward_fixed(b, k))
                 for k in range(STAGES + 1)]
        self.register_buffer("choice_flops", torch.tensor(costs, dtype=torch.float32),
                             persistent=False)  # measured, never loaded from a checkpoint
        secondary = [flops_per_sample(self, example, call=lambda b, k=k: self.secondary_stages(b, k))
                     for k in range(STAGES + 1)]
        self.register_buffer("secondary_flops", torch.tensor(secondary, dtype=torch.float32),
                             persistent=False)  # D_k: what the secondary alone costs for choice k
        self.gate_flops = flops_per_sample(self, example, call=self.gate_logits)
        self._eval_counts = torch.zeros(STAGES + 1)  # samples per choice in `predict`
        self.on_epoch_start(0)

    # -- schedule -----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        o = self.options
        self.temperature = temperature_at(epoch, o.temperature, o.end_temperature, o.epochs_hard,
                                          hold=o.hold_end_temperature)
        self.hard = epoch >= o.epochs_hard
        self.random_paths = epoch < o.init_epochs

    # -- forward ------------------------------------------------------------------------------
    def stages(self, m: str) -> list[nn.Module]:
        return [self.encoders[m].body[j] for j in range(STAGES)]

    def gate_logits(self, batch: Batch) -> torch.Tensor:
        return self.gate(self.gate_input(batch))

    def route(self, batch: Batch) -> torch.Tensor:
        """Training-time weights over the choices (B, S + 1)."""
        logits = self.gate_logits(batch)
        if self.random_paths:
            pick = torch.randint(0, STAGES + 1, (logits.shape[0],), device=logits.device)
            return F.one_hot(pick, STAGES + 1).float()
        return gate_weights(logits, self.temperature, self.hard,
                            gumbel=self.options.gumbel and self.training)

    def _fuse(self, batch: Batch, fuse: list[torch.Tensor | None]) -> Output:
        """Run the stages; fuse[j] is stage j's per-sample fusion weight, None to skip it."""
        p, s = batch["inputs"][self.primary], batch["inputs"][self.secondary]
        present = batch["present"][self.secondary].float().view(-1, 1, 1, 1)
        present_p = batch["present"][self.primary].view(-1, 1, 1, 1)
        for j, (stage_p, stage_s) in enumerate(zip(self.stages(self.primary), self.stages(self.secondary))):
            p = stage_p(p)
            if j == 0:  # an absent primary contributes nothing; fused secondary maps still flow
                p = p * present_p.to(p.dtype)
            if fuse[j] is not None:
                s = stage_s(s)  # the secondary's stage j runs only when it is fused
                p = p + fuse[j].view(-1, 1, 1, 1).to(p.dtype) * present * _align(s, p)
        enc = self.encoders[self.primary]
        logits = self.head(enc.proj(enc.body[STAGES:](p)))
        z_sec = self.head.bias / 2 + torch.zeros_like(logits)
        if fuse[-1] is not None:
            pooled = F.adaptive_avg_pool2d(_align(s, p) * present, 1).flatten(1)
            block = F.linear(F.linear(pooled, enc.proj.weight), self.head.weight)
            z_sec = z_sec + fuse[-1].view(-1, 1).to(block.dtype) * block
        return Output(logits, {self.primary: logits - z_sec, self.secondary: z_sec})

    def secondary_stages(self, batch: Batch, k: int) -> torch.Tensor:
        """The secondary's first k stages alone (what choice k adds; measured as D_k)."""
        s = batch["inputs"][self.secondary]
        for stage in self.stages(self.secondary)[:k]:
            s = stage(s)
        return s

    def forward_fixed(self, batch: Batch, k: int) -> Output:
        """Choice k for the whole batch: only the secondary's first k stages run."""
        ones = torch.ones(next(iter(batch["inputs"].values())).shape[0],
                          device=self.head.weight.device)
        return self._fuse(batch, [ones if j < k else None for j in range(STAGES)])

    def mixture(self, batch: Batch, weights: torch.Tensor) -> Output:
        f = stage_fusion_weights(weights)
        return self._fuse(batch, [f[:, j] for j in range(STAGES)])

    def forward(self, batch: Batch) -> Output:
        return self.mixture(batch, self.route(batch))

    def predict(self, batch: Batch) -> Output:
        """Hard choice per sample; samples are grouped by choice and run only what it needs."""
        choice = self.gate_logits(batch).argmax(1)
        logits = torch.zeros(choice.shape[0], self.spec.num_classes, device=choice.device)
        per_mod = {m: torch.zeros_like(logits) for m in self.modalities}
        for k in range(STAGES + 1):
            idx = (choice == k).nonzero(as_tuple=True)[0]  # a host sync: routing needs the sizes
            if idx.numel() == 0:
                continue
            out = self.forward_fixed(subset(batch, idx), k)
            logits = logits.index_put((idx,), out.logits.float())
            for m, z in out.per_modality.items():
                per_mod[m] = per_mod[m].index_put((idx,), z.float())
        self._eval_counts += torch.bincount(choice, minlength=STAGES + 1).cpu().float()
        return Output(logits, per_mod)

    def eval_counts(self) -> torch.Tensor:
        """Samples given each choice k by `predict` since the last call (then reset)."""
        counts, self._eval_counts = self._eval_counts, torch.zeros_like(self._eval_counts)
        return counts

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        """Fraction of samples per choice, E[FLOPs] per sample and the saving against C_S."""
        frac = counts.float() / counts.sum().clamp(min=1)
        flops = expected_flops(frac.unsqueeze(0), self.choice_flops.cpu())
        return {**{f"dynmm/route_k{k}": float(frac[k]) for k in range(STAGES + 1)},
                "dynmm/flops": float(flops),
                "dynmm/flops_saving": float(1 - flops / self.choice_flops.max().cpu())}

    # -- loss and step ------------------------------------------------------------------------
    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        self.on_epoch_start(ctx.epoch)  # idempotent: the schedule is a function of the epoch
        costs = self.choice_flops
        with ctx.autocast():
            weights = self.route(batch)
            out = self.mixture(batch, weights)
        task = self.criterion(out.logits, batch["label"])
        flops = expected_flops(weights, costs)
        over = torch.clamp(self.resource_used(weights, flops) - self.options.flops_budget, min=0)
        loss = task if self.random_paths else task + self.options.resource_weight * over
        chosen = F.one_hot(weights.detach().argmax(1), STAGES + 1).float().mean(0)
        return self.backward_and_step(loss, optimizer, ctx, {
            "loss/task": task, "loss/resource": over, "dynmm/flops": flops,
            "dynmm/flops_saving": 1 - flops / costs.max(), "dynmm/temperature": self.temperature,
            **{f"dynmm/route_k{k}": chosen[k] for k in range(STAGES + 1)}})

    def resource_used(self, weights: torch.Tensor, flops: torch.Tensor) -> torch.Tensor:
        """What the budget bounds: E[FLOPs] / C_S, or the reference's mean_k(mean_b(w_k) · D_k)."""
        if self.options.resource_secondary_gflops:
            return (weights.mean(0) * self.secondary_flops * 1e-9).mean()
        return flops / self.choice_flops.max()

    def epoch_metrics(self) -> dict[str, float]:
        """The measured cost (FLOPs per sample) of every choice and of the gate."""
        costs = {f"dynmm/cost_k{k}": float(c) for k, c in enumerate(self.choice_flops)}
        return {**costs, "dynmm/cost_gate": float(self.gate_flops)}
