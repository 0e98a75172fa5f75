"""Ray Train glue: one experiment as a `TorchTrainer` whose workers read their part of each epoch.

The loop itself is `mmray.train.loop.fit`; Ray touches it in four places, marked RAY below: the
splits cached in the object store (`mmray.data.ingest` reads them, or streams the shard files,
in each epoch's seeded order), gradients, method statistics and metrics reduced across workers
(`mmray.train.collective`), the checkpoint restored on start (after a worker failure Ray
restarts the group and hands back the latest one), and the per-epoch `ray.train.report`, which
carries the checkpoint written by rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mmray.config import from_dict, to_dict
from mmray.data import ingest, missing
from mmray.data.reader import load_manifest, spec_of
from mmray.train import collective
from mmray.train.experiment import ExperimentConfig
from mmray.train.loop import (
    CHECKPOINT_FILE,
    RunState,
    build_state,
    fit,
    load_checkpoint,
    make_context,
    resolve_device,
    save_checkpoint,
)

SPLITS = ingest.SPLITS
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's controller poll interval


def _all_gather(obj: Any) -> list[Any]:
    """`obj` of every worker, by rank (a collective when there are several)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class SetupError(RuntimeError):
    """A run's workers could not set up (build the method, load weights or the checkpoint): a
    config or input error that would fail the same way again, so the run is not retried."""


def _setup_error_dir(run_config: dict) -> tuple[pafs.FileSystem, str]:
    """Where workers leave setup errors for the driver: beside the run's checkpoints (local or
    remote storage alike), one file per attempt."""
    return pafs.FileSystem.from_uri(run_config["setup_errors"])


def _leave_setup_error(config: dict, failures: list[str]) -> None:
    fs, folder = _setup_error_dir(config)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{uuid.uuid4().hex}.txt") as f:
        f.write("\n".join(failures).encode())


def setup_errors(config: dict) -> list[str]:
    """The setup errors workers left for the run of `config` (one text per attempt)."""
    fs, folder = _setup_error_dir(config)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        with fs.open_input_stream(info.path) as f:
            out.append(f.read().decode())
    return out


def fit_trainer(trainer: TorchTrainer):
    """`trainer.fit()`, raising `SetupError` at once, without Ray's retries, when the workers
    could not set up; returns the Train result."""
    config = trainer.train_loop_config
    fs, folder = _setup_error_dir(config)
    fs.delete_dir_contents(folder, missing_dir_ok=True)  # left by an earlier, since fixed, start
    result = trainer.fit()
    if errors := setup_errors(config):
        raise SetupError(f"run {trainer.run_config.name}: the workers could not set up, "
                         f"and retrying would not help:\n{errors[0]}")
    return result


_TRAIN_PACKAGE = os.path.dirname(ray.train.__file__)


