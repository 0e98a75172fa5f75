"""Late-fusion heads with per-modality logits for diagnostics (METHODS.md §1).

Both heads satisfy z = Σ_m z_m exactly: the fused logits are the sum of the per-modality logits,
with the shared bias split evenly (b / M) among the M modalities.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class LateFusion(nn.Module):
    """`concat`: z = W[h_a; h_v] + b, z_a = W[:, :d_a] h_a + b/M.  `sum`: z = Σ W_m h_m + b."""

    def __init__(self, dims: dict[str, int], num_classes: int, mode: Literal["concat", "sum"]):
        super().__init__()
        self.mode = mode
        self.modalities = list(dims)
        self.dims = dict(dims)
        if mode == "concat":
            self.fc = nn.Linear(sum(dims.values()), num_classes)
        elif mode == "sum":
            self.fcs = nn.ModuleDict({m: nn.Linear(d, num_classes, bias=False) for m, d in dims.items()})
            self.bias = nn.Parameter(torch.zeros(num_classes))
        else:
            raise ValueError(f"fusion {mode!r} is not accepted; accepted: concat, sum")

    def weight_of(self, modality: str) -> torch.Tensor:
        """The (C, d_m) block of the head that reads modality m's features."""
        if self.mode == "sum":
            return self.fcs[modality].weight
        start = 0
        for m in self.modalities:
            if m == modality:
                return self.fc.weight[:, start:start + self.dims[m]]
            start += self.dims[m]
        raise KeyError(modality)

    def forward(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bias = self.fc.bias if self.mode == "concat" else self.bias
        share = bias / len(self.modalities)
        per_mod = {m: F.linear(feats[m], self.weight_of(m)) + share for m in self.modalities}
        if self.mode == "concat":
            fused = self.fc(torch.cat([feats[m] for m in self.modalities], dim=1))
        else:
            fused = torch.stack(list(per_mod.values())).sum(0)
        return fused, per_mod
