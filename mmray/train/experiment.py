"""The schema of one training run (`ExperimentConfig`) and of its optimisation (`TrainConfig`).

The experiment config gathers every layer's schema (data, model, method, train, tracking); its
checks that need the method registry or the encoders run here, where both are visible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmray.config import bounds, load_config
from mmray.data.sources import DataConfig, get_source
from mmray.encoders import ModelConfig
from mmray.encoders.pretrained import clip_input_sizes, timm_model_known
from mmray.methods import METHODS, MethodConfig, check_method_config
from mmray.tracking import TrackingConfig


@dataclass
class TrainConfig:
    epochs: int = field(default=3, metadata=bounds(1, 100_000))
    batch_size: int = field(default=32, metadata=bounds(1, 1_000_000))
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = field(default=1e-3, metadata=bounds(0.0, 10.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=bounds(0.0, 10.0))
    momentum: float = field(default=0.9, metadata=bounds(0.0, 1.0))
    # Learning-rate schedule, stepped once per epoch. linear: warm-up over the first `warmup`
    # of the epochs, then linear decay to 0 (each epoch at the schedule's value at its midpoint).
    scheduler: Literal["none", "step", "cosine", "linear"] = "none"
    step_size: int = field(default=70, metadata=bounds(1))
    gamma: float = field(default=0.1, metadata=bounds(0.0, 1.0, lo_open=True))
    # Fraction of the epochs the linear schedule warms up over (0.1 in MAP/REP).
    warmup: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # How each split reaches the training loop (`mmray.data.ingest`). cache: read once into
    # memory (on Ray: the object store, one copy per node that its workers share); stream: read
    # from the shard files every epoch, a row group at a time, memory bounded by the batches in
    # flight; auto: cache a split up to 1/8 of the object store (locally: of the memory), else
    # stream.
    ingest: Literal["auto", "cache", "stream"] = "auto"
    # A new permutation of all training rows every epoch, seeded by (seed, epoch); false: the
    # shards' order.
    shuffle: bool = True
    # Threads that read and decode batches ahead of the training loop; 0: cpus_per_worker.
    ingest_threads: int = field(default=0, metadata=bounds(0, 256))
    # Ray Train workers for one run, and what each reserves.
    num_workers: int = field(default=1, metadata=bounds(1, 4096))
    cpus_per_worker: float = field(default=1.0, metadata=bounds(0.0, 1024.0, lo_open=True))
    # GPUs each worker reserves when the run trains on CUDA; a fraction shares one GPU between
    # trials (0.25: four small trials per GPU, each holding a quarter in Ray's scheduling; their
    # memory is not partitioned). Above 1 only whole numbers: Ray places no worker on parts of
    # several GPUs.
    gpus_per_worker: float = field(default=1.0, metadata=bounds(0.0, 8.0, lo_open=True))
    # Reserve gpus_per_worker even with device=cpu: the run is scheduled as a GPU run (e.g. on a
    # cluster of fake GPUs that tests GPU sharing) but trains on the CPU, over gloo.
    reserve_gpus_on_cpu: bool = False
    # auto: CUDA when the worker sees a GPU, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Numerics of the train step and evaluation (`mmray.train.loop.resolve_precision`). auto:
    # bf16 autocast on CUDA, fp32 on CPU; fp32: no autocast; bf16: bf16 autocast on CUDA and
    # CPU; fp16: fp16 autocast with a dynamic gradient scaler (torch.amp.GradScaler): the loss
    # is scaled for backward, the gradients unscaled before any method edits them, and a step
    # whose gradients are not finite is skipped (`train/amp_skipped_steps`). fp16 runs on CPU
    # too (torch supports it there), but only CUDA gains speed from it.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile each encoder in place (`nn.Module.compile`: the state_dict keys and the
    # modules the methods reach stay the same), for static shapes: each new input shape (eval
    # mode, a last partial batch) compiles once more. Off until measured on the GPU bench.
    compile: bool = False
    # Worker-group restarts (from the last checkpoint) before the run fails.
    max_failures: int = field(default=2, metadata=bounds(0))
    checkpoints_to_keep: int = field(default=2, metadata=bounds(1))
    # Which epoch's model a run reports as its final test/* metrics. best_val: the epoch with
    # the best `select_metric` on the val split (its weights are kept in the checkpoint and the
    # test split is evaluated on them once, after the last epoch, so test never selects);
    # last: the last epoch's. Runs without a val split report the last epoch.
    select: Literal["best_val", "last"] = "best_val"
    # The val metric and direction that select; empty: val/acc, or val/f1_macro for multi-label
    # data. An ablation sets them from its search.metric and search.mode.
    select_metric: str = ""
    select_mode: Literal["max", "min"] = "max"
    # How often Ray Train's controller collects a worker's report and checks its health, in
    # seconds. A report waits until the one before it is collected: with Ray's default (2 s),
    # epochs shorter than that wait for the poll, and so does the end of every run
    # (bench/sweep.py: the demo sweep took 151.5 s at 2 s, 99.8 s at 0.25 s).
    report_poll_s: float = field(default=0.25, metadata=bounds(0.0, 60.0, lo_open=True))

    def reserves_gpus(self, cluster_gpus: float) -> bool:
        """Whether each worker reserves `gpus_per_worker` GPUs on a cluster that has
        `cluster_gpus`: device=cuda, device=auto when the cluster has GPUs, or
        reserve_gpus_on_cpu."""
        return (self.device == "cuda" or (self.device == "auto" and cluster_gpus > 0)
                or (self.device == "cpu" and self.reserve_gpus_on_cpu))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            errors.append(f"{path}.gpus_per_worker: {self.gpus_per_worker} is a fraction above 1; "
                          "Ray needs whole GPUs above 1: use a fraction up to 1 (e.g. 0.25) or "
                          "a whole number (2)")
        if self.select_metric and not self.select_metric.startswith("val/"):
            errors.append(f"{path}.select_metric: {self.select_metric!r} must be a val/ metric "
                          "(test never selects), e.g. val/acc")


@dataclass
class ExperimentConfig:
    """One training run: data, model, method, optimisation, tracking."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, path: str, errors: list[str]) -> None:
        check_method_config(self.method, "method", errors)
        clip_method = getattr(METHODS.get(self.method.name), "clip_backbone", False)
        clip_text = self.model.text_encoder == "open_clip" or clip_method
        clip_image = self.model.encoder == "open_clip" or clip_method
        who = f"method.name={self.method.name}" if clip_method else "model.text_encoder=open_clip"
        if clip_text and (self.data.text.tokenizer != "open_clip"
                          or self.data.text.open_clip_model != self.model.open_clip_model):
            errors.append(f"{who} needs data.text.tokenizer=open_clip and "
                          "data.text.open_clip_model equal to model.open_clip_model "
                          f"({self.model.open_clip_model!r})")
        if clip_text or clip_image:
            self._validate_clip_sizes(clip_image, clip_text, errors)

    def _validate_clip_sizes(self, image: bool, text: bool, errors: list[str]) -> None:
        """CLIP takes images of its own size and exactly its context length of tokens."""
        sizes = clip_input_sizes(self.model.open_clip_model)
        if sizes is None:
            errors.append(f"model.open_clip_model: unknown open_clip model "
                          f"{self.model.open_clip_model!r}; e.g. ViT-B-16, or mmray-tiny for tests")
            return
        size, context = sizes
        if image and self.data.image.size != size:
            errors.append(f"data.image.size: {self.data.image.size}, but open_clip model "
                          f"{self.model.open_clip_model!r} takes {size} px images")
        if text and self.data.text.max_tokens != context:
            errors.append(f"data.text.max_tokens: {self.data.text.max_tokens}, but open_clip model "
                          f"{self.model.open_clip_model!r} has a context of {context} tokens")


