"""Two real `torch.distributed` (gloo) processes on 127.0.0.1, without Ray: what the
global-batch test runs in each of them.

Each rank trains every method twice from the same seed: once alone on the global batches
(W·B rows, no process group in use: what one worker with batch W·B does), and once as one of W
workers on its rows of them (rows r, r+W, ... as the ingest strides them), through
`mmray.train.collective.distribute`, the same call a Ray Train worker makes. It writes, per method,
the largest difference between the two runs' parameters (and BatchNorm buffers) after the steps.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, StepContext, build_method

from helpers import SPEC, SPEC_IT, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
STEPS = 3
# float32 on both sides; the two runs differ only in how sums over the batch are split.
RTOL, ATOL = 1e-4, 1e-6
# Options that take random draws whose layout depends on the batch out of the comparison:
# a dropout mask is drawn for the tensor a worker holds, so W workers' masks are not the slices
# of one global mask (REP's replay nets: Dropout(0.1); reprogramming's attention: 0.3).
OPTIONS = {"rep": {"dropout": 0.0}, "reprogram": {"dropout": 0.0}}


def spec_for(name: str):
    return next((s for s in (SPEC, SPEC_IT) if not METHODS[name].unsupported(s)), None)


def rows(batch: dict, rank: int, world: int) -> dict:
    """Worker `rank`'s part of a global batch, as the ingest's striding gives it."""
    def take(v):
        if torch.is_tensor(v):
            return v[rank::world]
        if isinstance(v, dict):
            return {k: take(x) for k, x in v.items()}
        return v[rank::world]
    return take(batch)


def train(method, batches: list[dict], ctx: StepContext, seed: int) -> None:
    torch.manual_seed(seed)  # as the loop does per epoch: the same draws on every worker
    opt = torch.optim.SGD(method.param_groups(0.0), lr=0.05, momentum=0.9)
    ctx.batches_per_epoch = len(batches)
    ctx.train_batches = lambda: iter(batches)
    method.train()
    method.on_epoch_start(0)
    method.before_epoch(opt, ctx)
    for i, b in enumerate(batches):
        ctx.batch_idx = i
        method.train_step(b, opt, ctx)


def compare(name: str, rank: int, world: int, batch: int, seed: int) -> dict:
    from mmray.train.collective import distribute

    spec = spec_for(name)
    if spec is None:
        return {"status": "unsupported"}
    torch.manual_seed(seed)
    one = build_method(spec, MODEL, MethodConfig(name, options=OPTIONS.get(name, {})))
    many = copy.deepcopy(one)
    global_batches = [make_batch(spec, b=batch * world, seed=100 + k) for k in range(STEPS)]
    train(one, global_batches, StepContext(device=torch.device("cpu")), seed)
    ctx = StepContext(device=torch.device("cpu"))
    distribute(many, ctx)
    train(many, [rows(b, rank, world) for b in global_batches], ctx, seed)
    want, got = one.state_dict(), many.state_dict()
    # The worst |got − want| / (ATOL + RTOL·|want|) over every float entry: ≤ 1 is within.
    worst, worst_key, worst_abs = 0.0, "", 0.0
    for k, v in want.items():
        if not torch.is_tensor(v) or not v.is_floating_point() or not v.numel():
            continue
        diff = (got[k] - v).abs()
        err = float((diff / (ATOL + RTOL * v.abs())).max())
        if err > worst:
            worst, worst_key, worst_abs = err, k, float(diff.max())
    moved = max(float((v - w).abs().max()) for (k, v), w in zip(
        want.items(), build_state_like(name, spec, seed).values(), strict=True)
        if torch.is_tensor(v) and v.is_floating_point() and v.numel())
    return {"status": "ok", "err": worst, "worst": worst_key, "abs": worst_abs, "moved": moved,
            "keys_equal": list(want) == list(got)}


def build_state_like(name: str, spec, seed: int) -> dict:
    torch.manual_seed(seed)
    return build_method(spec, MODEL, MethodConfig(name, options=OPTIONS.get(name, {}))).state_dict()


def worker(rank: int, world: int, port: int, out: str, names: list[str], batch: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            try:
                results[name] = compare(name, rank, world, batch, seed=7)
            except Exception:
                results[name] = {"status": "error", "error": traceback.format_exc()}
            Path(out, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()
