"""MMPareto: multimodal and unimodal gradients integrated per encoder (METHODS.md §9).

Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024.
Reference code: https://github.com/GeWu-Lab/MMPareto_ICML2024 (`code/MMPareto.py` `train_epoch`,
`code/min_norm_solvers.py` `MinNormSolver`, `code/models/models.py` `AVClassifier`), read at
commit a339db39cc25b157df376b50bb894917dc6c01d6. BalanceBenchmark's re-run, which produced its
headline table: https://github.com/GeWu-Lab/BalanceBenchmark
`balancemm/trainer/MMPareto_trainer.py` (`MMParetoTrainer`), `balancemm/models/avclassify_model.py`
and `configs/trainer_config.yaml`, read at commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3.

The model: per-modality encoders φ_m, the fused late-fusion head on [h_a; h_v] (`method.fusion`),
and one unimodal head z_m = W_m h_m + b_m per modality (the reference's `head_audio`,
`head_video`). Losses: L_mm = CE(z) and L_m = CE(z_m), added with weight 1 each; every head gets
the plain gradient of L_mm + Σ_m L_m (so each unimodal head its own loss's). The shared
parameters are each encoder's: encoder m is reached by L_mm and L_m only. For each encoder, with
g_mm and g_u its gradients of L_mm and L_m, taken over the whole encoder (all its parameter
tensors as one vector):

    v11 = g_mm·g_mm, v12 = g_mm·g_u, v22 = g_u·g_u;
    agree (cos(g_mm, g_u) > 0, i.e. v12 > 0): γ = 1/2;
    conflict: γ* = clip((v22 − v12) / (v11 + v22 − 2·v12), 0, 1), the two-task min-norm (MGDA)
              weight, argmin_γ ‖γ g_mm + (1 − γ) g_u‖;
    d = 2·(γ g_mm + (1 − γ) g_u)   (the sum g_mm + g_u when they agree).

Then the magnitude: per parameter tensor t of the encoder, with G_t the tensor's gradient of
L_mm + L_m (the plain sum, what joint training would apply),

    g_t = κ · max(1, ‖G_t‖ / ‖d_t‖) · d_t,    κ = 1.5 (`magnitude_factor`),

i.e. d_t is scaled up to the sum's norm where it is smaller, never down, and enlarged by κ
(the reference's `gamma=1.5`). In the conflict branch the clip never bites unless a gradient is
zero: with v12 ≤ 0 the ratio lies in [0, 1]. Over the whole encoder ‖d‖ ≤ ‖g_mm + g_u‖ always
(the min-norm point is no longer than the midpoint), so `rescale_per_tensor: false` gives
‖g‖ = κ‖g_mm + g_u‖ exactly.

The per-modality outputs (`acc_<m>`) are the unimodal heads' logits, the reference's `acc_a`,
`acc_v`; predictions are the fused head's. A step logs the summed loss, `loss/mm`, each
`loss/<m>`, and per modality `pareto/conflict_<m>` (1 when the min-norm branch ran: averaged per
epoch, the conflict rate), `pareto/gamma_<m>` (the weight γ of the multimodal gradient: 1/2 when
agreeing) and `pareto/cos_<m>`.

Presets (`method.preset`):
- `paper` ({}): the Config defaults, METHODS.md §9's reading of the paper (the rule per shared
  parameter, granularities as the reference code computes them) with the exact clip at 0 and 1.
- `reference`: what `code/MMPareto.py` runs (`script/mmpareto.sh`: CREMA-D, concat fusion):
  - the cosine and the min-norm weights over the whole encoder (`torch.cat` of the flattened
    gradients of every parameter whose name holds `audio`/`visual`, not `head`), the rescaling
    per parameter tensor (`three_norm = torch.norm(param.grad)` of the summed loss,
    `diff = three_norm / new_norm`, `if diff > 1` scale): `rescale_per_tensor: true`, the
    default. Its solver's dot products add each tensor's and then the concatenated vector's
    (`grads[t].values()` holds the `"concat"` entry too), doubling them: γ is the same.
  - `clip_margin: 0.001`: `MinNormSolver._min_norm_element_from2` returns 0.999 where the clip
    at 1 bites (`v1v2 >= v1v1`) and 0.001 at 0 (`v1v2 >= v2v2`). In the conflict branch that
    happens only for a zero gradient: with g_mm = 0 the reference applies
    κ·‖g_u‖/‖0.002 g_u‖·0.002 g_u = κ g_u per tensor, where the exact γ = 1 gives d = 0
    (the min-norm point: both cannot improve together) and hence no update.
  Outside the method: SGD lr 0.002, momentum 0.9, weight decay 1e-4, batch 64, 50 epochs; it
  builds `StepLR(30, 0.1)` but never steps it, so its learning rate stays 0.002.
- `balancebench`: BalanceBenchmark's trainer, which differs materially from the authors' code:
  - `unimodal_logits: fusion_blocks`: its unimodal logits are the fused concat head's blocks,
    W[:, block_m] h_m + b/M (`unimodality_calculate`), not separate heads, so the unimodal losses
    train the fused head too.
  - `task_grads_summed: true`: it backpropagates every loss (`loss[modality].backward(
    retain_graph=True)`) without zeroing in between and reads `.grad` afterwards, so both
    "per-task" gradients of encoder m are g_mm + g_m. Their cosine is 1, the sum branch always
    runs, d = 2(g_mm + g_m), and the per-tensor ratio is 1/2: each encoder applies
    2·κ·(g_mm + g_m) = 3·(g_mm + g_m) with its κ = `alpha: 1.5`. (Its conflict branch, never
    reached but for a zero gradient, assigns the solver's weights to the loop variable and
    leaves the weights [0, 0].) The effect is the uniform baseline with the encoders' gradients
    tripled.
  - `rescale_per_tensor: true`, `clip_margin: 0.001`, as the authors' code.
  At that commit its trainer calls `model.Unimodality_Calculate()`, which the model renamed
  `unimodality_calculate` in 39ed569 ("first update"), so it stops at the first batch; the
  step described here is the one of 0d206ba ("MMPareto"), whose trainer differs only in names.
  It runs N modalities, one (multimodal, unimodal) pair per encoder, as mmray does.

Where mmray differs from the reference implementation under every preset:
- Where the combined gradient d_t (or d) is zero, the gradient stays zero; the reference divides
  by its zero norm (NaN where ‖G_t‖ > 0).
- The agree/conflict test is v12 > 0, the sign of the cosine; the reference's
  `F.cosine_similarity` (eps 1e-8) has the same sign. No host sync per step: γ and the branch
  are tensors (the reference goes through NumPy).
- Three modalities: each encoder pairs L_mm with its own L_m (the reference has two modalities;
  BalanceBenchmark does the same for N).
- Multi-label datasets: every loss is the dataset's criterion (BCE-with-logits); the rule only
  sees the gradients. The reference has CE only.
- Missing modalities: L_m averages over the samples where m is present (0 if none: then both of
  encoder m's gradients are zero and so is its update); L_mm over the whole batch.
- With several Ray Train workers the task gradients are averaged over the workers (one extra
  all-reduce of the shared parameters' size per loss) and the combination acts on the averaged
  gradient (`edit_grads` runs after the average), so γ and the rescaling are those of one
  process on the global batch: N workers × batch B step as one process with batch N·B (with
  missing modalities L_m is each worker's masked mean, averaged, which differs from the global
  batch's when the workers' counts of present samples differ).
- Cost: one backward per loss for the task gradients (`Method.task_grads`: 1 + M), then the
  step's own backward, as the reference's 3 + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext
from mmray.modules.fusion import LateFusion


@dataclass
class Config:
    # κ: the final encoder gradient is enlarged κ times (the reference's `gamma = 1.5`,
    # BalanceBenchmark's `alpha: 1.5`).
    magnitude_factor: float = field(default=1.5, metadata=bounds(0.0, None, lo_open=True))
    # Scale d up to the summed gradient's norm per parameter tensor (reference); false: over the
    # whole encoder, where ‖d‖ never exceeds it and the final norm is κ‖g_mm + g_u‖.
    rescale_per_tensor: bool = True
    # Where the min-norm clip bites, weights 1 − margin / margin instead of 1 / 0; the
    # reference's solver uses 0.999 / 0.001 (margin 0.001). It matters only for a zero gradient.
    clip_margin: float = field(default=0.0, metadata=bounds(0.0, 0.5))
    # Unimodal logits: a separate linear head per modality (reference), or the fused head's
    # block for the modality plus b/M (BalanceBenchmark).
    unimodal_logits: Literal["heads", "fusion_blocks"] = "heads"
    # Read both task gradients of an encoder as their sum g_mm + g_m (BalanceBenchmark's
    # accumulated backward passes): always the sum branch, a step of 2κ(g_mm + g_m).
    task_grads_summed: bool = False


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def dot_products(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """v11 = g1·g1, v12 = g1·g2, v22 = g2·g2 over all tensors as one vector (float64 sums)."""
    def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        terms = [(x.float() * y.float()).sum().double() for x, y in zip(a, b, strict=True)]
        return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)
    return dot(g1, g1), dot(g1, g2), dot(g2, g2)


def min_norm_weight(v11: torch.Tensor, v12: torch.Tensor, v22: torch.Tensor,
                    margin: float = 0.0) -> torch.Tensor:
    """γ* = argmin_{γ ∈ [0, 1]} ‖γ g1 + (1 − γ) g2‖² = clip((v22 − v12) / ‖g1 − g2‖², 0, 1).

    The clip at 1 bites when v12 ≥ v11, at 0 when v12 ≥ v22 (tested in that order, as the
    reference's solver); there the weight is 1 − margin or margin. g1 = g2 (zero denominator)
    falls under the first test.
    """
    denom = v11 + v22 - 2 * v12
    inner = (v22 - v12) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(v12 >= v11, torch.full_like(v11, 1 - margin),
                       torch.where(v12 >= v22, torch.full_like(v11, margin), inner))


def pareto_weight(v11: torch.Tensor, v12: torch.Tensor, v22: torch.Tensor,
                  margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, conflict): γ = 1/2 when the gradients agree (cos > 0, i.e. v12 > 0), else the
    min-norm weight; γ weighs the first (multimodal) gradient."""
    conflict = v12 <= 0
    return torch.where(conflict, min_norm_weight(v11, v12, v22, margin),
                       torch.full_like(v11, 0.5)), conflict


def cosine(v11: torch.Tensor, v12: torch.Tensor, v22: torch.Tensor) -> torch.Tensor:
    """cos(g1, g2) from the dot products; 0 where a gradient is zero."""
    norms = (v11 * v22).sqrt()
    return torch.where(norms > 0, v12 / torch.where(norms > 0, norms, torch.ones_like(norms)),
                       torch.zeros_like(norms))


def combine(g_mm: list[torch.Tensor], g_u: list[torch.Tensor],
            gamma: torch.Tensor) -> list[torch.Tensor]:
    """d = 2·(γ g_mm + (1 − γ) g_u), tensor by tensor."""
    return [2 * (gamma.to(a.dtype) * a + (1 - gamma).to(b.dtype) * b) for a, b in zip(g_mm, g_u, strict=True)]


def rescale(combined: list[torch.Tensor], summed: list[torch.Tensor], factor: float,
            per_tensor: bool = True) -> list[torch.Tensor]:
    """κ · max(1, ‖G‖ / ‖d‖) · d, the norms per tensor (or over all tensors together); where
    ‖d‖ = 0, d stays 0."""
    def scale(d_norm: torch.Tensor, g_norm: torch.Tensor) -> torch.Tensor:
        ratio = g_norm / torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm))
        return factor * torch.where(ratio > 1, ratio, torch.ones_like(ratio))

    if per_tensor:
        return [d * scale(torch.linalg.vector_norm(d), torch.linalg.vector_norm(g))
                for d, g in zip(combined, summed, strict=True)]
    d_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in combined]))
    g_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in summed]))
    s = scale(d_norm, g_norm)
    return [d * s for d in combined]


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def _worker_mean(grads: list[torch.Tensor], ctx: StepContext | None) -> list[torch.Tensor]:
    """Task gradients averaged over the workers in one all-reduce (themselves with one worker):
    `task_grads` does not go through backward's averaged `.grad`."""
    if ctx is None or ctx.world_size == 1 or not grads:
        return grads
    flat = ctx.reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / ctx.world_size
    return [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]


