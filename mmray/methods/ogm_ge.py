"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement (METHODS.md §2).

Peng et al. "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022.
Reference code: https://github.com/GeWu-Lab/OGM-GE_CVPR2022 (`main.py`, `train_epoch`), read at
commit 343dc1d95c9bda88f105c0da8d24f185e0e98b54; its three-modality form is the OGM-GE branch
of `main.py` `train_epoch` (`args.modal3`) in
https://github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, read at
commit ab6c184579f9ff390e9c9b8216c9900c2a43545b.

The model is the Normal baseline (encoders + `LateFusion`, one loss on the fused logits). After
backward, each modality's discrepancy score s_m = Σ_i softmax(z_m,i)[y_i] is taken from the
per-modality logits of the fusion head, ρ_m = s_m / mean_{n≠m} s_n, and the dominant modality
(ρ_m > 1) has its encoder's gradients scaled by k_m = 1 − tanh(α·ρ_m); with Gaussian enhancement
N(0, std(g)²) is added, std taken per parameter tensor from the unmodulated gradient. A step logs
the fused loss, each modality's own loss `loss/<m>` (CE of z_m, as the reference logs), ρ_m and k_m.

Presets (`method.preset`):
- `paper` ({}): the Config defaults, the paper's Eq. 9–10 (every parameter of the dominant
  modality's encoder φ_u is modulated, k = 1 only where ρ ≤ 1), with mmray's choices where the
  paper says nothing: the window [modulation_starts, modulation_ends), and for more than two
  modalities ρ_m over the *mean* of the others, every modality with ρ_m > 1 modulated.
