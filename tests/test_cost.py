"""Cost measurement: parameter counts, FLOPs by hand, latency, the report's keys."""

from __future__ import annotations

import torch
from torch import nn

from mmray.cost import batch_size_of, cost_report, count_params, flops_per_sample, latency
from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, build_method


def test_linear_flops_are_two_per_multiply_add():
    layer = nn.Linear(7, 5)
    assert flops_per_sample(layer, torch.randn(4, 7)) == 2 * 7 * 5


def test_conv_flops_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=False)
    # Output 8 × 5 × 5 for a 10 × 10 input; each output value is 3·3·3 multiply-adds.
    assert flops_per_sample(conv, torch.randn(2, 3, 10, 10)) == 2 * (8 * 5 * 5) * (3 * 3 * 3)
    grouped = nn.Conv2d(4, 4, kernel_size=3, padding=1, groups=4)
    assert flops_per_sample(grouped, torch.randn(1, 4, 6, 6)) == 2 * (4 * 6 * 6) * (1 * 3 * 3)


def test_mlp_flops_add_up_and_ignore_activations():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    assert flops_per_sample(mlp, torch.randn(8, 10)) == 2 * (10 * 20 + 20 * 3)


def test_param_counts():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    assert count_params(mlp) == 10 * 20 + 20 + 20 * 3 + 3
    mlp[0].requires_grad_(False)
    assert count_params(mlp, trainable_only=True) == 20 * 3 + 3
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == 4 * 4 + 4  # counted once


def test_measuring_leaves_batchnorm_statistics_and_mode_alone():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    before = net[1].running_mean.clone()
    flops_per_sample(net, torch.randn(4, 1, 6, 6) + 3)
    latency(net, torch.randn(4, 1, 6, 6) + 3, warmup=1, iters=2)
    assert torch.equal(net[1].running_mean, before) and net.training and net[1].training


def test_latency_is_positive_and_batch_size_found_in_dicts():
    assert latency(nn.Linear(3, 3), torch.randn(2, 3), warmup=1, iters=3) > 0
    assert batch_size_of({"id": ["a", "b"], "inputs": {"x": torch.zeros(5, 2)}}) == 5
    assert batch_size_of((torch.zeros(3, 1), torch.zeros(3))) == 3


def test_cost_report_of_a_method_uses_predict():
    spec = DatasetSpec("v", {"a": ModalitySpec("vector", (6,)), "b": ModalitySpec("vector", (4,))}, 3)
    method = build_method(spec, ModelConfig(width=2, feature_dim=5), MethodConfig("normal"))
    batch = {"inputs": {"a": torch.randn(4, 6), "b": torch.randn(4, 4)},
             "present": {m: torch.ones(4, dtype=torch.bool) for m in ("a", "b")}}
    report = cost_report(method, batch, warmup=1, iters=2)
    assert set(report) == {"cost/params", "cost/flops_per_sample", "cost/latency_ms"}
    assert report["cost/params"] == count_params(method)
    # VectorMLP(d, 8, 5) per modality, the concat head Linear(10, 3), and the head's two
    # (5 -> 3) blocks that give the per-modality diagnostic logits.
    hand = 2 * (6 * 8 + 8 * 5) + 2 * (4 * 8 + 8 * 5) + 2 * 10 * 3 + 2 * (2 * 5 * 3)
    assert report["cost/flops_per_sample"] == hand
    assert report["cost/latency_ms"] > 0
