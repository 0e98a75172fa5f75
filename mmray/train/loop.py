"""The plain torch training loop, shared by local runs and Ray Train workers.

Nothing here imports ray: `fit` takes a function that yields batches of a split for an epoch and
a function that receives each epoch's metrics and the state to checkpoint. `mmray.train.ray_train`
wires those to Ray Data shards and `ray.train.report`; `run_local` wires them to Parquet files and
a checkpoint folder, which is what the tests use.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmray.cost import count_params
from mmray.data.missing import MissingSpec, robustness_specs, split_specs
from mmray.data.spec import DatasetSpec
from mmray.methods import Batch, Method, StepContext, build_method
from mmray.train.experiment import ExperimentConfig, TrainConfig
from mmray.train.metrics import MetricAccumulator

# (split, epoch, missing-modality table to apply or None) -> batches
BatchesFn = Callable[[str, int, "MissingSpec | None"], Iterable[Batch]]
ReportFn = Callable[[int, dict, "RunState"], None]  # (epoch, metrics, state)

CHECKPOINT_FILE = "state.pt"


@dataclass
class RunState:
    """Everything a checkpoint holds; `epoch` is the next epoch to run."""

    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    # Under train.select=best_val, the best epoch so far: {"epoch", "score", "method" (its
    # weights, on the CPU)}. In the checkpoint, so a resumed run selects exactly the same.
    best: dict | None = None
    # train.precision=fp16: the loss scaler; its scale and growth count are checkpointed, so a
    # resumed run does not start again from the initial scale (and its first overflows).
    scaler: torch.amp.GradScaler | None = None

    def state_dict(self) -> dict:
        return {
            "method": self.method.state_dict(),  # includes method state via get_extra_state
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.method.load_state_dict(sd["method"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler and sd["scheduler"]:
            self.scheduler.load_state_dict(sd["scheduler"])
        self.epoch = int(sd["epoch"])
        self.history = list(sd["history"])
        self.best = sd.get("best")
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])


def save_checkpoint(state: RunState, folder: str | Path) -> Path:
    """Write `state.pt` atomically: a reader sees the old file or the new one, never half."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".state-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state.state_dict(), tmp)
        os.replace(tmp, folder / CHECKPOINT_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder / CHECKPOINT_FILE


def load_checkpoint(state: RunState, folder: str | Path) -> None:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    state.method.to(next(state.method.parameters()).device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """auto: CUDA if this process sees a GPU, else CPU. Asking for cuda without one is an error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `train.precision` gives on `device`; None: fp32 (no autocast)."""
    if cfg.precision == "auto":  # bf16 on CUDA: same range as fp32, no scaler needed
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaler (torch's defaults: scale 2^16, halved after an overflow,
    doubled after 2000 good steps); None for every other precision."""
    if resolve_precision(cfg, device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def compile_encoders(method: Method) -> None:
    """torch.compile each encoder in place (`nn.Module.compile`): the module tree, its
    state_dict keys and what the methods reach inside the encoders stay as they are; only a
    call of the encoder runs the compiled forward. Compilation happens at the first call, and
    again for eval mode and each new input shape: static shapes, since inductor (torch 2.14,
    CPU) failed to compile the backward of a dynamic-shape BatchNorm encoder."""
    for encoder in method.encoders.values():
        encoder.compile(dynamic=False)


def build_state(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> RunState:
    seed_everything(cfg.seed)  # same seed -> same initial weights on every worker
    method = build_method(spec, cfg.model, cfg.method).to(device)
    t = cfg.train
    if t.compile:
        compile_encoders(method)
    groups = method.param_groups(t.weight_decay)
    if t.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    elif t.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=t.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr)
    for group in opt.param_groups:  # a method's per-group lr factor (M2PT's layer-wise decay)
        group["lr"] = t.lr * group.get("lr_scale", 1.0)
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if t.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma)
    elif t.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    elif t.scheduler == "linear":
        epochs, warm = t.epochs, t.warmup * t.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: warmup_linear(e + 0.5, epochs, warm))  # an epoch: its midpoint's value
    return RunState(method, opt, sched, scaler=make_scaler(t, device))


def warmup_linear(t: float, total: float, warmup: float) -> float:
    """The factor on the lr at time t of `total`: t / warmup while warming up, then linear decay
    (total − t) / (total − warmup) to 0 at the end (MAP/REP's recipe, there per step)."""
    if t < warmup:
        return t / warmup
    return max(0.0, (total - t) / max(total - warmup, 1e-12))


def make_context(cfg: TrainConfig, device: torch.device,
                 sync_grads: Callable[[nn.Module], None] | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> StepContext:
    """The step context of `cfg`'s precision on `device`. Under fp16 pass the run's
    `RunState.scaler` (checkpointed); without one a fresh scaler is made."""
    amp = resolve_precision(cfg, device)
    if amp == torch.float16 and scaler is None:
        scaler = make_scaler(cfg, device)
    ctx = StepContext(device=device, amp_dtype=amp, scaler=scaler if amp == torch.float16 else None)
    if sync_grads is not None:
        ctx.sync_grads = sync_grads
    return ctx


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB (ru_maxrss is in KB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mean(values: list) -> float:
    # One device->host copy per epoch, not per step: step losses stay tensors until here.
    return float(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).mean()) if values else 0.0


def method_state(method: Method) -> dict:
    """A copy of the method's state other than its parameters: its buffers and its extra state
    (QMF's loss history, AGM's running scores, ReconBoost's stepped set, ...), as in its
    state_dict, so `method.load_state_dict(copy, strict=False)` puts it back."""
    params = {name for name, _ in method.named_parameters(remove_duplicate=False)}
    return {k: copy.deepcopy(v) for k, v in method.state_dict().items() if k not in params}


def train_step(method: Method, batch: Batch, optimizer: torch.optim.Optimizer,
               ctx: StepContext) -> dict | None:
    """`method.train_step` on one batch; its values to log, or None for a batch with a skipped
    step (fp16: gradients not finite, so `backward_and_step` did not step).

    A method updates its state inside its train step, before the step ends (QMF's history,
    AGM's running scores); when every step of the batch was skipped, that state is put back as
    it was before the batch, so the batch leaves no trace: parameters and optimizer state are
    untouched by a skipped step, and this restores the rest. (A method that steps several times
    per batch undoes its own state change for a single skipped step: MLA.) The copy is taken
    only under fp16 and costs a copy of the method's buffers per batch."""
    if ctx.scaler is None:
        return method.train_step(batch, optimizer, ctx)
    saved = method_state(method)
    applied, skipped = ctx.applied_steps, ctx.skipped_steps
    out = method.train_step(batch, optimizer, ctx)
    if ctx.skipped_steps == skipped:
        return out
    if ctx.applied_steps == applied:
        method.load_state_dict(saved, strict=False)
    return None  # not logged: a skipped step's gradient norms are not finite


def train_epoch(state: RunState, batches: Iterable[Batch], ctx: StepContext) -> dict[str, float]:
    method = state.method
    method.train()
    method.on_epoch_start(ctx.epoch)
    before = method.before_epoch(state.optimizer, ctx)
    logs: dict[str, list] = {}
    skipped = ctx.skipped_steps
    for i, batch in enumerate(batches):
        ctx.batch_idx = i
        out = train_step(method, batch, state.optimizer, ctx)
        for k, v in (out or {}).items():
            logs.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else v)
    if state.scheduler is not None:
        state.scheduler.step()
    metrics = {f"train/{k}": _mean(v) for k, v in logs.items()}
    if ctx.scaler is not None:  # fp16: the epoch's skipped steps and the scale it ended with
        metrics["train/amp_skipped_steps"] = float(ctx.skipped_steps - skipped)
        metrics["train/amp_scale"] = ctx.scaler.get_scale()
    metrics.update({f"train/{k}": float(v) for k, v in before.items()})
    metrics.update(method.epoch_metrics())
    return metrics


@torch.no_grad()
def evaluate(method: Method, batches: Iterable[Batch], ctx: StepContext, split: str,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             measure_cost: bool = False) -> dict[str, float]:
    """Fused and per-modality metrics over a split; `reduce` sums counts across workers.

    With `measure_cost`, also what the model costs (METHODS.md §5, `mmray.cost`): FLOPs per
    sample counted on every forward of the split, so a routed model (DynMM) is charged for the
    paths it actually took; parameters; and the median latency of one batch.
    """
    from mmray.cost import latency

    method.eval()
    acc = MetricAccumulator(method.spec, method.modalities)
    flops = torch.zeros(2, dtype=torch.float64)  # [FLOPs counted, samples]
    example = None
    for batch in batches:
        counter = FlopCounterMode(display=False) if measure_cost else contextlib.nullcontext()
        with ctx.autocast(), counter:
            out = method.predict(batch)
        if measure_cost:
            flops += torch.tensor([counter.get_total_flops(), len(batch["id"])], dtype=torch.float64)
            example = example if example is not None else batch
        loss = method.criterion(out.logits, batch["label"])
        acc.update(out, batch["label"], loss)
    metrics = acc.compute(split, reduce)
    counts = method.eval_counts()  # e.g. DynMM's routing; summed over workers like the rest
    if counts is not None:
        reduced = reduce(counts.double()) if reduce is not None else counts.double()
        metrics.update({f"{split}/{k}": v for k, v in method.eval_metrics(reduced).items()})
    if measure_cost:
        total = reduce(flops) if reduce is not None else flops
        metrics["cost/flops_per_sample"] = float(total[0] / total[1].clamp(min=1))
        metrics["cost/params"] = float(count_params(method))
        if example is not None:
            with ctx.autocast():
                seconds = latency(method, example, call=method.predict)
            metrics["cost/latency_ms"] = 1000.0 * seconds
            method.eval_counts()  # drop what the timed forwards added
    return metrics


def select_metric(cfg: ExperimentConfig, spec: DatasetSpec) -> str:
    """The val metric that picks the reported epoch (train.select=best_val)."""
    return cfg.train.select_metric or ("val/f1_macro" if spec.multilabel else "val/acc")


def track_best(cfg: ExperimentConfig, state: RunState, metrics: dict[str, float], epoch: int) -> None:
    """Keep the weights of the epoch with the best val metric so far (ties keep the earlier)."""
    if cfg.train.select != "best_val" or not any(k.startswith("val/") for k in metrics):
        return
    name = select_metric(cfg, state.method.spec)
    if name not in metrics:
        raise ValueError(f"train.select_metric: this run has no {name!r}; its val metrics are "
                         f"{sorted(k for k in metrics if k.startswith('val/'))}")
    score = metrics[name] if cfg.train.select_mode == "max" else -metrics[name]
    if state.best is None or score > state.best["score"]:
        weights = {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                   for k, v in state.method.state_dict().items()}
        state.best = {"epoch": epoch, "score": score, "method": weights}


def selected_model(state: RunState, epoch: int) -> tuple[Method, int]:
    """(model, epoch) whose test metrics the run reports: the kept best epoch's weights in a
    copy of the method (the training state stays as it is), or the method as it is now."""
    if state.best is None or state.best["epoch"] == epoch:
        return state.method, epoch
    model = copy.deepcopy(state.method)
    model.load_state_dict(state.best["method"])
    return model, state.best["epoch"]


def fit(cfg: ExperimentConfig, state: RunState, batches: BatchesFn, report: ReportFn,
        ctx: StepContext, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        splits: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """Train from `state.epoch` to `cfg.train.epochs`, evaluating every epoch.

    Each epoch re-seeds torch from (seed, epoch) so that a run resumed from a checkpoint draws
    the same random numbers as one that never stopped. The test split is evaluated once, after
    the last epoch, on the model of the selected epoch (train.select: the best val epoch, or the
    last), so model selection never sees it; `select/epoch` records which.
    """
    missing = split_specs(cfg.data.missing)
    if reduce is not None:
        ctx.reduce_sum = reduce
    rss_start = rss_mb()
    for epoch in range(state.epoch, cfg.train.epochs):
        seed_everything(cfg.seed * 100_003 + epoch)
        ctx.epoch = epoch
        lr = state.optimizer.param_groups[0]["lr"]  # this epoch's; the scheduler steps at its end
        t0 = time.perf_counter()
        ctx.train_batches = functools.partial(batches, "train", epoch, missing["train"])
        metrics = train_epoch(state, ctx.train_batches(), ctx)
        metrics["time/train_epoch_s"] = time.perf_counter() - t0
        # Memory of this process (rank 0's on Ray): its peak up to the end of this epoch's
        # training (before evaluating), and where it stood when this call of fit began.
        metrics["mem/peak_rss_mb"] = peak_rss_mb()
        metrics["mem/rss_at_start_mb"] = rss_start
        last = epoch == cfg.train.epochs - 1
        cost_split = "test" if "test" in splits else "val"  # the run's last evaluation
        t_eval = time.perf_counter()
        if "val" in splits:
            metrics.update(evaluate(state.method, batches("val", epoch, missing["val"]), ctx, "val",
                                    reduce, measure_cost=last and cost_split == "val"))
            track_best(cfg, state, metrics, epoch)
        final = None
        if last and "test" in splits:
            # Once, on the selected epoch's deployable model (e.g. M2PT merged).
            model, metrics["select/epoch"] = selected_model(state, epoch)
            final = model.final_module()
            metrics.update(evaluate(final, batches("test", epoch, missing["test"]), ctx, "test",
                                    reduce, measure_cost=True))
        if final is not None:  # robustness: the test split at other missing rates and types
            for spec in robustness_specs(cfg.data.missing):
                m = evaluate(final, batches("test", epoch, spec), ctx, "test", reduce)
                metrics.update({f"test_miss_{spec.tag}/{k.split('/', 1)[1]}": v for k, v in m.items()})
        metrics["time/eval_s"] = time.perf_counter() - t_eval  # the last epoch's includes cost
        if last:
            metrics["cost/trainable_params"] = float(count_params(state.method, trainable_only=True))
            # The run's mean training time per epoch (a resumed run's earlier epochs included).
            times = [h["time/train_epoch_s"] for h in state.history] + [metrics["time/train_epoch_s"]]
            metrics["cost/train_epoch_s"] = sum(times) / len(times)
        metrics["epoch"] = epoch
        metrics["lr"] = lr
        state.epoch = epoch + 1
        state.history.append(metrics)
        report(epoch, metrics, state)
    return state.history


def run_local(cfg: ExperimentConfig, version_dir: str | Path, checkpoint_dir: str | Path | None = None,
              stop_after: int | None = None) -> list[dict]:
    """Train in this process from Parquet shards; resumes from `checkpoint_dir` if it holds one.

    The same ingest as a Ray Train worker (`mmray.data.ingest`), so the batches are the same.
    `stop_after` ends the run after that many epochs of this call (to test resuming).
    """
    from mmray.data import ingest, missing
    from mmray.data.reader import load_manifest, spec_of

    manifest = load_manifest(version_dir)
    spec = spec_of(manifest)
    missing.check(cfg.data.missing, spec)
    device = resolve_device(cfg.train)
    state = build_state(cfg, spec, device)
    if checkpoint_dir and (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file():
        load_checkpoint(state, checkpoint_dir)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    tables = {s: ingest.read_table(version_dir, s) for s in ingest.SPLITS if manifest["rows"].get(s)
              and ingest.choose_cache(cfg.train.ingest, ingest.split_bytes(version_dir, s), memory)}
    readers = ingest.split_readers(cfg, version_dir, manifest, tables)
    batches = ingest.batches_fn(version_dir, manifest, readers, device)
    done = {"n": 0}

    class _Stop(Exception):
        pass

    def report(epoch: int, metrics: dict, st: RunState) -> None:
        if checkpoint_dir:
            save_checkpoint(st, checkpoint_dir)
        done["n"] += 1
        if stop_after is not None and done["n"] >= stop_after:
            raise _Stop

    ctx = make_context(cfg.train, device, scaler=state.scaler)
    ctx.batches_per_epoch = max(1, math.ceil(len(readers["train"]) / cfg.train.batch_size))
    splits = tuple(s for s in ("val", "test") if s in readers)
    with contextlib.suppress(_Stop):
        fit(cfg, state, batches, report, ctx, splits=splits)
    return state.history
