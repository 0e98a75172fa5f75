"""Evaluation metrics accumulated as counts, so they sum exactly across batches and workers.

Single-label: accuracy of the fused logits and of each modality's logits (`acc`, `acc_<m>`), and
the OGM-style imbalance diagnostic for every method: s_m = Σ_i softmax(z_m,i)[y_i] over the split
and `score_ratio_<m>` = s_m / mean_{n≠m} s_n (above 1: modality m dominates the fused model).
Multi-label: micro and macro F1 at sigmoid > 0.5 (`f1_micro`, `f1_macro`, `f1_macro_<m>`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmray.data.spec import DatasetSpec


class MetricAccumulator:
    def __init__(self, spec: DatasetSpec, modalities: list[str]):
        self.spec = spec
        self.heads = ["fused", *modalities]
        c = spec.num_classes
        # Row per head: single-label [correct, Σ p(true class)]; multi-label per-class [tp|fp|fn].
        width = 3 * c if spec.multilabel else 2
        self.counts = torch.zeros(len(self.heads), width, dtype=torch.float64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.n = torch.zeros((), dtype=torch.float64)

    def update(self, out, label: torch.Tensor, loss: torch.Tensor) -> None:
        logits = {"fused": out.logits, **out.per_modality}
        b = label.shape[0]
        for i, head in enumerate(self.heads):
            if head not in logits:
                continue
            z = logits[head].detach().float()
            if self.spec.multilabel:
                pred = z > 0
                y = label > 0.5
                tp = (pred & y).sum(0)
                fp = (pred & ~y).sum(0)
                fn = (~pred & y).sum(0)
                self.counts[i] += torch.cat([tp, fp, fn]).double().cpu()
            else:
                p_true = torch.softmax(z, dim=1).gather(1, label.view(-1, 1)).sum()
                self.counts[i] += torch.stack([(z.argmax(1) == label).sum(), p_true]).double().cpu()
        self.loss_sum += loss.detach().double().cpu() * b
        self.n += b

    def compute(self, split: str,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        flat = torch.cat([self.counts.flatten(), self.loss_sum.view(1), self.n.view(1)])
        if reduce is not None:
            flat = reduce(flat)
        counts = flat[:-2].view_as(self.counts)
        loss_sum, n = flat[-2], flat[-1].clamp(min=1)
        out = {f"{split}/loss": float(loss_sum / n)}
        for i, head in enumerate(self.heads):
            suffix = "" if head == "fused" else f"_{head}"
            if self.spec.multilabel:
                c = self.spec.num_classes
                tp, fp, fn = counts[i, :c], counts[i, c:2 * c], counts[i, 2 * c:]
                micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
                per_class = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
                out[f"{split}/f1_micro{suffix}"] = float(micro)
                out[f"{split}/f1_macro{suffix}"] = float(per_class.mean())
            else:
                out[f"{split}/acc{suffix}"] = float(counts[i, 0] / n)
        mods = self.heads[1:]
        if not self.spec.multilabel and len(mods) > 1:
            scores = {m: counts[1 + j, 1] for j, m in enumerate(mods)}
            for m in mods:
                others = torch.stack([scores[o] for o in mods if o != m]).mean().clamp(min=1e-12)
                out[f"{split}/score_ratio_{m}"] = float(scores[m] / others)
        return out
