"""Evaluation metrics from counts: accuracy and micro/macro F1 against hand computations."""

from __future__ import annotations

import torch

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.methods.base import Output
from mmray.train.metrics import MetricAccumulator

MODS = {"a": ModalitySpec("vector", (2,)), "v": ModalitySpec("vector", (2,))}


def test_accuracy_fused_and_per_modality_over_batches():
    acc = MetricAccumulator(DatasetSpec("t", MODS, 3), ["a", "v"])
    y = torch.tensor([0, 1, 2, 2])
    fused = torch.eye(3)[[0, 1, 0, 2]]  # 3/4 right
    za = torch.eye(3)[[0, 0, 0, 0]]  # 1/4
    zv = torch.eye(3)[[0, 1, 2, 2]]  # 4/4
    acc.update(Output(fused[:2], {"a": za[:2], "v": zv[:2]}), y[:2], torch.tensor(1.0))
    acc.update(Output(fused[2:], {"a": za[2:], "v": zv[2:]}), y[2:], torch.tensor(3.0))
    m = acc.compute("val")
    assert m["val/acc"] == 0.75 and m["val/acc_a"] == 0.25 and m["val/acc_v"] == 1.0
    assert m["val/loss"] == 2.0  # mean over samples: (2*1 + 2*3) / 4
    p = torch.softmax(torch.eye(3), 1)[0, 0]  # p(true) of a one-hot logit row that is right
    q = torch.softmax(torch.eye(3), 1)[0, 1]  # ... and one that is wrong
    s_a, s_v = p + 3 * q, 4 * p  # audio right once, visual right 4 times
    assert abs(m["val/score_ratio_a"] - float(s_a / s_v)) < 1e-6
    assert abs(m["val/score_ratio_v"] - float(s_v / s_a)) < 1e-6


def test_multilabel_f1_micro_and_macro():
    acc = MetricAccumulator(DatasetSpec("t", MODS, 2, multilabel=True), ["a", "v"])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])  # class0: tp2 fp0 fn0; class1: tp1 fp1 fn1
    acc.update(Output(z, {}), y, torch.tensor(0.0))
    m = acc.compute("test")
    assert abs(m["test/f1_micro"] - 2 * 3 / (2 * 3 + 1 + 1)) < 1e-9
    assert abs(m["test/f1_macro"] - (1.0 + 0.5) / 2) < 1e-9


def test_reduce_sees_all_counts_once():
    acc = MetricAccumulator(DatasetSpec("t", MODS, 2), ["a"])
    acc.update(Output(torch.tensor([[1.0, 0.0]]), {}), torch.tensor([0]), torch.tensor(0.5))
    m = acc.compute("val", reduce=lambda t: t * 2)  # as if a second worker saw the same
    assert m["val/acc"] == 1.0 and m["val/loss"] == 0.5


def test_top5_accuracy_with_more_than_five_classes():
    acc = MetricAccumulator(DatasetSpec("t", MODS, 7), ["a"])
    z = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]] * 3)  # ranks classes 0..6 in order
    y = torch.tensor([4, 5, 0])  # 5th (in top 5), 6th (not), 1st (in)
    acc.update(Output(z, {"a": z}), y, torch.tensor(0.0))
    m = acc.compute("test")
    assert m["test/acc"] == 1 / 3 and m["test/acc_top5"] == 2 / 3
    assert "test/acc_top5" not in MetricAccumulator(DatasetSpec("t", MODS, 5), ["a"]).compute("x")


def test_auroc_matches_the_rank_statistic_across_batches_and_workers():
    from mmray.train.metrics import AUROC_BINS

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (300,), generator=g)
    logits = torch.randn(300, 2, generator=g) + torch.stack([-y, y], 1).float()
    p1 = torch.softmax(logits, 1)[:, 1]
    pos, neg = p1[y == 1], p1[y == 0]
    diff = pos.view(-1, 1) - neg.view(1, -1)  # every (positive, negative) pair
    exact = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    acc = MetricAccumulator(DatasetSpec("t", MODS, 2), ["a"])
    for k in range(0, 300, 64):
        acc.update(Output(logits[k:k + 64], {}), y[k:k + 64], torch.tensor(0.0))
    got = acc.compute("test")["test/auroc"]
    close = int((diff.abs() < 1 / AUROC_BINS).sum())  # the only pairs binning may mis-rank
    assert abs(got - exact) <= close / diff.numel() + 1e-12
    assert 0.6 < exact < 1.0  # the scores carry the label: not a degenerate case
    assert acc.compute("test", reduce=lambda t: t * 2)["test/auroc"] == got  # summed workers
    perfect = MetricAccumulator(DatasetSpec("t", MODS, 2), ["a"])
    perfect.update(Output(torch.tensor([[0.0, 5], [5, 0], [0, 4]]), {}), torch.tensor([1, 0, 1]),
                   torch.tensor(0.0))
    assert perfect.compute("v")["v/auroc"] == 1.0
