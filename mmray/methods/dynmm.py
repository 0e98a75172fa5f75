"""DynMM, modality level: a gate routes each sample to one expert (METHODS.md §5).

Xue & Marculescu, "Dynamic Multimodal Fusion", CVPR-W 2023. Reference code:
https://github.com/zihuixue/DynMM (`ModalityDynMM/multimedia/imdb_dyn.py`: `DiffSoftmax`,
`DynMMNet`; training in `ModalityDynMM/training_structures/Supervised_Learning.py`), read at commit
cbab632cd943195fd7ddaffb43d2d0a5388a9068.

Experts e = 1..E are inference paths of different cost C_e (text-only and late fusion on
MM-IMDB). A gate MLP on cheap inputs (`mmray.modules.gating`, shared with the fusion level)
gives logits g; w = softmax(g / τ), and with hard gating the straight-through
w = onehot(argmax w) − stopgrad(w) + w (optionally with Gumbel noise on g). The prediction is
z = Σ_e w_e z^e and the loss

    L = task(z, y) + λ · mean_batch(Σ_e w_e C_e / C_max),

task = BCE-with-logits for multi-label datasets, CE otherwise. Training has two stages: for
`pretrain_epochs` epochs the experts train on Σ_e task(z^e, y) with the gate idle; then the gate
trains on L, with the experts frozen (`freeze_experts`) or trained along. At evaluation
(`predict`) gating is hard and only the selected expert runs for each sample. Reported: the
fraction routed to each expert, the expected FLOPs per sample Σ_e mean(w_e)·C_e and the saving
1 − E[FLOPs] / C_max.

Presets (`method.preset`):
- `reference`: what `imdb_dyn.py` runs with its own defaults (the README's command
  `imdb_dyn.py (--freeze) (--hard-gate) --reg λ` without the optional flags):
  - `hard_gate: false`: `--hard` is a store_true flag, off unless given (`model.hard_gate =
    args.hard`), so the gate is soft while training; the script sets it hard only for testing.
    (The README calls the flag `--hard-gate`; the script defines `--hard`.)
  - `freeze_experts: false`: `--freeze` is off unless given (`DynMMNet(freeze=args.freeze)`), so
    the pretrained experts train with the gate.
  - `resource_costliest_fraction: true`: the resource term is `weight[:, 1].mean()`
    (`DynMMNet.forward`), the batch's mean weight on the late-fusion expert, not Σ_e w_e C_e.
  - `clip_grad_norm: 8.0`: `Supervised_Learning.train` clips the norm of every parameter's
    gradient at `clip_val=8` before each step.
  τ = 1 (`DynMMNet.temp`, never changed), λ = 0.1 (`--reg`) and the gate MLP(inputs → 128 → E)
  are the Config defaults already. Not options (set them in `train`): AdamW, lr 1e-4, weight
  decay 1e-2, batch 128, 50 epochs, stopping after 8 epochs without a better val macro-F1.
- `paper`: {} — the Config defaults: the paper's resource-aware loss λ · Σ_e w_e C(E_e) (here
  with C normalised by C_max, a rescaling of λ) and its two stages (experts trained first, then
  the gate). Soft or hard gating and frozen or trainable experts are flags of the reference
  script that the paper's equations leave open; the defaults (straight-through hard gate, experts
  frozen after pretraining, METHODS.md §5) are mmray's choice, not the script's defaults.

Where mmray differs from the reference implementation (under any preset):
- Expert costs are measured with `mmray.cost.flops_per_sample` on an example batch when the method
  is built; the reference types them in (1.25261 and 10.86908 MFLOPs). As there, the gate's own
  cost is not part of E[FLOPs]; it is logged as `dynmm/cost_gate`. A measured cost includes what
  the expert's head computes for the per-modality diagnostics (2·d·C FLOPs per modality).
- By default the resource term is Σ_e w_e C_e / C_max; the reference's is mean(w_late), the
  fraction routed to the expensive expert (`resource_costliest_fraction`). For two experts ours is
  mean(w_late)·(1 − r) + r with r = C_cheap / C_max: the same objective with λ scaled by (1 − r)
  (0.885 for the reference's costs).
- The experts are pretrained in the same run (`pretrain_epochs`, on the sum of their losses), not
  loaded from checkpoints of separate runs (`imdb_uni.py`, `imdb_mm.py --fuse 1`), and are mmray's
  encoders with a `LateFusion` head: a unimodal expert is one encoder and a linear head, the
  late-fusion expert is the method's `encoders` and the `method.fusion` head (the reference:
  MultiBench MLPs and MaxOut-MLP late fusion). `clip_grad_norm` clips both stages' steps, before
  the worker average (`edit_grads`); the reference trains on one device.
- Frozen experts are kept in eval mode during the gate stage (no dropout, fixed BatchNorm
  statistics); the reference with `--freeze` leaves them in train mode.
- At inference only the selected expert runs (samples grouped by expert); the reference runs every
  branch and multiplies by the one-hot weights, so its saving is counted, not realised.
- Gumbel noise is an option (the reference has none). The saving is relative to the costliest
  expert, which is always-late-fusion when that is one of the experts (as in the paper).
- Per-modality logits (diagnostics) are z_m = Σ_e w_e z^e_m, where z^e_m is expert e's
  late-fusion block for m and 0 for an expert that does not read m; so z = Σ_m z_m still holds.
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
from mmray.encoders import ModelConfig, build_encoder
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext
from mmray.modules.fusion import LateFusion
from mmray.modules.gating import (
    GateInput,
    example_batch,
    expected_flops,
    gate_mlp,
    gate_weights,
    subset,
)

LATE_FUSION = "late_fusion"


@dataclass
class Config:
    # Inference paths: a modality name (that modality's encoder and a linear head) or
    # "late_fusion" (every encoder and the method.fusion head). Empty: [first modality,
    # late_fusion]. MM-IMDB's reference pair is [text, late_fusion] (image-only was dropped for
    # poor accuracy; [text, image, late_fusion] brings it back).
    experts: list[str] = field(default_factory=list)
    # Epochs that train the experts (sum of their own losses, gate idle) before the gate trains.
    pretrain_epochs: int = field(default=2, metadata=bounds(0))
    # Freeze the experts after pretraining (the reference's --freeze); false: train them with the gate.
    freeze_experts: bool = True
    # τ in w = softmax(logits / τ).
    temperature: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))
    # Straight-through hard gating during training (inference is always hard).
    hard_gate: bool = True
    # Add Gumbel(0, 1) noise to the gate logits during training (not in the reference).
    gumbel: bool = False
    # λ, weight of the resource loss mean_batch(Σ_e w_e C_e / C_max); 0.1 in the reference.
    resource_weight: float = field(default=0.1, metadata=bounds(0.0, None))
    # Hidden width of the gate MLP (inputs → hidden → experts); 128 in the reference.
    gate_hidden: int = field(default=128, metadata=bounds(1))
    # The reference's resource term: mean_batch(w_e*) of the costliest expert e*, the fraction of
    # the gate's weight on it; false: the expected normalised cost mean_batch(Σ_e w_e C_e / C_max).
    resource_costliest_fraction: bool = False
    # Clip the norm of all gradients at this value before each step (8 in the reference); 0: never.
    clip_grad_norm: float = field(default=0.0, metadata=bounds(0.0, None))

    def validate(self, path: str, errors: list[str]) -> None:
        if len(set(self.experts)) != len(self.experts):
            errors.append(f"{path}.experts: {self.experts} names an expert twice")
        if len(self.experts) == 1:
            errors.append(f"{path}.experts: {self.experts} leaves the gate nothing to choose; "
                          "name at least 2 (e.g. [text, late_fusion]) or leave it empty")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def resource_loss(weights: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """mean_batch(Σ_e w_e C_e / C_max)."""
    return (weights * (costs / costs.max())).sum(-1).mean()


def costliest_fraction(weights: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """mean_batch(w_e*), e* the costliest expert: the reference's resource term."""
    return weights[:, int(costs.argmax())].mean()


