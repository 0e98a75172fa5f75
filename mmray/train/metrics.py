"""Evaluation metrics accumulated as counts, so they sum exactly across batches and workers.

Single-label: accuracy of the fused logits and of each modality's logits (`acc`, `acc_<m>`), and
the OGM-style imbalance diagnostic for every method: s_m = Σ_i softmax(z_m,i)[y_i] over the split
and `score_ratio_<m>` = s_m / mean_{n≠m} s_n (above 1: modality m dominates the fused model).
Multi-label: micro and macro F1 at sigmoid > 0.5 (`f1_micro`, `f1_macro`, `f1_macro_<m>`).
Of the fused logits also: top-5 accuracy with more than 5 classes (`acc_top5`), and for 2 classes
the area under the ROC curve of p(class 1) (`auroc`, the Hateful Memes metric).

AUROC from counts: p(class 1) is binned into `AUROC_BINS` equal bins, separately for positive and
negative samples, and AUROC = P(s+ > s−) + P(s+ = s−)/2 is computed over the bins, pairs in the
same bin counting as ties. The histograms sum exactly across batches and workers; the result
differs from the exact rank statistic only for pairs whose scores are closer than 1/AUROC_BINS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmray.data.spec import DatasetSpec

AUROC_BINS = 4096
TOP_K = 5


def auroc_from_histograms(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(s+ > s−) + P(s+ = s−)/2 from per-bin counts of positive and negative scores."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # undefined with one class only
    below = torch.cumsum(neg, 0) - neg  # negatives in lower bins than each bin
    return float(((pos * below).sum() + 0.5 * (pos * neg).sum()) / (n_pos * n_neg))


class MetricAccumulator:
    def __init__(self, spec: DatasetSpec, modalities: list[str]):
        self.spec = spec
        self.heads = ["fused", *modalities]
        c = spec.num_classes
        # Row per head: single-label [correct, Σ p(true class)]; multi-label per-class [tp|fp|fn].
        width = 3 * c if spec.multilabel else 2
        self.counts = torch.zeros(len(self.heads), width, dtype=torch.float64)
        self.top_k = not spec.multilabel and c > TOP_K
        self.auroc = not spec.multilabel and c == 2
        # Fused-logit extras: [top-5 correct] or [positive histogram | negative histogram].
        self.extra = torch.zeros(int(self.top_k) + (2 * AUROC_BINS if self.auroc else 0),
                                 dtype=torch.float64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.n = torch.zeros((), dtype=torch.float64)

    def _update_extra(self, z: torch.Tensor, label: torch.Tensor) -> None:
        if self.top_k:
            hit = (z.topk(TOP_K, dim=1).indices == label.view(-1, 1)).any(1).sum()
            self.extra[0] += hit.double().cpu()
        if self.auroc:
            score = torch.softmax(z, dim=1)[:, 1]
            bins = (score * AUROC_BINS).long().clamp_(0, AUROC_BINS - 1)
            pos = torch.bincount(bins[label == 1], minlength=AUROC_BINS)
            neg = torch.bincount(bins[label == 0], minlength=AUROC_BINS)
            self.extra += torch.cat([pos, neg]).double().cpu()

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
                if head == "fused":
                    self._update_extra(z, label)
        self.loss_sum += loss.detach().double().cpu() * b
        self.n += b

    def compute(self, split: str,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        flat = torch.cat([self.counts.flatten(), self.extra, self.loss_sum.view(1), self.n.view(1)])
        if reduce is not None:
            flat = reduce(flat)
        counts = flat[:self.counts.numel()].view_as(self.counts)
        extra = flat[self.counts.numel():-2]
        loss_sum, n = flat[-2], flat[-1].clamp(min=1)
        out = {f"{split}/loss": float(loss_sum / n)}
        if self.top_k:
            out[f"{split}/acc_top5"] = float(extra[0] / n)
        if self.auroc:
            out[f"{split}/auroc"] = auroc_from_histograms(extra[-2 * AUROC_BINS:-AUROC_BINS],
                                                          extra[-AUROC_BINS:])
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
