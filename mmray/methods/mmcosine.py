"""MMCosine: modality-wise cosine logits with a fixed scale (METHODS.md §9).

Xu, Feng, Zhang and Hu, "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual
Fine-Grained Learning", ICASSP 2023. Reference code: https://github.com/GeWu-Lab/MMCosine_ICASSP23
(`main_CD.py` `train_epoch` and `valid` with `--mmcosine True`, `models/basic_model.py`
`AVClassifier`, `models/fusion_modules.py` `ConcatFusion`), read at commit
00ba0a9cbd9b866b5017e972a1266d7b664bf86e. BalanceBenchmark's re-run, which produced its headline
table: https://github.com/GeWu-Lab/BalanceBenchmark `balancemm/trainer/MMCosine_trainer.py` and
`configs/trainer_config.yaml`, read at commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3.

The late-fusion head holds one weight block W_m (C × d_m) per modality: the blocks of the concat
head's weight W = [W_a | W_v], or the sum head's branches. Each class row of each block and each
feature vector is L2-normalised, and the fused logit of class k is

    z_k = Σ_m s · cos(W_m,k, h_m) = Σ_m s · ⟨W_m,k / ‖W_m,k‖, h_m / ‖h_m‖⟩

(x / max(‖x‖, 1e-12), `F.normalize`'s default eps, as in the reference). No bias enters; the scale
s is a fixed hyperparameter, not learned. The loss is the dataset's criterion on z alone (softmax
CE; BCE-with-logits for multi-label datasets): no unimodal loss. Each modality's own logits
z_m = s · cos(W_m, h_m) are the per-modality outputs (the reference's `out_a`, `out_v`), so
z = Σ_m z_m exactly. Because every modality's logits are bounded by s whatever its feature and
weight norms, the dominant modality cannot win by growing them: the balancing argument of the paper.

A step logs the fused loss, each modality's own loss `loss/<m>` (CE of z_m, as the reference
logs `loss_a`, `loss_v`), and per modality, averaged over the samples where it is present:
`mmcosine/cos_true_<m>`, the mean cosine of the true class (the reference's tensorboard `logit_a`,
`logit_v` divided by s; for multi-label the mean over the positive labels), `mmcosine/abs_cos_<m>`,
the mean |cos| over all classes, and `mmcosine/feat_norm_<m>`, the mean ‖h_m‖ (what the
normalisation takes away).

`method.fusion`: both heads are allowed and compute the same function: the concat head's blocks
and the sum head's branches are the same per-modality blocks. They differ in their initialisation
only (nn.Linear's bound 1/√fan_in with fan_in = Σ_m d_m for concat, d_m for sum); since the rows are
normalised, a smaller initial norm means larger steps of the directions (the gradient of w/‖w‖
scales with 1/‖w‖), so the two train differently. The reference's MMCosine uses concat (its
`AVClassifier` builds no sum head), mmray's default.

Missing modalities: an absent modality's features are zeroed (`Method.features`), and a zero vector
has no direction: its normalisation gives 0 (0 / eps), so its cosine logits are 0 for every class
and the fused logits are the present modalities' alone; its encoder and head block get no
gradient from that sample.

Presets (`method.preset`):
- `paper` ({}): the Config defaults, the paper's loss; predictions from the fused cosine logits
  z; s = 10, the reference's default (`--scaling 10`, its README's CREMA-D command).
- `reference`: what the authors' code runs:
  - `predict_raw_head: true`: its `valid` computes the cosine logits `out_a`, `out_v` but never
    replaces the model's `out`, so the fused prediction (the accuracy it reports) is the raw
    concat head W[h_a; h_v] + b: unnormalised, and with the bias still at its initial value
    (no loss ever reaches it: training replaces `out` by `out_a + out_v`). The per-modality
    predictions are the cosine logits.
  - s = 10 (its argparse default), the Config default.
- `balancebench`: BalanceBenchmark's trainer, which differs from the authors' code in two ways:
  `scale: 15` (`trainer_config.yaml`), and its validation predicts from the cosine sum (as the
  paper's preset does). Its trainer also trains the raw head with CE outside an epoch window
  [modulation_starts, modulation_ends] = [0, 80], which its 30 epochs (`max_epochs: 30`) never
  leave, so mmray has no such window. It extends the concat blocks to three modalities, as mmray
  does.

Where mmray differs from the reference implementation under every preset:
- The authors' loss is CE(z) + λ·NCE(h_a, h_v) with λ = `--lam` = 0 (the NCE term belongs to the
  supplementary material). mmray has no NCE term. At λ = 0 it adds nothing, except that the
  reference's NCE is NaN for a batch whose samples all share one label (0/0 in its mean over
  negatives), which would make its loss NaN (0·NaN); mmray's loss stays finite there.
- Not a difference: the reference's fused head has a bias that no loss reaches, so it keeps its
  initial value; mmray's head holds one too (`predict_raw_head` reads it), never trained either.
- The cosine logits are computed in float32 (or the features' wider dtype) even under bf16
  autocast: the normalisation's gradient grows like 1/‖h‖, and the head is small.
- Multi-label datasets are supported (the reference has none): BCE-with-logits on z, which is
  bounded by M·s per class; like the reference's CE, no bias enters the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext
from mmray.modules.fusion import LateFusion

# F.normalize's default: x / max(‖x‖, eps). A zeroed (missing) feature normalises to 0.
EPS = 1e-12


@dataclass
class Config:
    # s in z_k = Σ_m s·cos(W_m,k, h_m): 10 in the reference (`--scaling`), 15 in BalanceBenchmark.
    scale: float = field(default=10.0, metadata=bounds(0.0, None, lo_open=True))
    # Predict (evaluate) with the raw fused head W[h_a; h_v] + b instead of the cosine logits, as
    # the reference's `valid` does; training is unchanged.
    predict_raw_head: bool = False


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def cosine(h: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """cos(W_k, h_i) for every sample i and class k: (B, d) × (C, d) -> (B, C). A zero h gives 0."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    # Outside autocast: the normalisation's gradient grows like 1/‖h‖, and this is a small matmul.
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(F.normalize(h.to(dtype), dim=1, eps=eps),
                        F.normalize(weight.to(dtype), dim=1, eps=eps))


