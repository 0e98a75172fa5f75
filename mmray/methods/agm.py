"""AGM: Adaptive Gradient Modulation (METHODS.md §9).

Li, Li, Hu, Lei, Li, Zhou. "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023. Reference code: https://github.com/lihong2303/AGM_ICCV2023, read at commit
5a65542c70b1c7c15c5df291e77fa9cf2bbb9549: the audio-visual CREMA-D script `run/CREMAD_main.py`
(`train`) with `model/CREMAD_net.py` (`GradMod`, `AVClassifier`), and for three modalities
`run/URFunny_main.py` (`train`) with `model/URFunny_net.py` (`GradMod`).

The model is the Normal late-fusion model f (encoders + `LateFusion`). Each step:

1. Coalition outputs f(S), S ⊆ N the modalities: f(N) is the ordinary fused forward (train mode);
   for every other non-empty S the modalities outside S are masked, with the encoders in eval
   mode (the reference's `self.net.eval()`: batch norm reads its running statistics, dropout is
   off). `mask: input` (the reference) zeroes their *inputs* (`torch.zeros_like(audio)`), so a
   masked modality still feeds φ_m(0) to the head; `mask: feature` zeroes their features h_m.
   These forwards keep their graph: the gradient flows through all of them.
2. Each modality's response, the Shapley value of the coalition game with the empty
   coalition's output shared equally: o_m = Σ_{S ⊆ N∖{m}} |S|!(M−|S|−1)!/M! · (f(S ∪ {m}) − f(S)),
   where f(∅) only enters as f(∅)/M, so it cancels and is never computed, and Σ_m o_m = f(N).
   Two modalities: o_a = ½(f(a,v) − f(0,v) + f(a,0)) (`Modality_Audio`); three: `URFunny_net.py`'s
   `Modality_*`.
3. Scores s_m = mean_i −log softmax(o_m,i)[y_i], the probability floored at 1e-8 (the
   reference's "score", a loss: lower is better), and with s̄ their mean the discrepancy ratio
   r_m = exp(M/(M−1)·(s̄ − s_m)) (> 1: m fits better than the average; for two modalities
   r_a = exp(s_v − s_a)). METHODS.md §9 writes it with a score that grows with fit, s = −NLL.
4. The "mono-modal concept" r*_m: the same ratio of the running means s*_m, the plain average of
   s_m over every step of the run so far (s*_m = s*_m·(t−1)/t + s_m/t at step t; all 0 before the
   first step, so r* = 1 there); read before this step's s_m enters it, updated at every step,
   inside the modulation window or not.
5. k_m = exp(α·min(r*_m − r_m, clamp)): a modality that fits better than its running share is
   slowed, one that fits worse is sped up.
6. The loss is CE(Σ_m o_m) and k_m multiplies the gradient that reaches o_m (the reference's
   full backward hook on `m_a_o`): every parameter, encoders and head, gets its gradient through
   the responses, so f(N) receives Σ_m k_m·(its Shapley weight)·g and the masked outputs the
   differences (two modalities: ½(k_a + k_v)·g on f(a,v), ½(k_a − k_v)·g on f(a,0)). With every
   k_m = 1 this is the Normal gradient.

Presets (`method.preset`):
- `paper`: METHODS.md §9 as written, r* from running means of the scores, no clamp
  (`clamp: null`; a coefficient can then overflow to inf).
- `reference`: the audio-visual CREMA-D script, what the reference runs for two modalities:
  - `clamp: 10` (`min(optimal_ratio_a - ratio_a, 10)`), the Config default;
  - `hold_after_window: true`: outside the window the script stops calling `update_scale`, but
    the hooks stay, so after the window's last epoch every step keeps being scaled by the
    coefficients of the window's last step (before the window the scale is its initial 1);
  - `clip_on_head_grad: 1`: after backward, at every step (inside the window or not), when an
    element of the fusion head's weight gradient exceeds 1 in magnitude (`grad_max > 1 or
    grad_min < -1` on `fusion_module.fc_out.weight`) the norm of all gradients is clipped to 1
    (`clip_grad_norm_(model.parameters(), max_norm=1.0)`).
  The window: the reference's epochs count from 1 and it modulates `modulation_starts <= epoch
  <= modulation_ends` (argparse defaults 0 and 20: its epochs 1–20), which is mmray's 0-based
  [max(starts − 1, 0), ends): the Config defaults [0, 20) are the same epochs. α has no value for
  CREMA-D in the repository (argparse default 1.0, the Config default; its README's AV-MNIST
  command uses 2.5); the script's optimizer (SGD, momentum 0.9, weight decay 1e-4, lr 1e-4 decayed
  ×0.1 every 70 epochs) is `train.*`.
- `reference_3mod`: the three-modality script (`URFunny_main.py`): `clamp: 7`, the clip at 5
  (`grad_max > 5. or grad_min < -5.` on `head.fc.weight`, `max_norm=5.0`), the same held
  coefficients after the window. (It has no 1e-8 floor on the probability; mmray keeps the
  floor, which only matters where a probability is below 1e-8.)
Config defaults: the reference's two-modality rule without its two quirks (no clip, k = 1 outside
the window).

Where mmray differs from the reference implementation under every preset:
- The coalition forwards run each encoder three times (train mode on x_m; eval mode on x_m and on
  a single zero input, broadcast over the batch) and the head once per coalition; the reference
  runs the whole network once per coalition, 2^M times (its f(∅), `zero_padding_out`, unused in
  training). The outputs and gradients are the same; only the rounding differs.
- k_m scales the gradient through a custom autograd function instead of a module backward hook,
  and is computed on the device in float64 (the reference: `.item()` and Python floats). The
  running means s*_m and the held coefficients are buffers, so they are checkpointed; the
  reference keeps s*_m in its checkpoint and loses the held scale.
- Scores, ratios and the loss are in float32 on the logits (as every mmray loss), from
  log_softmax (the reference takes the log of the softmax: the same up to rounding).
- Evaluation (`predict`) is the Normal model's: fused logits f(N) and the head's per-modality
  logits z_m, without the coalition forwards (the reference evaluates Σ_m o_m and reports the
  responses' accuracies). With `mask: feature` and the linear fusion heads o_m equals z_m.
- Missing modalities: an absent modality's features are zero in every coalition, so its
  response on that sample is the shared baseline f(∅)/M; s_m averages over the whole batch.
- With several Ray Train workers the scores s_m are the global batch's means (summed over the
  workers, `ctx.reduce_sum`), so k_m and s*_m are those of one process on the global batch and
  the same on every worker; the clip runs on the averaged gradient (`edit_grads` runs after the
  average): N workers × batch B step as one process with batch N·B.
- Multi-label datasets are rejected: s_m is the log-probability of one true class under a
  softmax.

BalanceBenchmark's `AGM_trainer.py` (GeWu-Lab/BalanceBenchmark at
4c1482fca5aaa8d4278af8e26020daa039e3ccf3, which produced the benchmark's AGM numbers) differs
materially and has no preset here: its coalition forwards run under `torch.no_grad()`, the loss
is CE of the plain fused output, and k_m multiplies the gradients of the encoder parameters
whose name holds the modality's name, except 1-D ones (biases, norms); its ratio is
exp(M/(M−1)·(s_m − s̄)) on the loss-like scores, the inverse of the authors' (so it slows a
modality that fits worse than its running share); its Shapley sum leaves out the
S = ∅ terms (o_a = ½(f(a,v) − f(0,v)) for two modalities); it never reads its modulation window
(every epoch is modulated); it clamps at 7 and clips at 5 (`fusion_module.fc_out`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, MethodConfig, StepContext
from mmray.methods.normal import Normal

# The reference floors the true-class probability of a response at 1e-8 before the log.
PROB_FLOOR = 1e-8


@dataclass
class Config:
    # α in k_m = exp(α·min(r*_m − r_m, clamp)): 1.0 is the reference's argparse default, 2.5 its
    # README's AV-MNIST command, 0.1 BalanceBenchmark's.
    alpha: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))
    # First epoch (0-based) that is modulated.
    modulation_starts: int = field(default=0, metadata=bounds(0))
    # End of the window [starts, ends), 0-based: 20 is the reference's 1-based epochs 1–20.
    modulation_ends: int = field(default=20, metadata=bounds(0))
    # Upper bound on r*_m − r_m inside the exponent: 10 in the two-modality script, 7 in the
    # three-modality one; null: none (the paper's equation).
    clamp: float | None = field(default=10.0, metadata=bounds(0.0, None, lo_open=True))
    # How a modality is left out of a coalition: zero its input (the reference; the encoder
    # still runs, in eval mode) or zero its features (mmray's missing-modality convention; no
    # extra encoder passes).
    mask: Literal["input", "feature"] = "input"
    # Outside the window, keep scaling by the coefficients of the window's last step (the
    # reference's hooks keep their last scale); false: k = 1 outside the window.
    hold_after_window: bool = False
    # When an element of the fusion head's weight gradient exceeds this in magnitude, clip the
    # norm of all gradients to it, at every step (the reference: 1 for CREMA-D, 5 for three
    # modalities); 0: never.
    clip_on_head_grad: float = field(default=0.0, metadata=bounds(0.0))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.modulation_ends < self.modulation_starts:
            errors.append(f"{path}.modulation_ends: {self.modulation_ends} is before "
                          f"modulation_starts={self.modulation_starts}; the window starts there")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def shapley_weight(size: int, num_modalities: int) -> float:
    """|S|!(M−|S|−1)!/M!: the weight of a coalition S of `size` modalities in the Shapley value."""
    m = num_modalities
    return math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)


def coalitions(modalities: list[str]) -> list[frozenset[str]]:
    """Every non-empty coalition of the modalities, the full one first."""
    n = len(modalities)
    return [frozenset(s) for size in range(n, 0, -1) for s in combinations(modalities, size)]


def shapley_responses(values: dict[frozenset[str], torch.Tensor],
                      modalities: list[str]) -> dict[str, torch.Tensor]:
    """o_m = Σ_{S ⊆ N∖{m}} w(|S|)·(f(S ∪ {m}) − f(S)) with f(∅) shared as f(∅)/M, i.e. the
    S = ∅ term contributes w(0)·f({m}) only; `values` maps each non-empty coalition to f(S)."""
    n = len(modalities)
    out = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        terms = []
        for size in range(n):
            w = shapley_weight(size, n)
            for s in combinations(others, size):
                with_m = values[frozenset((*s, m))]
                terms.append(w * (with_m - values[frozenset(s)]) if s else w * with_m)
        out[m] = torch.stack(terms).sum(0)
    return out


def response_scores(responses: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """s_m = mean_i −log max(softmax(o_m,i)[y_i], 1e-8), one per modality in order (float64)."""
    idx = label.view(-1, 1)
    floor = math.log(PROB_FLOOR)
    return torch.stack([-F.log_softmax(o.detach().float(), dim=1).gather(1, idx).clamp(min=floor).mean()
                        for o in responses.values()]).double()


def discrepancy_ratios(scores: torch.Tensor) -> torch.Tensor:
    """r_m = exp(M/(M−1)·(s̄ − s_m)) for loss-like scores s (M ≥ 2)."""
    m = scores.numel()
    return torch.exp(m / (m - 1) * (scores.mean() - scores))


def agm_coefficients(ratios: torch.Tensor, concept: torch.Tensor, alpha: float,
                     clamp: float | None) -> torch.Tensor:
    """k_m = exp(α·min(r*_m − r_m, clamp)), r* the ratios of the running means."""
    gap = concept - ratios
    return torch.exp(alpha * (gap if clamp is None else gap.clamp(max=clamp)))


def running_mean(mean: torch.Tensor, value: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The plain average over steps 1..t: mean·(t−1)/t + value/t (the reference's order)."""
    t = step.to(mean.dtype)
    return mean * (t - 1) / t + value / t


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by k."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


