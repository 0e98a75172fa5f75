"""What a model costs: parameters, FLOPs per sample, and latency per batch.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one real forward, so they follow
the code that runs (a routed model counts only the branch it took). It counts matrix products and
convolutions as 2 FLOPs per multiply-add (`nn.Linear(i, o)`: 2·i·o per sample, bias excluded) and
ignores element-wise work (activations, normalisation, pooling), which is small next to them.

A batch is whatever the callable takes: a tensor, a tuple of tensors (unpacked as arguments), or
the method batch dict `{"inputs": {...}, ...}` (passed as one argument).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared parameter counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor found in the batch."""
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for v in values:
        try:
            return batch_size_of(v)
        except ValueError:
            continue
    raise ValueError(f"no tensor in the batch to read its size from: {type(batch).__name__}")


def _run(fn: Callable, batch: Any) -> Any:
    return fn(*batch) if isinstance(batch, tuple) else fn(batch)


def _device_of(module: nn.Module, batch: Any) -> torch.device:
    for p in module.parameters():
        return p.device
    if torch.is_tensor(batch):
        return batch.device
    return torch.device("cpu")


class _EvalMode:
    """Run in eval mode (no dropout, BatchNorm statistics untouched), then restore each submodule's mode."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def flops_per_sample(module: nn.Module, example_batch: Any, call: Callable | None = None) -> float:
    """FLOPs of one forward on `example_batch`, divided by its batch size.

    `call` replaces `module(batch)` (e.g. `method.predict`); the module is put in eval mode for the
    count and restored afterwards, so measuring never moves BatchNorm statistics.
    """
    fn = call or module
    with _EvalMode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        _run(fn, example_batch)
    return counter.get_total_flops() / batch_size_of(example_batch)


def latency(module: nn.Module, example_batch: Any, warmup: int = 3, iters: int = 10,
            call: Callable | None = None) -> float:
    """Median seconds per forward of `example_batch` (eval mode, no grad).

    On CUDA every timed forward ends with a synchronise: kernels are asynchronous, and without it
    the clock would measure only the launch.
    """
    fn = call or module
    cuda = _device_of(module, example_batch).type == "cuda"
    times = []
    with _EvalMode(module), torch.no_grad():
        for i in range(warmup + iters):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _run(fn, example_batch)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cost_report(module: nn.Module, batch: Any, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """{"cost/params", "cost/flops_per_sample", "cost/latency_ms"} of the module on `batch`.

    A module with a `predict` (every mmray method) is measured through it: the evaluation-time
    cost, e.g. DynMM's routed inference rather than its training-time mixture of all experts.
    """
    call = getattr(module, "predict", None)
    return {
        "cost/params": float(count_params(module)),
        "cost/flops_per_sample": flops_per_sample(module, batch, call),
        "cost/latency_ms": 1000.0 * latency(module, batch, warmup, iters, call),
    }