def cosine_logits(cos: dict[str, torch.Tensor], scale: float) -> Output:
    """z_m = s·cos_m per modality and the fused z = Σ_m z_m."""
    per_mod = {m: scale * c for m, c in cos.items()}
    return Output(torch.stack(list(per_mod.values())).sum(0), per_mod)


def cosine_diagnostics(cos: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
                       present: dict[str, torch.Tensor], label: torch.Tensor,
                       multilabel: bool) -> dict[str, torch.Tensor]:
    """Per modality, over the samples where it is present (0 when none is): the mean cosine of
    the true class (of the positive labels for multi-label), the mean |cos| over all classes,
    and the mean feature norm. Tensors only: no host sync per step."""
    logs = {}
    for m, c in cos.items():
        c = c.detach()
        target = label.to(c.dtype) if multilabel else F.one_hot(label, c.shape[1]).to(c.dtype)
        mask = present[m].to(c.dtype)
        true = (c * target * mask[:, None]).sum() / (target * mask[:, None]).sum().clamp(min=1)
        count = mask.sum().clamp(min=1)
        logs[f"mmcosine/cos_true_{m}"] = true
        logs[f"mmcosine/abs_cos_{m}"] = (c.abs().mean(1) * mask).sum() / count
        norm = torch.linalg.vector_norm(feats[m].detach().to(c.dtype), dim=1)
        logs[f"mmcosine/feat_norm_{m}"] = (norm * mask).sum() / count
    return logs


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class MMCosine(Method):
    """Late fusion whose per-modality logits are scaled cosines of normalised weights and features."""

    name = "mmcosine"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The authors' code: its evaluation reads the raw head (see the module docstring).
        "reference": {"predict_raw_head": True},
        # The paper's loss with the Config defaults.
        "paper": {},
        # BalanceBenchmark's MMCosine trainer.
        "balancebench": {"scale": 15.0},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        # Its weight blocks are the W_m; its bias enters only `predict_raw_head` predictions.
        self.head = LateFusion(dims, spec.num_classes, method_cfg.fusion)

    def cosines(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: cosine(feats[m], self.head.weight_of(m)) for m in self.modalities}

    def forward(self, batch: Batch) -> Output:
        return cosine_logits(self.cosines(self.features(batch)), self.options.scale)

    def predict(self, batch: Batch) -> Output:
        feats = self.features(batch)
        out = cosine_logits(self.cosines(feats), self.options.scale)
        if self.options.predict_raw_head:
            raw, _ = self.head(feats)
            return Output(raw, out.per_modality)
        return out

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            feats = self.features(batch)
            cos = self.cosines(feats)
        out = cosine_logits(cos, self.options.scale)
        loss = self.criterion(out.logits, batch["label"])
        logs = {f"loss/{m}": self.criterion(z.detach(), batch["label"])
                for m, z in out.per_modality.items()}
        logs.update(cosine_diagnostics(cos, feats, batch["present"], batch["label"],
                                       self.spec.multilabel))
        return self.backward_and_step(loss, optimizer, ctx, logs)