def _missing_file(path: str, where: str, errors: list[str]) -> None:
    if path and "://" not in path and not Path(path).is_file():
        errors.append(f"{where}: file {path} not found (weights and other inputs load only "
                      "from local files)")


def _unsupported(method, data: DataConfig) -> str:
    """Why `method` is not defined for the dataset `data` names (its modality count or kinds, a
    multi-label task), when the dataset's spec can be read from its raw folder's index without
    preprocessing; "" otherwise (the workers check it again when they build the method)."""
    if "://" in data.root or not Path(data.root).expanduser().is_dir():
        return ""
    try:
        spec = get_source(data.dataset).spec(data)
    except Exception:  # noqa: BLE001 - a bad layout is reported, naming its file, by preprocessing
        return ""
    return method.unsupported(spec)


def preflight(cfg: ExperimentConfig) -> list[str]:
    """What `cfg` names that this machine must have, checked before any work starts (no Ray, no
    data read): the raw data folder, every local weights file (model.weights, model.clip_weights,
    each path option of the method), the timm / open_clip model and tokenizer names, and that the
    method is defined for the dataset (`Method.unsupported`: e.g. multi-label, 3 modalities).
    Returns the problems, one line each; [] when there are none."""
    errors: list[str] = []
    root = cfg.data.root
    # The synthetic source writes its raw folder itself when it is absent.
    if cfg.data.dataset != "synthetic" and "://" not in root and not Path(root).is_dir():
        errors.append(f"data.root: folder {root} not found; it must hold dataset "
                      f"{cfg.data.dataset!r} in its official layout")
    for modality, path in cfg.model.weights.items():
        _missing_file(path, f"model.weights.{modality}", errors)
    _missing_file(cfg.model.clip_weights, "model.clip_weights", errors)
    method = METHODS.get(cfg.method.name)
    if method is not None:
        for f in dataclasses.fields(method.Config):
            value = cfg.method.options.get(f.name)
            if f.metadata.get("path") and isinstance(value, str):
                _missing_file(value, f"method.options.{f.name}", errors)
        errors.extend(method.preflight(cfg.method.options))
        if reason := _unsupported(method, cfg.data):
            errors.append(f"method.name: {reason}")
    if cfg.model.encoder == "timm" and not timm_model_known(cfg.model.timm_name):
        errors.append(f"model.timm_name: unknown timm model {cfg.model.timm_name!r}; e.g. resnet18")
    # (model.open_clip_model is checked with the config whenever a CLIP tower is used.)
    name = cfg.data.text.open_clip_model
    if cfg.data.text.tokenizer == "open_clip" and clip_input_sizes(name) is None:
        errors.append(f"data.text.open_clip_model: unknown open_clip model {name!r}; e.g. "
                      "ViT-B-16, or mmray-tiny for tests")
    return errors


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """An experiment config from YAML (defaults when path is None) plus `key=value` overrides."""
    return load_config(path, overrides, cls=ExperimentConfig)