class MMPareto(Method):
    """Late fusion plus unimodal heads; each encoder's two gradients integrated by MMPareto."""

    name = "mmpareto"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The Config defaults: the paper's rule with the exact clip (module docstring).
        "paper": {},
        # The authors' code (each quirk named in the module docstring).
        "reference": {"rescale_per_tensor": True, "clip_margin": 0.001},
        # BalanceBenchmark's trainer, which produced its headline table.
        "balancebench": {"rescale_per_tensor": True, "clip_margin": 0.001,
                         "unimodal_logits": "fusion_blocks", "task_grads_summed": True},
    }

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str:
        if len(spec.modalities) < 2:
            return (f"mmpareto integrates each encoder's multimodal and unimodal gradients; dataset "
                    f"{spec.name!r} has one modality {list(spec.modalities)}, so there is no "
                    f"multimodal loss (use method.name=unimodal)")
        return super().unsupported(spec)

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        self.head = LateFusion(dims, spec.num_classes, method_cfg.fusion)
        if self.options.unimodal_logits == "heads":
            self.unimodal_heads = nn.ModuleDict({m: nn.Linear(d, spec.num_classes)
                                                 for m, d in dims.items()})

    def forward(self, batch: Batch) -> Output:
        feats = self.features(batch)
        fused, blocks = self.head(feats)
        if self.options.unimodal_logits == "fusion_blocks":
            return Output(fused, blocks)
        return Output(fused, {m: self.unimodal_heads[m](feats[m]) for m in self.modalities})

    def shared_params(self) -> dict[str, list[nn.Parameter]]:
        """Each encoder's trainable parameters: what L_mm and L_m both reach."""
        return {m: [p for p in self.encoders[m].parameters() if p.requires_grad]
                for m in self.modalities}

    def pareto_weights(self, loss_mm: torch.Tensor, unimodal: dict[str, torch.Tensor],
                       params: dict[str, list[nn.Parameter]],
                       ctx: StepContext | None = None) -> dict[str, dict[str, Any]]:
        """Per modality: g_mm and g_u (task gradients, averaged over the workers with `ctx`),
        γ, the branch and the cosine."""
        every = [p for m in self.modalities for p in params[m]]
        flat_mm = self.task_grads({"mm": loss_mm}, every, ctx)["mm"] if every else []
        flat_mm = _worker_mean(flat_mm, ctx)
        out, start = {}, 0
        for m in self.modalities:
            g_mm = flat_mm[start:start + len(params[m])]
            start += len(params[m])
            # A frozen encoder has nothing to integrate (and autograd no inputs to differentiate).
            g_u = _worker_mean(self.task_grads({m: unimodal[m]}, params[m], ctx)[m] if params[m] else [], ctx)
            if self.options.task_grads_summed:
                g_mm = g_u = [a + b for a, b in zip(g_mm, g_u, strict=True)]
            v11, v12, v22 = dot_products(g_mm, g_u)
            gamma, conflict = pareto_weight(v11, v12, v22, self.options.clip_margin)
            out[m] = {"g_mm": g_mm, "g_u": g_u, "gamma": gamma, "conflict": conflict,
                      "cos": cosine(v11, v12, v22)}
        return out

    @torch.no_grad()
    def integrate_(self, params: dict[str, list[nn.Parameter]],
                   weights: dict[str, dict[str, Any]]) -> None:
        """In place, each encoder's .grad (the summed loss's, G) ← κ·max(1, ‖G‖/‖d‖)·d."""
        o = self.options
        for m, ps in params.items():
            live = [i for i, p in enumerate(ps) if p.grad is not None]
            if not live:
                continue
            w = weights[m]
            d = combine([w["g_mm"][i] for i in live], [w["g_u"][i] for i in live], w["gamma"])
            new = rescale(d, [ps[i].grad for i in live], o.magnitude_factor, o.rescale_per_tensor)
            for i, g in zip(live, new, strict=True):
                ps[i].grad.copy_(g)

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            out = self(batch)
        label = batch["label"]
        loss_mm = self.criterion(out.logits, label)
        unimodal = {m: self.masked_criterion(out.per_modality[m], label, batch["present"][m]) for m in self.modalities}
        params = self.shared_params()
        weights = self.pareto_weights(loss_mm, unimodal, params, ctx)
        logs: dict[str, Any] = {"loss/mm": loss_mm}
        for m in self.modalities:
            logs[f"loss/{m}"] = unimodal[m]
            logs[f"pareto/conflict_{m}"] = weights[m]["conflict"].float()
            logs[f"pareto/gamma_{m}"] = weights[m]["gamma"].float()
            logs[f"pareto/cos_{m}"] = weights[m]["cos"].float()
        total = loss_mm + sum(unimodal.values())
        # After the average, from averaged task gradients: the same on every worker.
        return self.backward_and_step(total, optimizer, ctx, logs,
                                      edit_grads=lambda: self.integrate_(params, weights))