class _TrainRecordsOffConsole(logging.Filter):
    """Keeps Ray Train's own records below `level` off a worker's console, its stderr that Ray
    forwards to the driver: Ray Train logs one per report with the whole metrics dict, from a
    logger named after its file, which `LoggingConfig` does not reach. Ray Train's log files
    (`<session>/logs/train/`) still get them."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.pathname.startswith(_TRAIN_PACKAGE)


def quiet_train_console(level: str) -> None:
    """Add the filter to the console handlers of this process's root logger (once)."""
    for h in logging.getLogger().handlers:
        console = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        if console and not any(isinstance(f, _TrainRecordsOffConsole) for f in h.filters):
            h.addFilter(_TrainRecordsOffConsole(logging.getLevelName(level)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `config`: experiment (dict), version_dir, tracking,
    train_log_level."""
    quiet_train_console(config.get("train_log_level", "INFO"))
    cfg: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
    version_dir = config["version_dir"]
    manifest = load_manifest(version_dir)
    spec = spec_of(manifest)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.device != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        device = resolve_device(cfg.train) if cfg.train.device != "auto" else torch.device("cpu")

    try:
        state = build_state(cfg, spec, device)
        cached = config.get("cached") or {}
        tables = {s: ray.get(ref) for s, ref in cached.items()}  # RAY: mapped, not copied
        readers = ingest.split_readers(cfg, version_dir, manifest, tables, rank, world)
        checkpoint = ray.train.get_checkpoint()  # RAY: the latest checkpoint after a restart
        if checkpoint:
            with checkpoint.as_directory() as folder:
                load_checkpoint(state, folder)
        failure = ""
    except Exception as e:  # a config or input error: it would fail the same way again
        failure = f"rank {rank}: {type(e).__name__}: {e}"
    # Collectives: every rank takes part, so all return together when any failed (Ray would
    # otherwise restart the group up to max_failures times for the same error).
    if failures := [f for f in _all_gather(failure) if f]:
        if rank == 0:
            _leave_setup_error(config, failures)
        return
    nodes = _all_gather(ray.get_runtime_context().get_node_id())
    tracker = None
    if rank == 0 and config.get("tracking"):
        from mmray.tracking.mlflow_log import EpochLogger

        tracker = EpochLogger(**config["tracking"])
        # Where this run's workers ran, and the report poll interval that reached them (set on
        # the driver, passed on by Ray through the run's controller).
        # How each split reached the loop (train.ingest). The GPUs (or GPU fraction) rank 0's
        # worker holds in Ray's scheduling, and the device it trains on.
        held = ray.get_runtime_context().get_assigned_resources()
        tracker.set_tags({"train_nodes": ",".join(nodes), "train_poll_s": os.environ.get(POLL_ENV, ""),
                          "ingest": ",".join(f"{s}={'cache' if s in cached else 'stream'}" for s in readers),
                          "train_gpus": f"{held.get('GPU', 0):g}", "train_device": str(device)})
    batches = ingest.batches_fn(version_dir, manifest, readers, device)

    def report(epoch: int, metrics: dict, st: RunState) -> None:
        if tracker:
            tracker.log(metrics, epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Checkpoint.from_directory(save_checkpoint(st, tmp).parent) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)  # RAY: a barrier, every rank calls it

    ctx = make_context(cfg.train, device, scaler=state.scaler)  # fp16: checkpointed
    # RAY: with several workers, the step of one worker on the global batch: gradients averaged
    # in buckets during backward, BatchNorm and method statistics over the workers' batches.
    collective.distribute(state.method, ctx)
    ctx.batches_per_epoch = max(1, math.ceil(len(readers["train"]) / cfg.train.batch_size))
    splits = tuple(s for s in ("val", "test") if s in readers)
    if state.epoch >= cfg.train.epochs and state.history:
        # Restored a finished run (e.g. a resumed sweep): nothing to train, report the final state.
        report(state.epoch - 1, state.history[-1], state)
        return
    fit(cfg, state, batches, report, ctx, reduce=collective.all_reduce_sum, splits=splits)


def build_trainer(cfg: ExperimentConfig, version_dir: str | Path, name: str, storage_path: str,
                  tracking: dict | None = None, callbacks: list | None = None,
                  train_log_level: str = "INFO") -> TorchTrainer:
    """A TorchTrainer for one experiment. The same `name` + `storage_path` resumes that run.
    `train_log_level`: the least level of Ray Train's own records on the console (a sweep
    prints its own progress lines and passes WARNING); its log files keep every record."""
    manifest = load_manifest(version_dir)
    missing.check(cfg.data.missing, spec_of(manifest))  # a bad type fails here, not in a worker
    # RAY: read by TorchTrainer.fit() in this process and passed on to the run's controller.
    os.environ[POLL_ENV] = str(cfg.train.report_poll_s)
    store = ray.cluster_resources().get("object_store_memory", 0)
    # RAY: a cached split is put in the object store once; workers map it without copying.
    cached = {s: ray.put(ingest.read_table(version_dir, s)) for s in SPLITS if manifest["rows"].get(s)
              and ingest.choose_cache(cfg.train.ingest, ingest.split_bytes(version_dir, s), store)}
    use_gpu = cfg.train.reserves_gpus(ray.cluster_resources().get("GPU", 0))
    gpus = {"GPU": cfg.train.gpus_per_worker} if use_gpu else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_dict(cfg), "version_dir": str(version_dir),
                           "tracking": tracking, "train_log_level": train_log_level,
                           "cached": cached,
                           "setup_errors": f"{storage_path.rstrip('/')}/{name}/setup_errors"},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **gpus},
        ),
        # RAY: workers that reserve GPUs get nccl by default; a CPU run that reserves them
        # (train.reserve_gpus_on_cpu) communicates over gloo.
        torch_config=TorchConfig(backend="gloo") if cfg.train.device == "cpu" else None,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            callbacks=callbacks or [],
            # Ray Train's `ray.train.*` loggers of the controller and workers (console and
            # application log file; its system log file keeps every level).
            logging_config=ray.train.LoggingConfig(log_level=train_log_level),
        ),
    )


def final_state(result) -> dict:
    """Load the final checkpoint's run history (metrics of every epoch) from a Train result."""
    if result.checkpoint is None:
        return {}
    with result.checkpoint.as_directory() as folder:
        sd = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    return {"epoch": sd["epoch"], "history": sd["history"]}
