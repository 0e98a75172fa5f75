"""Typed configuration: dataclass schemas, YAML loading with `include:`, `key=value` overrides.

Every problem in a config is gathered into one `ConfigError` that names each key path and what is
accepted, and it is raised before any work starts (no Ray, no data, no MLflow touched).

YAML files may carry `include: [other.yaml, ...]` in any mapping; included files are merged first
(paths relative to the including file), then the mapping's own keys on top.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import hashlib
import json
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """All problems found in one config, one per line, each naming its key path."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        where = f" in {source}" if source else ""
        super().__init__(f"invalid config{where}:\n  - " + "\n  - ".join(errors))


def bounds(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def path_field(default: str = "") -> Any:
    """A str field (or the str values of a dict field) naming a local file or folder. It is made
    absolute when the config is built, against the folder it is loaded from (`from_dict`'s
    `base_dir`, default the working folder): Ray trials and jobs run in other folders."""
    return field(default=default, metadata={"path": True})


# The folder relative paths are resolved against while a config is being built.
_BASE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("base_dir", default=None)


def _absolute(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    if not isinstance(value, str) or not value or "://" in value:
        return value
    return str(((_BASE_DIR.get() or Path.cwd()) / Path(value).expanduser()).resolve())


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The synthetic dataset `mmray.data.synthetic` writes (used by the demo and the tests)."""

    # Samples over all splits.
    num_samples: int = field(default=600, metadata=bounds(6))
    num_classes: int = field(default=4, metadata=bounds(2, 1000))
    # Which modalities to write, 2 or 3 of audio (WAV), image (PNG), text (TXT).
    modalities: list[Literal["audio", "image", "text"]] = field(
        default_factory=lambda: ["audio", "image"]
    )
    # Per-modality signal strength in [0, 1]: the fraction of samples whose modality carries its
    # own class's pattern (the rest carry a random class's pattern). 1 = clean, 0 = no signal.
    strength: dict[str, float] = field(default_factory=lambda: {"audio": 0.9, "image": 0.5})
    # Std of the additive noise relative to the pattern amplitude.
    noise: float = field(default=0.5, metadata=bounds(0.0, 10.0))
    # Fractions of train / val / test; must sum to 1.
    splits: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    sample_rate: int = field(default=8000, metadata=bounds(1000, 192000))
    audio_seconds: float = field(default=0.5, metadata=bounds(0.05, 60.0))
    image_size: int = field(default=32, metadata=bounds(8, 1024))
    text_words: int = field(default=12, metadata=bounds(1, 10000))
    vocab_words: int = field(default=200, metadata=bounds(10, 100000))
    seed: int = 0

    def validate(self, path: str, errors: list[str]) -> None:
        if not 2 <= len(self.modalities) <= 3 or len(set(self.modalities)) != len(self.modalities):
            errors.append(f"{path}.modalities: {self.modalities} must name 2 or 3 distinct "
                          "modalities of audio, image, text")
        for m in self.modalities:
            if m not in self.strength:
                errors.append(f"{path}.strength: no strength for modality {m!r}")
        known = ("audio", "image", "text")
        for m, s in self.strength.items():
            if m not in known:
                errors.append(f"{path}.strength.{m}: not a modality; accepted: {', '.join(known)}")
            elif not 0.0 <= s <= 1.0:
                errors.append(f"{path}.strength.{m}: {s} is outside [0, 1]")
        # Strengths of modalities not written are dropped: configs merge mappings, so an
        # included base's {audio: ...} must not leak into an image-text dataset's arguments.
        self.strength = {m: s for m, s in self.strength.items()
                         if m in self.modalities or m not in known}
        if len(self.splits) != 3 or any(f < 0 for f in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            errors.append(f"{path}.splits: {self.splits} must be 3 non-negative fractions "
                          "(train, val, test) summing to 1")


@dataclass
class AudioFeatures:
    # fbank: torchaudio Kaldi filterbank; logmel: log mel spectrogram; stft: log-magnitude STFT.
    kind: Literal["fbank", "logmel", "stft"] = "fbank"
    sample_rate: int = field(default=8000, metadata=bounds(1000, 192000))
    # Fixed-length crop (or zero pad) in seconds, taken from the start of the clip.
    seconds: float = field(default=0.5, metadata=bounds(0.05, 60.0))
    n_mels: int = field(default=32, metadata=bounds(4, 512))
    n_fft: int = field(default=256, metadata=bounds(16, 16384))
    hop_length: int = field(default=128, metadata=bounds(1, 16384))
    # Per-feature normalisation after the transform: (x - mean) / std.
    mean: float = 0.0
    std: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))


@dataclass
class ImageFeatures:
    size: int = field(default=32, metadata=bounds(8, 1024))
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class TextFeatures:
    # hash: a stable hash of each lower-cased word into [1, vocab_size), 0 pads (for the small
    # bag-of-embeddings encoder); open_clip: the BPE tokenizer of `open_clip_model`.
    tokenizer: Literal["hash", "open_clip"] = "hash"
    vocab_size: int = field(default=1024, metadata=bounds(8, 10_000_000))
    # Tokens per sample (the context length for open_clip).
    max_tokens: int = field(default=32, metadata=bounds(1, 4096))
    open_clip_model: str = "mmray-tiny"


@dataclass
class DepthFeatures:
    """Depth maps -> normalised disparity (`mmray.data.features.depth_features`).

    With d the depth in metres, clamped to [min_depth, max_depth], a pixel's value is
    (min_depth / d − mean) / std: disparity scaled to (0, 1] (1 at min_depth), then normalised.
    Pixels with no reading (stored 0) are 0 after normalisation.
    """

    # Output size (size × size); nearest-neighbour resize, so no-reading zeros never blend in.
    size: int = field(default=32, metadata=bounds(8, 1024))
    # The stored 16-bit values are the millimetres rotated left by this many bits, undone on
    # reading: 3 for SUN RGB-D's depth PNGs (its toolbox's read3dPoints.m), 0 for plain mm.
    rotate_bits: int = field(default=0, metadata=bounds(0, 15))
    # Depth range in metres: nearer readings count as min_depth, farther ones as max_depth
    # (the SUN RGB-D toolbox caps at 8 m).
    min_depth: float = field(default=0.5, metadata=bounds(0.0, None, lo_open=True))
    max_depth: float = field(default=10.0, metadata=bounds(0.0, None, lo_open=True))
    # Normalisation of the scaled disparity: (x - mean) / std.
    mean: float = 0.0
    std: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.min_depth >= self.max_depth:
            errors.append(f"{path}.min_depth: {self.min_depth} must be below max_depth "
                          f"({self.max_depth})")


@dataclass
class CremadConfig:
    """CREMA-D (`mmray.data.sources.cremad`): official AudioWAV/ plus frames extracted per clip."""

    # Folder under data.root with one folder of JPG frames per clip, named like the clip;
    # Image-01-FPS (1 frame per second) is where the OGM-GE and MLA reference code reads them.
    frames_dir: str = "Image-01-FPS"
    # Fraction of each emotion's clips held out as test, used only when data.root has no
    # train.csv/test.csv lists (with them, the lists decide test).
    test: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Fraction of each emotion's train clips held out as val (the references have no val).
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of both hold-outs, which take the clips that rank first by a seeded hash of the name.
    seed: int = 0


@dataclass
class Food101Config:
    """UPMC Food-101 (`mmray.data.sources.food101`): images/{train,test}/ plus texts/*_titles.csv."""

    # Fraction of each class of train_titles.csv held out as val (the official split has none).
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of the hold-out, which takes the images that rank first by a seeded hash of the name.
    seed: int = 0


@dataclass
class MMIMDBRawConfig:
    """MM-IMDB from its raw release (`mmray.data.sources.mmimdb_raw`): posters and plots."""

    # A movie's text: its first plot (what CLIP's context mostly holds anyway), or all its plots
    # joined by spaces. The MAP reference makes one sample per plot instead.
    plots: Literal["first", "join"] = "first"


@dataclass
class HatefulMemesConfig:
    """Hateful Memes (`mmray.data.sources.hateful_memes`): img/ plus train/dev/test JSON lines."""

    # The labelled dev split, read as val (phase-2 downloads name it dev_seen.jsonl).
    dev_file: str = "dev.jsonl"
    # The test split: a labelled file is read as test. An unlabelled one (the original
    # test.jsonl, labels withheld), or "", makes the dev file the test split and holds out
    # `val` of train (stratified, seeded) as val instead.
    test_file: str = "test.jsonl"
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    seed: int = 0


@dataclass
class Esc50Config:
    """ESC-50 (`mmray.data.sources.esc50`): meta/esc50.csv plus audio/*.wav in 5 folds."""

    # The fold held out as test (the benchmark reports the mean over the 5 choices).
    test_fold: int = field(default=5, metadata=bounds(1, 5))
    # Fraction of each class's source recordings (`src_file`) of the other folds held out as
    # val; every clip cut from a held-out recording goes to val, as the folds keep them together.
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of the hold-out (recordings ranked by a seeded hash of their name).
    seed: int = 0


@dataclass
class SunRGBDConfig:
    """SUN RGB-D style scenes (`mmray.data.sources.sunrgbd`): per-sample folders and split lists."""

    # Folder of each sample folder holding its depth PNG: depth (raw) or depth_bfx (filled).
    depth_dir: str = "depth"
    # Scene classes kept, in label order; samples of other scenes are left out. Empty: every
    # scene of train.txt, sorted (then a test scene outside them is an error).
    classes: list[str] = field(default_factory=list)
    # Fraction of each class of train.txt held out as val when data.root has no val.txt.
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of that hold-out (samples ranked by a seeded hash of their folder path).
    seed: int = 0


@dataclass
class MissingConfig:
    """Missing-modality simulation (METHODS.md §6): which samples miss which modality.

    A table per (split, rate, type, seed) is sampled once and stored beside the shards, so every
    method and every rerun sees the same pattern. A missing modality is filled (images with
    ones, text with the tokens of an empty string, other kinds with zeros), its `present` mask is
    False, and every method zeroes its features.
    """

    # η of the train split.
    train_rate: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # η of the val and test splits.
    test_rate: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # A modality name: that modality is missing in η of the samples. both / any: η of the
    # samples miss exactly one modality, spread evenly over the modalities (half image, half
    # text for an image-text pair: "both" in the MAP/REP papers); no sample misses all.
    type: str = "both"
    # Seed of the tables (the same seed gives the same table for every method).
    seed: int = 0
    # Robustness: after the last epoch the test split is also evaluated at each of these rates
    # for each type in eval_types (default: `type`), logged as test_miss_<type>_<rate>/<metric>.
    eval_rates: list[float] = field(default_factory=list)
    eval_types: list[str] = field(default_factory=list)

    def validate(self, path: str, errors: list[str]) -> None:
        for i, r in enumerate(self.eval_rates):
            if not 0.0 <= r <= 1.0:
                errors.append(f"{path}.eval_rates[{i}]: {r} is outside [0, 1]")
        for i, t in enumerate([self.type, *self.eval_types]):
            if not t or not t.replace("_", "").isalnum():
                where = f"{path}.type" if i == 0 else f"{path}.eval_types[{i - 1}]"
                errors.append(f"{where}: {t!r} must be both, any or a modality name")


@dataclass
class DataConfig:
    # Dataset source; one of mmray.data.sources.SOURCES.
    dataset: str = "synthetic"
    # Raw dataset folder, in the dataset's official layout.
    root: str = path_field("data/raw/synthetic")
    # Where versioned Parquet shards go: <data_dir>/<dataset>/<version>/<split>/.
    data_dir: str = path_field("data/shards")
    audio: AudioFeatures = field(default_factory=AudioFeatures)
    image: ImageFeatures = field(default_factory=ImageFeatures)
    text: TextFeatures = field(default_factory=TextFeatures)
    depth: DepthFeatures = field(default_factory=DepthFeatures)
    # Frames per sample for an image modality stored as a folder of frames (CREMA-D's visual):
    # evenly spaced, stacked on the channel axis into (3 * frames, size, size). Single-file
    # images (synthetic, Food-101) ignore it.
    frames: int = field(default=1, metadata=bounds(1, 3))
    # Skip unreadable input files (counted and named in the manifest) instead of failing.
    skip_corrupt: bool = False
    # Featurizer actors run in parallel by Ray Data, and rows per map_batches call.
    parallelism: int = field(default=2, metadata=bounds(1, 4096))
    batch_rows: int = field(default=64, metadata=bounds(1, 1_000_000))
    # Rows per Parquet file (the unit of streaming and of worker sharding).
    rows_per_file: int = field(default=256, metadata=bounds(1, 10_000_000))
    # Missing modalities (does not change the shards: tables are stored beside them).
    missing: MissingConfig = field(default_factory=MissingConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    cremad: CremadConfig = field(default_factory=CremadConfig)
    food101: Food101Config = field(default_factory=Food101Config)
    mmimdb_raw: MMIMDBRawConfig = field(default_factory=MMIMDBRawConfig)
    hateful_memes: HatefulMemesConfig = field(default_factory=HatefulMemesConfig)
    esc50: Esc50Config = field(default_factory=Esc50Config)
    sunrgbd: SunRGBDConfig = field(default_factory=SunRGBDConfig)

    def validate(self, path: str, errors: list[str]) -> None:
        from mmray.data.sources import SOURCES

        if self.dataset not in SOURCES:
            errors.append(f"{path}.dataset: unknown dataset {self.dataset!r}; known: {sorted(SOURCES)}")
        if len(self.image.mean) != 3 or len(self.image.std) != 3:
            errors.append(f"{path}.image.mean/std: need 3 values (RGB)")


@dataclass
class ModelConfig:
    # Audio and image encoders: "small" CNNs for CPU runs, or the timm model `timm_name`
    # (ResNet18 as in the OGM-GE/MLA reference setup); "open_clip": images through the image
    # tower of `open_clip_model` (audio has none).
    encoder: Literal["small", "timm", "open_clip"] = "small"
    timm_name: str = "resnet18"
    # Text encoder: a bag of token embeddings, or open_clip's text tower (open_clip tokens).
    text_encoder: Literal["bag", "open_clip"] = "bag"
    # An open_clip model config name (ViT-B-16, ...); "mmray-tiny" is a 2-layer one for tests.
    open_clip_model: str = "mmray-tiny"
    # Local weight files by modality (timm or open_clip state dicts); nothing is downloaded.
    weights: dict[str, str] = field(default_factory=dict, metadata={"path": True})
    # A local state dict of the whole open_clip model `open_clip_model` (both towers): what MAP
    # and REP load, and what open_clip encoders load when model.weights.<modality> is unset.
    clip_weights: str = path_field()
    # Freeze the pretrained timm / open_clip backbones: no gradients, always in eval mode, and
    # left out of checkpoints (rebuilt from their weights files). Projections and heads train.
    freeze_backbone: bool = False
    # false: timm / open_clip encoders output the backbone's own features (CLIP's embedding)
    # with no trainable projection to feature_dim; the classifier then sits right on them.
    project_features: bool = True
    # Width of every encoder's output feature h_m.
    feature_dim: int = field(default=64, metadata=bounds(1, 65536))
    # Base channel count of the small CNN encoders.
    width: int = field(default=16, metadata=bounds(1, 4096))
    dropout: float = field(default=0.0, metadata=bounds(0.0, 1.0))


@dataclass
class MethodConfig:
    # One of mmray.methods.METHODS.
    name: str = "normal"
    # Late fusion of the per-modality features: concat (W[h_a; h_v] + b) or sum (Σ W_m h_m + b).
    fusion: Literal["concat", "sum"] = "concat"
    # Method-specific options, checked against that method's Config dataclass.
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str, errors: list[str]) -> None:
        from mmray.methods import METHODS

        if self.name not in METHODS:
            errors.append(f"{path}.name: unknown method {self.name!r}; known: {sorted(METHODS)}")
            return
        opts_cls = METHODS[self.name].Config
        self.options = dataclasses.asdict(_convert(opts_cls, self.options, f"{path}.options", errors)
                                          or opts_cls())


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
    # Read each split into Ray's object store once per run (spilled to disk when larger than
    # memory) rather than re-reading Parquet every epoch: on small machines re-reading starves
    # the training loop (bench/overhead.py). false = stream from storage every epoch.
    cache_data: bool = True
    # Rows kept in each worker's local shuffle buffer (0 = file order).
    shuffle_buffer: int = field(default=256, metadata=bounds(0))
    # Ray Train workers for one run, and what each reserves.
    num_workers: int = field(default=1, metadata=bounds(1, 4096))
    cpus_per_worker: float = field(default=1.0, metadata=bounds(0.0, 1024.0, lo_open=True))
    # auto: CUDA when the worker sees a GPU, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast; applied only on CUDA.
    mixed_precision: bool = True
    # Worker-group restarts (from the last checkpoint) before the run fails.
    max_failures: int = field(default=2, metadata=bounds(0))
    checkpoints_to_keep: int = field(default=2, metadata=bounds(1))
    # How often Ray Train's controller collects a worker's report and checks its health, in
    # seconds. A report waits until the one before it is collected: with Ray's default (2 s),
    # epochs shorter than that wait for the poll, and so does the end of every run
    # (bench/sweep.py: the demo sweep took 151.5 s at 2 s, 99.8 s at 0.25 s).
    report_poll_s: float = field(default=0.25, metadata=bounds(0.0, 60.0, lo_open=True))


@dataclass
class TrackingConfig:
    # MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.
    uri: str = ""
    # Experiment name; empty: the ablation's name (or "mmray" for a single run).
    experiment: str = ""


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
        from mmray.methods import METHODS

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
        from mmray.encoders.pretrained import clip_input_sizes

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


@dataclass
class ParamRange:
    """A hyperparameter range Optuna searches."""

    type: Literal["float", "loguniform", "int", "categorical"] = "float"
    low: float = 0.0
    high: float = 1.0
    choices: list[Any] = field(default_factory=list)

    def validate(self, path: str, errors: list[str]) -> None:
        if self.type == "categorical":
            if not self.choices:
                errors.append(f"{path}.choices: a categorical range needs a non-empty list")
        elif not self.low < self.high:
            errors.append(f"{path}: low ({self.low}) must be below high ({self.high})")
        elif self.type == "loguniform" and self.low <= 0:
            errors.append(f"{path}.low: a loguniform range needs low > 0, got {self.low}")


@dataclass
class SearchConfig:
    # Experiment key paths (e.g. train.lr) and the ranges Optuna searches for each grid cell.
    space: dict[str, ParamRange] = field(default_factory=dict)
    # Optuna trials per grid cell (the same budget for every method).
    num_samples: int = field(default=1, metadata=bounds(1))
    # Metric that selects the best trial of a cell, and its direction.
    metric: str = "val/acc"
    mode: Literal["max", "min"] = "max"


@dataclass
class ResourcesConfig:
    # Trials run at once; 0 = as many as the cluster's CPUs/GPUs fit.
    max_concurrent_trials: int = field(default=0, metadata=bounds(0))


@dataclass
class ReportConfig:
    """The comparison report written at the end of a sweep (mmray/report/)."""

    # The baseline of the paired tests: one grid axis key and one of its values (a mapping
    # value by its label, e.g. {method: normal} for method: [{name: normal}, ...]). Empty: the
    # first value of the first non-seed axis.
    baseline: dict[str, Any] = field(default_factory=dict)
    # Test metrics tested and plotted; empty: search.metric with val/ replaced by test/.
    metrics: list[str] = field(default_factory=list)


def _check_baseline(baseline: dict[str, Any], grid: dict[str, list[Any]],
                    errors: list[str]) -> None:
    axes = [k for k in grid if k != "seed"]
    if len(baseline) > 1:
        errors.append(f"report.baseline: {baseline!r} must name one grid axis; accepted: {axes}")
    for key, value in baseline.items():
        if key not in axes:
            errors.append(f"report.baseline.{key}: not a non-seed grid axis; accepted: {axes}")
        elif not any(v == value or value_label(v) == value_label(value) for v in grid[key]):
            labels = [value_label(v) for v in grid[key]]
            errors.append(f"report.baseline.{key}: {value!r} is not a value of grid.{key}; "
                          f"accepted: {labels}")


@dataclass
class AblationConfig:
    """A grid of experiments: the base experiment, the axes, the search, where results go."""

    name: str = "ablation"
    description: str = ""
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    # Categorical axes: experiment key path -> values, e.g. method.name: [normal, ogm_ge]; a
    # mapping value is merged at its key, e.g. method: [{name: mla, options: {fusion_rule: fixed}}].
    # A value that names another method than the base's starts from that method's default
    # options (the base's method.options belong to the base's method).
    grid: dict[str, list[Any]] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Ray Tune / Train results and checkpoints (a local folder, or s3:// on a cluster).
    storage_path: str = "runs"
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self, path: str, errors: list[str]) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            errors.append(f"name: {self.name!r} must be non-empty, without spaces or slashes")
        base = to_dict(self.experiment)
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                errors.append(f"grid.{key}: needs a non-empty list of values")
                continue
            for v in values:  # every value of every axis must make a valid experiment
                try:
                    from_dict(ExperimentConfig, apply_grid_value(copy.deepcopy(base), key, v))
                except (ConfigError, KeyError) as e:
                    msg = e.errors if isinstance(e, ConfigError) else [str(e)]
                    errors.extend(f"grid.{key}={v!r}: {m}" for m in msg)
        for key in self.search.space:
            if key in self.grid:
                errors.append(f"search.space.{key}: also a grid axis; a key is one or the other")
            elif not _has_path(base, key):
                errors.append(f"search.space.{key}: not a key of the experiment config")
        _check_baseline(self.report.baseline, self.grid, errors)


# --------------------------------------------------------------------------------------------
# Conversion from plain data, gathering errors
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_range(value: Any, meta: Mapping, path: str, errors: list[str]) -> None:
    if "range" not in meta or not isinstance(value, int | float):
        return
    lo, hi, lo_open = meta["range"]
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        accepted = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        errors.append(f"{path}: {value!r} is out of range; accepted: {accepted}")


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{path or '<root>'}: expected a mapping, got {type(value).__name__}")
            return None
        hints = get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for key in value:
            if key not in fields:
                where = f"{path}.{key}" if path else str(key)
                errors.append(f"{where}: unknown key; known: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                continue
            sub = f"{path}.{name}" if path else name
            n_before = len(errors)
            converted = _convert(hints[name], value[name], sub, errors)
            if len(errors) == n_before:
                _check_range(converted, f.metadata, sub, errors)
                kwargs[name] = _absolute(converted) if f.metadata.get("path") else converted
        obj = tp(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate(path, errors)
        return obj
    if origin is Literal:
        if value not in get_args(tp):
            errors.append(f"{path}: {value!r} is not accepted; accepted: {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            trial: list[str] = []
            out = _convert(arg, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            errors.append(f"{path}: expected a list, got {value!r}")
            return value
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return value
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(val_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_dict(cls: type, data: Mapping, source: str | None = None,
              base_dir: str | Path | None = None):
    """Build and validate `cls` from plain data; raise one ConfigError listing every problem.
    Relative paths (`path_field`s) are resolved against `base_dir` (default: the working folder)."""
    errors: list[str] = []
    token = _BASE_DIR.set(Path(base_dir).resolve() if base_dir else None)
    try:
        obj = _convert(cls, data, "", errors)
    finally:
        _BASE_DIR.reset(token)
    if errors:
        raise ConfigError(errors, source)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# YAML, includes, overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _resolve_includes(node: Any, here: Path, seen: tuple[Path, ...]) -> Any:
    if not isinstance(node, Mapping):
        return node
    merged: dict = {}
    includes = node.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes:
        inc_path = (here / inc).resolve()
        if inc_path in seen:
            raise ConfigError([f"include: {inc_path} includes itself"], str(seen[-1]))
        if not inc_path.is_file():
            raise ConfigError([f"include: file {inc} not found (looked at {inc_path})"], str(seen[-1]))
        merged = _deep_merge(merged, read_yaml(inc_path, seen + (inc_path,)))
    own = {k: _resolve_includes(v, here, seen) for k, v in node.items() if k != "include"}
    return _deep_merge(merged, own)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping with its includes resolved."""
    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(data, Mapping):
        raise ConfigError(["the top level must be a mapping"], str(path))
    return _resolve_includes(data, path.parent, _seen or (path,))


def _has_path(d: Mapping, key: str) -> bool:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def set_path(d: dict, key: str, value: Any) -> dict:
    """Set a dotted key in nested dicts, creating mappings as needed; returns d."""
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return d


def merge_path(d: dict, key: str, value: Any) -> dict:
    """Like `set_path`, but a mapping value is merged into the mapping already there (so a grid
    value `{name: mla, options: {...}}` keeps the base's other method settings)."""
    parts = key.split(".")
    node: Any = d
    for part in parts:
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(value, Mapping) and isinstance(node, dict):
        value = _deep_merge(node, value)
    return set_path(d, key, value)


def apply_grid_value(exp: dict, key: str, value: Any) -> dict:
    """`merge_path` of one grid value into an experiment dict; a value that switches the method
    drops the base's method options first (they are options of the base's method)."""
    if key == "method" and isinstance(value, Mapping):
        name = value.get("name")
    else:
        name = value if key == "method.name" else None
    method = exp.get("method")
    if name is not None and isinstance(method, dict) and method.get("name") != name:
        method.pop("options", None)
    return merge_path(exp, key, value)


def value_label(value: Any) -> str:
    """A short label for a grid value: mappings become their leaf values joined by '+'."""
    if isinstance(value, Mapping):
        return "+".join(value_label(v) for v in value.values())
    return str(value)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` strings; values parse as YAML (numbers, bools, lists)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r}: expected key.path=value"])
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = ExperimentConfig):
    """Load a config of schema `cls` from YAML (or defaults when path is None) plus overrides."""
    data = read_yaml(path) if path else {}
    ablation_keys = {f.name for f in dataclasses.fields(AblationConfig)}
    for key, value in parse_overrides(list(overrides)):
        # An ablation's overrides name experiment keys directly (train.epochs=2) for convenience.
        if cls is AblationConfig and key.split(".")[0] not in ablation_keys:
            key = f"experiment.{key}"
        set_path(data, key, value)
    return from_dict(cls, data, str(path) if path else None)


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's content (for tags and trial identity)."""
    blob = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value} (lists kept as values), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
