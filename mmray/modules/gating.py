"""Per-sample gating over inference paths of different cost: what DynMM's two levels share
(METHODS.md §5; `mmray.methods.dynmm` routes between experts, `mmray.methods.dynmm_fusion` between
fusion depths).

A gate MLP reads a cheap view of the raw inputs (`GateInput`) and gives logits over the paths;
`gate_weights` turns them into soft or straight-through hard weights, and `expected_flops` prices
a batch's weights with the paths' measured costs. `example_batch` is what those costs are measured
on; `subset` picks the rows routed to one path at inference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmray.data.spec import DatasetSpec

# A batch as mmray.methods.base defines it (modules sit below methods and do not import them).
Batch = dict[str, Any]


def gate_weights(logits: torch.Tensor, temperature: float = 1.0, hard: bool = False,
                 gumbel: bool = False) -> torch.Tensor:
    """w = softmax((g [+ Gumbel noise]) / τ); hard: onehot(argmax w) − stopgrad(w) + w.

    Straight-through weights are the one-hot choice in value and the soft weights s in gradient:
    ∂w_e/∂g_j = s_e (δ_ej − s_j) / τ, so τ both sharpens s and scales the gate's gradient.
    Half-precision logits (autocast) are taken to float32 first.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if gumbel:
        logits = logits - torch.empty_like(logits).exponential_().log()  # + Gumbel(0, 1)
    soft = torch.softmax(logits / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def expected_flops(weights: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """E[FLOPs] per sample = Σ_e mean_batch(w_e) · C_e."""
    return (weights.mean(0) * costs).sum()


class GateInput(nn.Module):
    """The gate's cheap view of the raw inputs, concatenated over modalities.

    Feature vectors as they are (MM-IMDB: [word2vec; VGG], 4396 values, as in the reference);
    spectrograms and images average-pooled to 4 × 4 per channel; token ids as the mean of a small
    embedding (padding excluded). Missing modalities are zeroed.
    """

    def __init__(self, spec: DatasetSpec, pooled: int = 4, token_dim: int = 16):
        super().__init__()
        self.spec = spec
        self.pooled = pooled
        self.embeds = nn.ModuleDict({
            m: nn.EmbeddingBag(s.vocab_size, token_dim, mode="mean", padding_idx=0)
            for m, s in spec.modalities.items() if s.kind == "text"})
        dims = {m: token_dim if s.kind == "text" else
                s.shape[0] * pooled * pooled if len(s.shape) == 3 else
                math.prod(s.shape) for m, s in spec.modalities.items()}
        self.out_dim = sum(dims.values())

    def forward(self, batch: Batch) -> torch.Tensor:
        parts = []
        for m, s in self.spec.modalities.items():
            x = batch["inputs"][m]
            if not (s.kind == "text" or x.is_floating_point()):
                x = x.float()
            if s.kind == "text":
                h = self.embeds[m](x)
            elif x.dim() == 4:
                h = F.adaptive_avg_pool2d(x, self.pooled).flatten(1)
            else:
                h = x.flatten(1)
            parts.append(h * batch["present"][m].to(h.dtype).unsqueeze(1))
        return torch.cat(parts, dim=1)


def gate_mlp(in_dim: int, hidden: int, choices: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, choices))


def example_batch(spec: DatasetSpec, size: int = 2) -> Batch:
    """A batch of zeros shaped like the dataset's, to measure costs on."""
    inputs = {m: torch.zeros(size, *s.shape, dtype=torch.long if s.kind == "text" else torch.float32)
              for m, s in spec.modalities.items()}
    return {"inputs": inputs, "present": {m: torch.ones(size, dtype=torch.bool) for m in inputs}}


def subset(batch: Batch, idx: torch.Tensor) -> Batch:
    """The rows `idx` of a batch's inputs and presence masks."""
    return {"inputs": {m: x.index_select(0, idx) for m, x in batch["inputs"].items()},
            "present": {m: p.index_select(0, idx) for m, p in batch["present"].items()}}
