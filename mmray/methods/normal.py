"""Normal: joint training with late fusion, the baseline of every imbalance study (METHODS.md §1).

Per-modality encoders, a `concat` or `sum` late-fusion head, one loss on the fused logits (CE for
single-label, BCE-with-logits for multi-label). The per-modality logits z_m (the head's block for
modality m plus b/M) are diagnostics only: they show how much each modality learned inside the
fused model. Matches the "joint training" baseline of the OGM-GE and MLA reference code, which
derive unimodal logits the same way for concat fusion.
"""

from __future__ import annotations

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, Method, MethodConfig, Output
from mmray.modules.fusion import LateFusion


class Normal(Method):
    name = "normal"

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        self.head = LateFusion(dims, spec.num_classes, method_cfg.fusion)

    def forward(self, batch: Batch) -> Output:
        fused, per_mod = self.head(self.features(batch))
        return Output(fused, per_mod)