- `reference`: what the reference code runs, quirk by quirk (the 2-modality rules from the
  OGM-GE repository's `main.py` `train_epoch`, the 3-modality ones from the MLA repository's):
  - `conv_only: true`: only gradients with 4 dimensions (conv weights) of the encoders are scaled
    and noised (`len(parms.grad.size()) == 4` on parameters whose module name holds
    `audio`/`visual`, or `mae_a`/`mae_v`/`mae_t` in MLA's); batch norms, biases and linear layers
    of the encoders train unmodulated.
  - `window_includes_end: true`: the test is `modulation_starts <= epoch <= modulation_ends`
    ("# bug fixed"), so epoch `ends` is modulated too (51 epochs with the defaults 0 and 50).
  - `modulate_one: true`: exactly one modality per step, by an if/else chain. Two modalities:
    `if ratio_v > 1` visual, `else` audio, so audio is modulated on a tie (ρ = 1, k = 1 − tanh(α)).
    Three (MLA): visual if ρ_v > 1, elif text if ρ_t > 1, else audio — audio even when no modality
    dominates (its k = 1 − tanh(α·ρ_a) with ρ_a < 1). In mmray's terms: the first of
    modalities[1:] (the dataset's order) with ρ > 1, else modalities[0]; the reference's order is
    audio, visual(, text), so a dataset that lists audio first makes the same choice.
  - `ratio_over: sum`: MLA's 3-modality ρ_m = s_m / Σ_{n≠m} s_n (the sum of the others, so at
    most one modality exceeds 1); for two modalities it is the same as the mean.
  - `noise_std_eps: 1e-8`: the noise is N(0, (std(g) + 1e-8)²), `parms.grad.std().item() + 1e-8`.
  The other options keep their defaults, which are the reference's: OGM-GE (`--modulation
  OGM_GE`), the window from epoch 0 to 50. α is not set: the reference requires it on the
  command line (its README recommends 0.8 for CREMA-D, the Config default; 0.1 for VGGSound;
  MLA's script defaults to 0.3).

Where mmray differs from the reference implementation under every preset:
- The `sum` fusion head: the reference's `SumFusion` has a bias per branch (`fc_x`, `fc_y`) and
  its training-time scores use each branch's full bias; mmray's `sum` head has one bias, split
  b/M among the per-modality logits. The two parametrisations train differently, so the step is
  the reference's exactly for `concat` fusion (the reference's default), where the per-modality
  logits are the same (the head's block plus b/M).
- The noise std is computed without the reference's `.item()` host sync per parameter.
  Single-element gradients get no noise (their std is NaN; the reference's `normal_` raises).
- Noise is drawn modality by modality, in the dataset's order, parameter by parameter; the
  reference draws in `model.named_parameters()` order: the same sequence when the dataset lists
  the modalities in the reference's order (its fusion head, first, is never modulated).
- With several Ray Train workers the scores s_m are summed over the workers' batches
  (`ctx.reduce_sum`) and the modulation and noise act on the averaged gradient (the `edit_grads`
  hook of `backward_and_step` runs after the average), with noise drawn alike on every worker:
  N workers × batch B take the step of one process with batch N·B, as the reference runs it.
- Multi-label datasets are rejected: s_m is defined through the softmax probability of one label.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, MethodConfig, StepContext
from mmray.methods.normal import Normal


@dataclass
class Config:
    # α in k_m = 1 − tanh(α·ρ_m): 0.8 for CREMA-D (reference README), 0.1 for VGGSound, 0.3 in
    # MLA's re-run.
    alpha: float = field(default=0.8, metadata=bounds(0.0, None, lo_open=True))
    # First epoch that is modulated.
    modulation_starts: int = field(default=0, metadata=bounds(0))
    # Last epoch of the window: excluded ([starts, ends)) unless window_includes_end.
    modulation_ends: int = field(default=50, metadata=bounds(0))
    # OGM-GE: add N(0, std(g)²) noise after scaling; false = plain OGM.
    gaussian_enhance: bool = True
    # Modulate only 4-D (conv weight) gradients, as the reference does; false = whole encoder.
    conv_only: bool = False
    # Modulate epoch modulation_ends too ([starts, ends]), as the reference's `<=` does.
    window_includes_end: bool = False
    # ρ_m's denominator: the mean of the other modalities' scores, or their sum (the reference's
    # 3-modality branch). The same for two modalities.
    ratio_over: Literal["mean", "sum"] = "mean"
    # Exactly one modality per step, the reference's if/else chain: the first of modalities[1:]
    # with ρ > 1, else modalities[0] whatever its ρ (audio on a tie); false: every ρ_m > 1.
    modulate_one: bool = False
    # Added to the noise std: N(0, (std(g) + eps)²); the reference adds 1e-8.
    noise_std_eps: float = field(default=0.0, metadata=bounds(0.0))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.modulation_ends < self.modulation_starts:
            errors.append(f"{path}.modulation_ends: {self.modulation_ends} is before "
                          f"modulation_starts={self.modulation_starts}; the window starts there")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def ogm_scores(per_modality_logits: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
    """s_m = Σ_i softmax(z_m,i)[y_i]: the batch's summed probability of the true class."""
    idx = label.view(-1, 1)
    return {m: F.softmax(z.detach().float(), dim=1).gather(1, idx).sum()
            for m, z in per_modality_logits.items()}


def ogm_ratios(scores: dict[str, torch.Tensor],
               over: Literal["mean", "sum"] = "mean") -> dict[str, torch.Tensor]:
    """ρ_m = s_m / mean_{n≠m} s_n (or / Σ_{n≠m} s_n); for two modalities s_v / s_a and its inverse."""
    ratios = {}
    for m, s in scores.items():
        others = torch.stack([scores[n] for n in scores if n != m])
        ratios[m] = s / (others.sum() if over == "sum" else others.mean())
    return ratios


def reference_choice(ratios: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one modality the reference's if/else chain modulates, as a bool per modality: the
    first of the modalities after the first with ρ > 1, else the first one (whatever its ρ).
    Tensor ops only: no host sync per step."""
    first, *rest = ratios
    above = torch.stack([ratios[m] > 1 for m in rest])
    picked = above & (above.cumsum(0) == 1)
    return {first: ~above.any(), **dict(zip(rest, picked.unbind(), strict=True))}


def ogm_coefficients(scores: dict[str, torch.Tensor], alpha: float,
                     over: Literal["mean", "sum"] = "mean",
                     modulate_one: bool = False) -> dict[str, torch.Tensor]:
    """k_m = 1 − tanh(α·ρ_m) for a modulated modality, else 1 (paper Eq. 10). Modulated: every
    dominant one (ρ_m > 1), or with `modulate_one` the reference's single choice."""
    ratios = ogm_ratios(scores, over)
    chosen = reference_choice(ratios) if modulate_one else {m: r > 1 for m, r in ratios.items()}
    return {m: torch.where(chosen[m], 1 - torch.tanh(alpha * r), torch.ones_like(r))
            for m, r in ratios.items()}


@torch.no_grad()
def modulate_(params: Iterable[nn.Parameter], coeff: torch.Tensor, gaussian_enhance: bool,
              conv_only: bool, noise_std_eps: float = 0.0) -> None:
    """In place: g ← k·g (OGM) or g ← k·g + N(0, (std(g) + eps)²) (OGM-GE), std of the
    unmodulated g."""
    for p in params:
        g = p.grad
        if g is None or (conv_only and g.dim() != 4):
            continue
        if gaussian_enhance and g.numel() > 1:
            # Drawn before scaling: the std is the unmodulated gradient's (reference behaviour).
            noise = torch.randn_like(g) * (g.std() + noise_std_eps)
            g.mul_(coeff.to(g.dtype)).add_(noise)
        else:
            g.mul_(coeff.to(g.dtype))


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class OGMGE(Normal):
    """Normal late fusion whose encoder gradients are modulated after every backward."""

    name = "ogm_ge"
    single_label = "its discrepancy score s_m is the softmax probability of one true class"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference code's quirks, each named in the module docstring.
        "reference": {"conv_only": True, "window_includes_end": True, "ratio_over": "sum",
                      "modulate_one": True, "noise_std_eps": 1e-8},
        # The Config defaults are the paper's reading.
        "paper": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        if len(spec.modalities) < 2:
            raise ValueError(f"method.name=ogm_ge needs at least 2 modalities; dataset "
                             f"{spec.name!r} has {list(spec.modalities)}")
        super().__init__(spec, model_cfg, method_cfg)

    def active(self, epoch: int) -> bool:
        o = self.options
        if o.window_includes_end:
            return o.modulation_starts <= epoch <= o.modulation_ends
        return o.modulation_starts <= epoch < o.modulation_ends

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        o = self.options
        out, loss = self.fused_loss(batch, ctx)
        # Summed over the workers' batches: the global batch's scores, so every worker
        # modulates the averaged gradient by the coefficients of one process on that batch.
        local = ogm_scores(out.per_modality, batch["label"])
        summed = ctx.reduce_sum(torch.stack([local[m] for m in self.modalities]))
        scores = dict(zip(self.modalities, summed.unbind(), strict=True))
        ratios = ogm_ratios(scores, o.ratio_over)
        coeffs = ogm_coefficients(scores, o.alpha, o.ratio_over, o.modulate_one)

        def modulate() -> None:
            # After the average (`backward_and_step`): the same k and, seeded alike, the same
            # noise on every worker, as one process on the global batch.
            for m in self.modalities:
                modulate_(self.encoders[m].parameters(), coeffs[m], o.gaussian_enhance,
                          o.conv_only, o.noise_std_eps)

        logs = {}
        for m in self.modalities:
            logs[f"loss/{m}"] = self.criterion(out.per_modality[m].detach(), batch["label"])
            logs[f"ogm/coeff_{m}"] = coeffs[m]
            logs[f"ogm/ratio_{m}"] = ratios[m]
        return self.backward_and_step(loss, optimizer, ctx, logs,
                                      edit_grads=modulate if self.active(ctx.epoch) else None)