def scale_grad(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x, whose gradient is multiplied by k (a 0-d tensor) on the way back."""
    return _ScaleGrad.apply(x, k)


@torch.no_grad()
def clip_if_head_exceeds_(params: list[nn.Parameter], head_weights: list[nn.Parameter],
                          limit: float) -> torch.Tensor:
    """If some |∂L/∂W_head| > limit, scale all gradients to total norm ≤ limit (clip_grad_norm_:
    coefficient limit / (norm + 1e-6), at most 1). Tensor ops only: no host sync. Returns
    whether it clipped."""
    grads = [p.grad for p in params if p.grad is not None]
    big = torch.stack([w.grad.abs().max() for w in head_weights if w.grad is not None]).max() > limit
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.where(big, (limit / (total + 1e-6)).clamp(max=1.0), torch.ones_like(total))
    torch._foreach_mul_(grads, coef)
    return big


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """The module in eval mode inside the block, its own mode restored after."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class AGM(Normal):
    """Normal late fusion trained through Shapley responses whose gradients are rescaled."""

    name = "agm"
    single_label = "its scores are the softmax log-probability of one true class"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The module docstring names the file and line each option comes from.
        "reference": {"clamp": 10.0, "hold_after_window": True, "clip_on_head_grad": 1.0},
        "reference_3mod": {"clamp": 7.0, "hold_after_window": True, "clip_on_head_grad": 5.0},
        "paper": {"clamp": None},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        m = len(self.modalities)
        # s*_m: the running mean of each modality's score over every step so far.
        self.register_buffer("running_score", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # The coefficients of the window's last step (hold_after_window); 1 before the window.
        self.register_buffer("held", torch.ones(m, dtype=torch.float64))

    def active(self, epoch: int) -> bool:
        return self.options.modulation_starts <= epoch < self.options.modulation_ends

    def masked_features(self, batch: Batch, full: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each modality's features inside a coalition ("on") and masked out of it ("off")."""
        if self.options.mask == "feature":
            return full, {m: torch.zeros_like(h) for m, h in full.items()}
        on, off = {}, {}
        with eval_mode(self.encoders):
            for m in self.modalities:
                x = batch["inputs"][m]
                present = batch["present"][m].unsqueeze(1)
                on[m] = self.encoders[m](x) * present.to(full[m].dtype)
                # Eval mode makes φ_m(0) the same for every sample: one row, broadcast.
                zero = self.encoders[m](torch.zeros_like(x[:1]))
                off[m] = zero.expand_as(on[m]) * present.to(zero.dtype)
        return on, off

    def coalition_logits(self, batch: Batch) -> dict[frozenset[str], torch.Tensor]:
        """f(S) for every non-empty coalition: f(N) in train mode, the others masked."""
        full = self.features(batch)
        on, off = self.masked_features(batch, full)
        values = {}
        for s in coalitions(self.modalities):
            feats = full if len(s) == len(self.modalities) else \
                {m: on[m] if m in s else off[m] for m in self.modalities}
            values[s] = self.head(feats)[0]
        return values

    def applied_coefficients(self, coeffs: torch.Tensor, epoch: int) -> torch.Tensor:
        """k inside the window; outside it 1, or the held last-window k (hold_after_window)."""
        if self.active(epoch):
            if self.options.hold_after_window:
                self.held.copy_(coeffs)
            return coeffs
        return self.held.clone() if self.options.hold_after_window else torch.ones_like(coeffs)

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        o = self.options
        with ctx.autocast():
            values = self.coalition_logits(batch)
        # At least float32 (bf16 under autocast), as the loss is.
        values = {s: v.to(torch.promote_types(v.dtype, torch.float32)) for s, v in values.items()}
        responses = shapley_responses(values, self.modalities)
        # The global batch's mean: each worker's mean weighted by its rows, summed over workers.
        rows = torch.tensor([float(len(batch["label"]))], dtype=torch.float64, device=self.running_score.device)
        summed = ctx.reduce_sum(torch.cat([response_scores(responses, batch["label"]) * rows, rows]))
        scores = summed[:-1] / summed[-1]
        ratios = discrepancy_ratios(scores)
        concept = discrepancy_ratios(self.running_score)  # r*, before this step enters s*
        k = self.applied_coefficients(agm_coefficients(ratios, concept, o.alpha, o.clamp), ctx.epoch)
        logits = torch.stack([scale_grad(responses[m], k[i])
                              for i, m in enumerate(self.modalities)]).sum(0)
        loss = self.criterion(logits, batch["label"])
        self.steps += 1
        self.running_score.copy_(running_mean(self.running_score, scores, self.steps))

        logs: dict[str, Any] = {}
        for i, m in enumerate(self.modalities):
            logs[f"agm/coeff_{m}"] = k[i]
            logs[f"agm/score_{m}"] = scores[i]
            logs[f"agm/ratio_{m}"] = ratios[i]
            logs[f"agm/concept_{m}"] = concept[i]
        edit = None
        if o.clip_on_head_grad > 0:
            def edit() -> None:
                # Runs inside backward_and_step before it copies `logs` into what it returns.
                logs["agm/clipped"] = clip_if_head_exceeds_(
                    list(self.parameters()), self.head_weights(), o.clip_on_head_grad).float()
        return self.backward_and_step(loss, optimizer, ctx, logs, edit_grads=edit)

    def head_weights(self) -> list[nn.Parameter]:
        """The fusion head's weight matrices, whose gradient the reference's clip test reads."""
        head = self.head
        return [head.fc.weight] if head.mode == "concat" else [fc.weight for fc in head.fcs.values()]

    def epoch_metrics(self) -> dict[str, float]:
        """The running mean score s*_m and its ratio r*_m at the end of the epoch."""
        concept = discrepancy_ratios(self.running_score)
        out = {}
        for i, m in enumerate(self.modalities):
            out[f"agm/running_score_{m}"] = float(self.running_score[i])
            out[f"agm/concept_ratio_{m}"] = float(concept[i])
        return out