def flops_saving(expected: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """1 − E[FLOPs] / C_max: the share of always-running-the-costliest-expert's compute saved."""
    return 1 - expected / costs.max()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class Expert(nn.Module):
    """One inference path: the encoders of some modalities and a late-fusion head over them."""

    def __init__(self, encoders: nn.ModuleDict, num_classes: int, fusion: str):
        super().__init__()
        self.encoders = encoders
        self.head = LateFusion({m: e.out_dim for m, e in encoders.items()}, num_classes, fusion)
        # Forward calls and samples seen: an audit of what routed inference actually ran.
        self.calls = 0
        self.samples = 0

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        self.samples += next(iter(batch["inputs"].values())).shape[0]
        feats = {}
        for m, enc in self.encoders.items():
            h = enc(batch["inputs"][m])
            feats[m] = h * batch["present"][m].to(h.dtype).unsqueeze(1)
        return self.head(feats)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class DynMM(Method):
    """Experts of different cost, a gate that picks one per sample, a resource-penalised loss."""

    name = "dynmm"
    Config = Config
    modalities_supported = (2,)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {"hard_gate": False, "freeze_experts": False,
                      "resource_costliest_fraction": True, "clip_grad_norm": 8.0},
        "paper": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        self._frozen = False
        names = list(self.options.experts) or [self.modalities[0], LATE_FUSION]
        unknown = [n for n in names if n != LATE_FUSION and n not in spec.modalities]
        if unknown:
            raise ValueError(f"method.options.experts: {unknown} is not {LATE_FUSION!r} or a "
                             f"modality of dataset {spec.name!r} ({list(spec.modalities)})")
        self.experts = nn.ModuleDict()
        for n in names:
            encoders = self.encoders if n == LATE_FUSION else nn.ModuleDict(
                {n: build_encoder(spec.modalities[n], model_cfg, n)})
            self.experts[n] = Expert(encoders, spec.num_classes, method_cfg.fusion)
        self.gate_input = GateInput(spec)
        self.gate = gate_mlp(self.gate_input.out_dim, self.options.gate_hidden, len(names))

        example = example_batch(spec)
        costs = [flops_per_sample(e, example) for e in self.experts.values()]
        self.register_buffer("expert_flops", torch.tensor(costs, dtype=torch.float32),
                             persistent=False)  # measured, never loaded from a checkpoint
        self.gate_flops = flops_per_sample(self, example, call=self.gate_logits)
        for e in self.experts.values():
            e.calls = e.samples = 0
        self._eval_counts = torch.zeros(len(names))

    # -- stages -------------------------------------------------------------------------------
    def pretraining(self, epoch: int) -> bool:
        return epoch < self.options.pretrain_epochs

    def _apply_stage(self, epoch: int) -> None:
        """Experts trainable while pretraining; frozen (and in eval mode) afterwards if asked."""
        self._frozen = not self.pretraining(epoch) and self.options.freeze_experts
        for p in self.experts.parameters():
            p.requires_grad_(not self._frozen)
        if self._frozen:
            self.experts.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._frozen:
            self.experts.eval()
        return self

    def on_epoch_start(self, epoch: int) -> None:
        self._apply_stage(epoch)

    # -- forward ------------------------------------------------------------------------------
    def gate_logits(self, batch: Batch) -> torch.Tensor:
        return self.gate(self.gate_input(batch))

    def route(self, batch: Batch) -> torch.Tensor:
        """Training-time gate weights (B, E): soft, or straight-through hard."""
        o = self.options
        return gate_weights(self.gate_logits(batch), o.temperature, o.hard_gate,
                            gumbel=o.gumbel and self.training)

    def mixture(self, batch: Batch, weights: torch.Tensor) -> Output:
        """z = Σ_e w_e z^e with every expert run on the whole batch."""
        logits, per_mod = None, {}
        for i, expert in enumerate(self.experts.values()):
            z, per = expert(batch)
            w = weights[:, i:i + 1].to(z.dtype)
            logits = w * z if logits is None else logits + w * z
            for m, zm in per.items():
                per_mod[m] = per_mod.get(m, 0) + w * zm
        per_mod = {m: per_mod.get(m, torch.zeros_like(logits)) for m in self.modalities}
        return Output(logits, per_mod)

    def forward(self, batch: Batch) -> Output:
        return self.mixture(batch, self.route(batch))

    def predict(self, batch: Batch) -> Output:
        """Hard routing: each sample runs only its selected expert."""
        choice = self.gate_logits(batch).argmax(1)  # argmax of softmax(g / τ) for any τ > 0
        b = choice.shape[0]
        logits = torch.zeros(b, self.spec.num_classes, device=choice.device)
        per_mod = {m: torch.zeros_like(logits) for m in self.modalities}
        for i, expert in enumerate(self.experts.values()):
            idx = (choice == i).nonzero(as_tuple=True)[0]  # a host sync: routing needs the sizes
            if idx.numel() == 0:
                continue
            z, per = expert(subset(batch, idx))
            logits = logits.index_put((idx,), z.float())
            for m, zm in per.items():
                per_mod[m] = per_mod[m].index_put((idx,), zm.float())
        self._eval_counts += torch.bincount(choice, minlength=len(self.experts)).cpu().float()
        return Output(logits, per_mod)

    # -- loss and step ------------------------------------------------------------------------
    def routing_logs(self, weights: torch.Tensor, counts: torch.Tensor | None = None) -> dict:
        """Fraction routed to each expert, E[FLOPs] per sample and the saving."""
        w = weights.detach().float()
        if counts is None:
            counts = F.one_hot(w.argmax(1), len(self.experts)).sum(0).float()
        frac = counts / counts.sum().clamp(min=1)
        flops = expected_flops(w, self.expert_flops.to(w.device))
        logs = {f"dynmm/route_{n}": frac[i] for i, n in enumerate(self.experts)}
        logs["dynmm/flops"] = flops
        logs["dynmm/flops_saving"] = flops_saving(flops, self.expert_flops.to(w.device))
        return logs

    def eval_counts(self) -> torch.Tensor:
        """Samples routed to each expert by `predict` since the last call (then reset)."""
        counts, self._eval_counts = self._eval_counts, torch.zeros_like(self._eval_counts)
        return counts

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        """Routing of an evaluated split: fraction per expert, E[FLOPs] per sample, saving."""
        counts = counts.float()
        # Hard routing: mean(w_e) is the fraction routed to e.
        frac = (counts / counts.sum().clamp(min=1)).unsqueeze(0)
        return {k: float(v) for k, v in self.routing_logs(frac, counts).items()}

    def routing_summary(self) -> dict[str, float]:
        """Routing of the `predict` calls since the last summary (one worker's view)."""
        return self.eval_metrics(self.eval_counts())

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        self._apply_stage(ctx.epoch)  # idempotent; also right when on_epoch_start was not called
        label = batch["label"]
        if self.pretraining(ctx.epoch):
            with ctx.autocast():
                outs = {n: e(batch)[0] for n, e in self.experts.items()}
            parts = {f"loss/{n}": self.criterion(z, label) for n, z in outs.items()}
            loss = torch.stack(list(parts.values())).sum()
        else:
            with ctx.autocast():
                weights = self.route(batch)
                out = self.mixture(batch, weights)
            task = self.criterion(out.logits, label)
            resource = (costliest_fraction if self.options.resource_costliest_fraction
                        else resource_loss)(weights, self.expert_flops)
            loss = task + self.options.resource_weight * resource
            parts = {"loss/task": task, "loss/resource": resource, **self.routing_logs(weights)}
        return self.backward_and_step(loss, optimizer, ctx, parts, self._clip_grads)

    def _clip_grads(self) -> None:
        if self.options.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.parameters(), self.options.clip_grad_norm)

    def epoch_metrics(self) -> dict[str, float]:
        """The measured costs (FLOPs per sample) of every expert and of the gate."""
        costs = {f"dynmm/cost_{n}": float(c) for n, c in zip(self.experts, self.expert_flops)}
        return {**costs, "dynmm/cost_gate": float(self.gate_flops)}
