"""Collectives across Ray Train workers, in plain `torch.distributed` (no ray here).

Several workers must make the update one worker would make on the global batch (the W workers'
batches of a step, W·B rows). Three things do it:

- `GradReducer`: data-parallel gradient averaging that overlaps backward, DDP's design without
  DDP's wrapper. The method's parameters are split into buckets of about `bucket_mb` (in reverse
  registration order, roughly the order backward reaches them); a hook on each parameter
  (`register_post_accumulate_grad_hook`) notes its gradient is ready, and a full bucket starts
  its all-reduce at once (`async_op=True`) while backward goes on with the earlier layers. Why not
  `DistributedDataParallel` itself: DDP's reducer is armed by a forward through the DDP wrapper,
  once per backward, while mmray's methods call their encoders directly, forward several times
  before one backward (MMPareto's per-task losses), step several times per batch (MLA: once per
  modality; ReconBoost, Greedy) or train copies (G-Blending). The hooks sit on the parameters, so
  any forward and any number of backwards per step work, and checkpoints keep their keys (no
  `module.` prefix). Parameters a step does not reach (unused parameters: another modality's
  encoder in MLA's step, a DynMM expert not routed to) are found before backward by walking the
  loss's autograd graph, as DDP's `find_unused_parameters` does: their bucket launches without
  waiting for them (zeros in their place), and a parameter no worker reached keeps no gradient,
  so the optimizer skips it as it would in one process.
- `GlobalBatchNorm`: BatchNorm whose training statistics are those of the global batch (an
  all-reduce with autograd, so gradients flow across workers as in one process); on CUDA with
  NCCL, PyTorch's `SyncBatchNorm` does the same. State-dict keys are unchanged.
- `all_reduce_sum`, `all_gather_rows`: for the statistics a method takes from its batch
  (`StepContext.reduce_sum`, `StepContext.all_gather`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmray.methods.base import StepContext


def world_size() -> int:
    """Workers in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _backend_device(t: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over workers of `t` (`t` itself with one worker); summed in float64, so counts and
    sums of many rows lose nothing, and returned in `t`'s dtype and device. Not differentiable."""
    if world_size() == 1:
        return t
    buf = t.detach().to(_backend_device(t), torch.float64)
    dist.all_reduce(buf)
    return buf.to(t.device, t.dtype)


def _gather_padded(t: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every worker's `t` (rows padded to the most any worker holds), and each one's row count."""
    w, dev = world_size(), _backend_device(t)
    counts = torch.tensor([t.shape[0]], device=dev)
    all_counts = [torch.zeros_like(counts) for _ in range(w)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[:t.shape[0]] = t.detach().to(dev)
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return parts, sizes


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of `t` (dim 0) of every worker, in the global batch's order: with W workers the
    ingest gives worker r rows r, r+W, r+2W, ... of each global batch, so row i of worker r is
    global row r + W·i. Workers may hold different row counts (a last, short batch). Not
    differentiable (for statistics)."""
    w = world_size()
    if w == 1:
        return t
    parts, sizes = _gather_padded(t)
    total = sum(sizes)
    at = [(r + w * i, part[i]) for r, (part, n) in enumerate(zip(parts, sizes, strict=True)) for i in range(n)]
    if sorted(k for k, _ in at) == list(range(total)):
        rows = [x for _, x in sorted(at, key=lambda kx: kx[0])]
    else:  # counts that striding cannot give: keep rank order
        rows = [x for _, x in at]
    return torch.stack(rows).to(t.device)


class _GatherRows(torch.autograd.Function):
    """Every worker's rows in rank order; the backward sums the gradient over the workers (each
    computed the same loss from all rows) and hands each its own rows' part."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts, sizes = _gather_padded(t)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = all_reduce_sum(grad.contiguous())
        start = sum(ctx.sizes[:ctx.rank])
        return total[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of `t`, in rank order, differentiable (`StepContext.gather_with_grad`)."""
    return t if world_size() == 1 else _GatherRows.apply(t)


# -- BatchNorm over the global batch ------------------------------------------------------------


class _SumOverWorkers(torch.autograd.Function):
    """Σ over workers with autograd: the gradient of a sum is the sum of the workers' gradients
    (every worker's loss depends on every worker's contribution)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (any input rank ≥ 2, channels in dim 1) whose training-mode statistics are the
    global batch's: Σx and then Σ(x − mean)² all-reduced with autograd (two passes, as exact as
    one process's). Eval mode, and one worker, are plain BatchNorm. Every worker must call it
    equally often (the methods' forwards are the same on every worker)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        if not use_batch or world_size() == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n_local = torch.tensor([x.numel() / max(x.shape[1], 1)], device=x.device)
        first = _SumOverWorkers.apply(torch.cat([xf.sum(dims), n_local]))
        n = first[-1].detach()
        mean = first[:-1] / n
        centred = xf - mean.view(shape)
        var = _SumOverWorkers.apply((centred * centred).sum(dims)) / n
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(n))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        # As `F.batch_norm`: the running variance takes the unbiased estimate.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / max(n - 1, 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by one over the global batch: `GlobalBatchNorm`,
    or PyTorch's `SyncBatchNorm` when the process group is NCCL (CUDA kernels). The new modules
    hold the same parameter and buffer objects, so an optimizer built before keeps working and
    the state-dict keys do not change."""
    if world_size() == 1:
        return module
    if dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm | nn.SyncBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = global_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


# -- gradients ------------------------------------------------------------------------------------


def reached_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors backward from `loss` will accumulate a gradient into: the
    `AccumulateGrad` nodes of its graph (what DDP's find_unused_parameters walks)."""
    seen, found = set(), set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    waiting: int = 0
    handle: object | None = None
    flat: torch.Tensor | None = None
    # Whether each parameter gave a gradient on this worker this step.
    local: list[bool] = field(default_factory=list)


class GradReducer:
    """Averages the gradients of `module`'s trainable parameters over the workers, bucket by
    bucket during backward (see the module docstring). `prepare(loss)` before a backward,
    `finish()` after it: then every reached parameter holds the global average."""

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0):
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        cap, current, size = bucket_mb * 2**20, [], 0.0
        for p in reversed(params):  # backward reaches the last-registered layers first
            if current and (size + p.numel() * p.element_size() > cap
                            or p.dtype != current[0].dtype or p.device != current[0].device):
                self.buckets.append(_Bucket(current))
                current, size = [], 0.0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        self.where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self.armed = False
        self.next_launch = 0
        self.used_handle: object | None = None
        self.used: torch.Tensor | None = None
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def prepare(self, loss: torch.Tensor) -> None:
        reached = reached_parameters(loss)
        flags = []
        for b in self.buckets:
            b.local = [id(p) in reached for p in b.params]
            b.waiting = sum(b.local)
            b.handle = b.flat = None
            flags += b.local
        self.next_launch = 0
        # Which parameters any worker reached: started now, first of this step's collectives on
        # every worker, read in `finish`.
        dev = _backend_device(loss)
        self.used = torch.tensor(flags, dtype=torch.float32, device=dev)
        self.used_handle = dist.all_reduce(self.used, async_op=True)
        self.armed = True
        self._launch_ready()  # buckets none of whose parameters this worker reaches

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed or id(p) not in self.where:
            return
        bucket, _ = self.where[id(p)]
        bucket.waiting -= 1
        if bucket.waiting == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        # In bucket order on every worker, so the collectives match across workers even when
        # backward finishes buckets in another order.
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].waiting == 0:
            b = self.buckets[self.next_launch]
            dev = _backend_device(b.params[0])
            b.flat = torch.cat([(p.grad if used else torch.zeros_like(p)).reshape(-1).to(dev)
                                for p, used in zip(b.params, b.local, strict=True)])
            b.handle = dist.all_reduce(b.flat, async_op=True)
            self.next_launch += 1

    @torch.no_grad()
    def finish(self) -> None:
        if not self.armed:
            return
        self.armed = False
        if self.next_launch != len(self.buckets):
            raise RuntimeError("gradient buckets left unlaunched after backward: a parameter "
                               "reached by the loss got no gradient (a hook or detach on it?)")
        self.used_handle.wait()
        used = iter((self.used > 0).tolist())
        w = world_size()
        for b in self.buckets:
            b.handle.wait()
            b.flat.div_(w)
            offset = 0
            for p in b.params:
                n = p.numel()
                if next(used):
                    g = b.flat[offset:offset + n].view_as(p).to(p.device)
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
                offset += n
            b.flat = b.handle = None


class GradSync:
    """The gradient averaging a multi-worker `StepContext` calls (`before_backward`, `sync_grads`):
    one `GradReducer` per module that steps (the method, or a copy it trains: G-Blending)."""

    def __init__(self, bucket_mb: float = 25.0):
        self.bucket_mb = bucket_mb
        self.reducers: weakref.WeakKeyDictionary[nn.Module, GradReducer] = weakref.WeakKeyDictionary()

    def before_backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        if module not in self.reducers:
            self.reducers[module] = GradReducer(module, self.bucket_mb)
        self.reducers[module].prepare(loss)

    def sync_grads(self, module: nn.Module) -> None:
        self.reducers[module].finish()


def distribute(method: nn.Module, ctx: StepContext, bucket_mb: float = 25.0) -> None:
    """Make a run on several workers take the steps one worker takes on the global batch:
    BatchNorm over the global batch, gradients averaged during backward, and the context's
    `reduce_sum`/`all_gather`/`world_size` across workers. A no-op with one worker."""
    w = world_size()
    if w == 1:
        return
    global_batchnorm(method)
    sync = GradSync(bucket_mb)
    ctx.before_backward = sync.before_backward
    ctx.sync_grads = sync.sync_grads
    ctx.reduce_sum = all_reduce_sum
    ctx.all_gather = all_gather_rows
    ctx.gather_with_grad = gather_with_grad
    ctx.world_size = w
    ctx.rank = dist.get_rank()
