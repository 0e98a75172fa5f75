"""The common method interface every method in `mmray.methods` implements.

A method owns its model, its training step and any state it keeps across steps. It never imports
ray or mlflow: the training loop hands it a `StepContext` for backward/step (mixed precision,
gradient averaging across workers) and logs whatever dict `train_step` returns. Every train step,
however the method computes its loss or edits its gradients, ends in `Method.backward_and_step`:
the one place where gradients are made, averaged across workers, measured and applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig, build_encoder

Batch = dict[str, Any]


@dataclass
class MethodConfig:
    # One of mmray.methods.METHODS.
    name: str = "normal"
    # Late fusion of the per-modality features: concat (W[h_a; h_v] + b) or sum (Σ W_m h_m + b).
    fusion: Literal["concat", "sum"] = "concat"
    # Method-specific options, checked against that method's Config dataclass (where the
    # registry is visible: `mmray.methods.check_method_config`); after the check they hold
    # every option's resolved value (Config defaults < preset < given), which runs record.
    options: dict[str, Any] = field(default_factory=dict)
    # A named set of options of the method (`Method.presets`): "reference" runs what the
    # reference code's latest commit runs, "paper" what the paper's equations say; empty: the
    # method's Config defaults. Options given explicitly override the preset's.
    preset: str = ""


@dataclass
class Output:
    """Fused logits (B, C) and each modality's own logits (B, C) for diagnostics."""

    logits: torch.Tensor
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a train step may use besides its batch; built by the training loop."""

    device: torch.device
    epoch: int = 0
    batch_idx: int = 0
    batches_per_epoch: int = 1
    # The autocast dtype of forward passes (`train.precision`): bf16 or fp16; None: fp32.
    amp_dtype: torch.dtype | None = None
    # fp16 only: the dynamic loss scaler (a torch.amp.GradScaler) that `backward_and_step`
    # scales the loss with and unscales the gradients by before anything reads them; None
    # otherwise. The training state owns it (`RunState.scaler`: its scale is checkpointed).
    scaler: Any = None
    # Optimizer steps `backward_and_step` took and skipped so far (skipped: gradients not finite,
    # only with the scaler), and whether the last one was skipped: the loop restores the
    # method's state when a batch's steps were all skipped (`mmray.train.loop.train_step`); a
    # method stepping several times per batch (MLA) undoes its own state change for one.
    applied_steps: int = 0
    skipped_steps: int = 0
    last_step_skipped: bool = False
    # Ray Train workers taking part in each step (their batches together are the global batch)
    # and this one's rank: its batch holds rows rank, rank + world_size, ... of the global one.
    world_size: int = 1
    rank: int = 0
    # Called right before backward with the module and its loss: with several workers it arms
    # the bucketed gradient all-reduce that overlaps backward (`mmray.train.collective`).
    before_backward: Callable[[nn.Module, torch.Tensor], None] = lambda module, loss: None
    # Right after backward: waits for that all-reduce, leaving every gradient the average over
    # workers (a no-op with one worker).
    sync_grads: Callable[[nn.Module], None] = lambda module: None
    # Sums a tensor over Ray Train workers (the tensor itself with one worker): for statistics a
    # method takes from its batch (OGM-GE's scores) or from the data (`Method.before_epoch`),
    # so that they are the global batch's. Not differentiable.
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # The rows (dim 0) of every worker's tensor, in the global batch's order (the tensor itself
    # with one worker): for a statistic that needs the global batch's rows. Not differentiable.
    all_gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # Every worker's rows of a tensor, concatenated in rank order, with autograd: for a loss
    # that compares a sample with the rest of the batch (reprogramming's InfoNCE). Each worker
    # then computes the global batch's loss; the gradient reaching its own rows is summed over
    # the workers, so the averaged parameter gradient is the global loss's.
    gather_with_grad: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # This epoch's train batches: this worker's shard, in the order this epoch's steps get them
    # (the same shuffle seed), with the epoch's missing-modality table applied. Set by the loop
    # each epoch; a method may pass over them in `before_epoch`, as often as it needs.
    train_batches: Callable[[], Iterable[Batch]] = lambda: iter(())

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def per_sample_loss(logits: torch.Tensor, label: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """(B,) the criterion per sample: CE, or BCE-with-logits averaged over the classes; at least
    float32 (bf16 logits under autocast), a float64 model keeps float64."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype),
                                                  reduction="none").mean(1)
    return F.cross_entropy(logits, label, reduction="none")


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ w·x / Σ w over the samples, e.g. those where a modality is present (w a bool or float
    mask); 0, still in the graph, when no sample counts."""
    w = weight.to(values.device, values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1)


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (no inf, no NaN): one fused
    max-norm over them and one host sync."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))


@dataclass
class NoOptions:
    """This method takes no options beyond `method.fusion`."""


class Method(nn.Module):
    """Per-modality encoders plus whatever head the method defines.

    Subclasses set `name`, optionally `Config` (their options dataclass), and implement `forward`.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    # Named option sets (preset name -> the options it sets on top of the Config defaults); the
    # docstring of the method says where each comes from. A method that has no reference code
    # to follow has none.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Modality counts the method is defined for (DynMM: (2,)); building it for a dataset with
    # another count raises a ValueError naming the dataset's modalities.
    modalities_supported: ClassVar[tuple[int, ...]] = (2, 3)
    # Modality kinds the method is defined for, one modality of each (MAP and REP: an image and
    # a text modality for CLIP's two towers); empty: any kinds.
    modality_kinds: ClassVar[tuple[str, ...]] = ()
    # The method builds open_clip's CLIP (model.open_clip_model, model.clip_weights) itself, so
    # the config must give it open_clip tokens and CLIP's input sizes (checked in mmray/train/experiment.py).
    clip_backbone: ClassVar[bool] = False
    # Why the method needs one label per sample (what in its formulas is a single class's
    # probability); building it for a multi-label dataset raises with this reason. Empty: it
    # runs on multi-label datasets too (its losses become BCE-with-logits).
    single_label: ClassVar[str] = ""
    # Why the method's per-modality logits z_m are not modality m's alone (Greedy: its gate
    # recalibrates each branch with the other modality's features); empty: z_m reads x_m only.
    # The report marks the in-model accuracies of such a method: they are not unimodal.
    mixed_branches: ClassVar[str] = ""

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        if reason := self.unsupported(spec):
            raise ValueError(f"method.name={self.name}: {reason}")
        super().__init__()
        self.spec = spec
        self.modalities = list(spec.modalities)
        self.method_cfg = method_cfg
        if method_cfg.preset and method_cfg.preset not in self.presets:
            raise ValueError(f"method.preset: method {self.name} has no preset "
                             f"{method_cfg.preset!r}; accepted: {sorted(self.presets)}")
        # The preset under the given options (a checked config already holds them resolved).
        self.options = self.Config(**{**self.presets.get(method_cfg.preset, {}),
                                      **method_cfg.options})
        self.encoders = self.build_encoders(spec, model_cfg)

    @classmethod
    def preflight(cls, options: dict[str, Any]) -> list[str]:
        """Problems with what the options name on this machine beyond their local files (which
        are checked for every method), e.g. a model name: found on the driver before any
        work starts (`mmray.train.experiment.preflight`). One line each; [] when none."""
        return []

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str:
        """Why the method is not defined for `spec`'s modalities; "" when it is. Building the
        method for such a dataset raises a ValueError with this reason."""
        if len(spec.modalities) not in cls.modalities_supported:
            counts = cls.modalities_supported
            need = f"exactly {counts[0]}" if len(counts) == 1 else " or ".join(map(str, counts))
            return f"{cls.name} needs {need} modalities; dataset {spec.name!r} has {list(spec.modalities)}"
        if spec.multilabel and cls.single_label:
            return (f"{cls.name} needs one label per sample ({cls.single_label}); dataset "
                    f"{spec.name!r} is multi-label (use a single-label dataset or method.name=normal)")
        kinds = sorted(s.kind for s in spec.modalities.values())
        if cls.modality_kinds and kinds != sorted(cls.modality_kinds):
            return (f"{cls.name} needs one modality of each kind {list(cls.modality_kinds)}; "
                    f"{spec.name} has {dict((m, s.kind) for m, s in spec.modalities.items())}")
        return ""

    def build_encoders(self, spec: DatasetSpec, model_cfg: ModelConfig) -> nn.ModuleDict:
        """One encoder per modality from `model.*`; a method with its own backbones (CLIP's
        towers for MAP/REP, M2PT's timm ViT, reprogramming's stems) overrides this.
        `self.options` is set already."""
        return nn.ModuleDict({m: build_encoder(s, model_cfg, m) for m, s in spec.modalities.items()})

    # -- forward ------------------------------------------------------------------------------
    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """h_m = φ_m(x_m), zeroed where the modality is missing (batch["present"][m] is False)."""
        feats = {}
        for m in self.modalities:
            h = self.encoders[m](batch["inputs"][m])
            present = batch["present"][m].to(h.dtype).unsqueeze(1)
            feats[m] = h * present
        return feats

    def forward(self, batch: Batch) -> Output:
        raise NotImplementedError

    def predict(self, batch: Batch) -> Output:
        """Evaluation-time outputs; methods with a test-time fusion rule (MLA) override this."""
        return self(batch)

    def final_module(self) -> Method:
        """The model the final test evaluation (and its cost) measures: this one, or a
        deployable form of it built without changing it, e.g. M2PT's merged weights."""
        return self

    # -- loss and step ------------------------------------------------------------------------
    def criterion(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.spec.multilabel:
            return F.binary_cross_entropy_with_logits(logits.float(), label.float())
        return F.cross_entropy(logits.float(), label)

    def masked_criterion(self, logits: torch.Tensor, label: torch.Tensor,
                         present: torch.Tensor | None = None) -> torch.Tensor:
        """`criterion` averaged over the samples where `present` (e.g. a modality's own loss
        over the samples that have it), or over all."""
        per = per_sample_loss(logits, label, self.spec.multilabel)
        return per.mean() if present is None else masked_mean(per, present)

    def fused_loss(self, batch: Batch, ctx: StepContext) -> tuple[Output, torch.Tensor]:
        """Forward and the loss on the fused logits: what a joint step minimises."""
        with ctx.autocast():
            out = self(batch)
        return out, self.criterion(out.logits, batch["label"])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          ctx: StepContext, logs: dict | None = None,
                          edit_grads: Callable[[], None] | None = None) -> dict:
        """How every train step ends, and the only place gradients are made and applied:

        1. fresh gradients of `loss` (`zero_grad(set_to_none=True)`, so a parameter the loss
           does not reach has none and the optimizer skips it), then backward. With several
           Ray Train workers, `ctx.before_backward` arms the gradient average first: buckets of
           gradients are all-reduced while backward still runs (DDP's overlap,
           `mmray.train.collective.GradReducer`); a parameter that no worker's loss reaches
           keeps no gradient;
        2. `ctx.sync_grads(self)`: waits for that average, so every gradient is the mean over
           workers, which is the gradient of the global batch (the workers' batches together)
           when the loss is a mean over the batch's samples;
        3. `edit_grads()`, the method's own change of the gradients (OGM-GE's modulation and
           noise, MLA's head projection, MMPareto's combination). It acts on the averaged
           gradient, the same on every worker: for the step to be the one a single process makes
           on the global batch, an edit computes what it uses from global statistics
           (`ctx.reduce_sum`, `ctx.all_gather`) and draws its random numbers identically on every
           worker (the loop seeds torch from (seed, epoch) alike everywhere);
        4. the encoders' gradient norms, of the gradient the step applies;
        5. one optimizer step.

        Under fp16 (`ctx.scaler`) backward runs on the scaled loss and the gradients are unscaled
        right after the average, so edits and norms see the true gradient; a step whose final
        gradients (after the edit) are not finite is skipped, which leaves the parameters and
        the optimizer state as they were, and the scaler backs its scale off after an overflow.

        A method that steps several times per batch (MLA: once per modality) calls this once per
        step. Returns {"loss", **logs (detached), "grad/<m>"}: the values to log.
        """
        optimizer.zero_grad(set_to_none=True)
        ctx.before_backward(self, loss)
        scaler = ctx.scaler  # fp16 only
        (loss if scaler is None else scaler.scale(loss)).backward()
        ctx.sync_grads(self)
        if scaler is not None:
            scaler.unscale_(optimizer)  # before any edit: modulation and noise act on true grads
        if edit_grads is not None:
            edit_grads()
        out = {"loss": loss.detach(),
               **{k: v.detach() if torch.is_tensor(v) else v for k, v in (logs or {}).items()},
               **self.grad_norms()}
        skip = scaler is not None and not grads_finite(optimizer)  # a host sync, as GradScaler's
        if not skip:
            optimizer.step()
        if scaler is not None:
            scaler.update()  # the scale: halved after an overflow, doubled after a run of good steps
        ctx.last_step_skipped = skip
        ctx.applied_steps += int(not skip)
        ctx.skipped_steps += int(skip)
        return out

    @staticmethod
    def task_grads(losses: dict[str, torch.Tensor], params: list[nn.Parameter],
                   ctx: StepContext | None = None) -> dict[str, list[torch.Tensor]]:
        """Each loss's own gradient with respect to `params`, without touching `.grad` (a zero
        tensor where a loss does not reach a parameter): for a method that combines per-task
        gradients (MMPareto) in its `edit_grads`. The graph is kept for the step's backward;
        each call costs one backward pass per loss. Under fp16 (`ctx.scaler`) each backward
        runs on the scaled loss and the gradient is returned unscaled, as `.grad` is."""
        scaler = None if ctx is None else ctx.scaler
        out = {}
        for name, loss in losses.items():
            scaled = loss if scaler is None else scaler.scale(loss)
            grads = torch.autograd.grad(scaled, params, retain_graph=True, allow_unused=True)
            if scaler is not None:  # 1/scale taken in float64, as GradScaler.unscale_ takes it
                inv = scaler.scale(torch.ones((), dtype=torch.float64, device=loss.device)).reciprocal()
                grads = [None if g is None else g * inv.to(g.dtype) for g in grads]
            out[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        return out

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        """One optimisation step on one batch; returns the values to log. A method with its own
        loss or gradient edits overrides this and still ends with `backward_and_step`."""
        _, loss = self.fused_loss(batch, ctx)
        return self.backward_and_step(loss, optimizer, ctx)

    def grad_norms(self) -> dict[str, torch.Tensor]:
        """{"grad/<m>": L2 norm of encoder m's current gradients} (0 where it has none).

        `backward_and_step` calls it right before the optimizer step, so it reports the gradient
        the step applies. The norms stay on the device: no host sync per step (the loop averages them once an epoch).
        """
        norms = {}
        for m in self.modalities:
            params = list(self.encoders[m].parameters())
            grads = [p.grad.detach().float() for p in params if p.grad is not None]
            if grads:
                per_tensor = torch.stack([torch.linalg.vector_norm(g) for g in grads])
                norms[f"grad/{m}"] = torch.linalg.vector_norm(per_tensor)
            else:
                norms[f"grad/{m}"] = torch.zeros((), device=params[0].device)
        return norms

    # -- optimisation hooks -------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; a method can exempt parameters from weight decay."""
        return [{"params": [p for p in self.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (e.g. to reset per-epoch statistics)."""

    def before_epoch(self, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict[str, float]:
        """Work on the data before the epoch's first step, after `on_epoch_start` and in train
        mode: e.g. PMR's class prototypes over `ctx.train_batches()`, G-Blending's weights
        estimated by training a copy of the model. Statistics summed over workers go through
        `ctx.reduce_sum`. The epoch's seed is set before it, so a resumed run redoes it
        exactly. Returns values to log for the epoch (`train/<key>`); {} by default."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Method-specific values to log once per epoch (e.g. OGM-GE coefficients)."""
        return {}

    def eval_counts(self) -> torch.Tensor | None:
        """Counts this method gathered during `predict` calls since the last call (then reset),
        e.g. DynMM's samples per expert; the loop sums them over workers and passes them to
        `eval_metrics`. None: nothing to report."""
        return None

    def eval_metrics(self, counts: torch.Tensor) -> dict[str, float]:
        """Values to log for an evaluated split, from its (worker-summed) `eval_counts`."""
        return {}
