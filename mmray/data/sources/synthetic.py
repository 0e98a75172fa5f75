"""A synthetic multimodal dataset: its config, the generator that writes it in a real raw layout
with controllable imbalance, and the source that reads it back.

Layout under `root`: `index.csv` (id, split, label), `audio/<id>.wav` (mono PCM-16),
`image/<id>.png` (RGB), `text/<id>.txt`, for 2 or 3 of those modalities, and `synthetic.json`
with the arguments that wrote it.

Signal model, per modality m with strength s_m: each class has a fixed pattern (audio: a chord of
class-specific frequencies; image: a smooth class-specific colour field; text: class-specific
words among filler words). A sample's modality shows its own class's pattern with probability
s_m and a uniformly random class's pattern otherwise, plus noise. The best unimodal accuracy is
therefore about s_m + (1 - s_m)/C: strength 0.9 makes a dominant modality, 0.4 a weak but
informative one, the imbalance OGM-GE and MLA address.

Difficulty k_m is how hard that pattern is to *learn*, apart from how often it is there: at k > 0
the pattern of class c is the superposition of k + 1 sub-patterns, one from each of k + 1 banks
of C patterns, with bank indices a_0 + ... + a_k = c (mod C) (a_1..a_k uniform). Each sub-pattern
alone is independent of the class and every class has the same mean input, so no function linear
in the input separates the classes; only the combination does (XOR-like, of order k + 1). The
modality is as informative as at k = 0 (same ceiling) but needs more updates to learn: a strong
modality that joint training can leave under-optimized while an easy one fits the training data
first (OGM-GE §3; Huang et al., "Modality Competition", ICML 2022).

Deterministic: each sample draws from its own `default_rng([seed, index])`, so the same arguments
write byte-identical files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import soundfile
from PIL import Image

from mmray.config import bounds
from mmray.data.sources.source import Item, Source, feature_shapes
from mmray.data.spec import DatasetSpec

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig

@dataclass
class SyntheticConfig:
    """The synthetic dataset `mmray.data.sources.synthetic` writes (used by the demo and the tests)."""

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
    # Per-modality difficulty k in 0..3 (absent = 0): the class pattern a sample shows is split
    # into k + 1 sub-patterns whose bank indices sum to the class mod C, all shown at once (image:
    # colour fields, audio: chords, both summed and scaled by 1/sqrt(k + 1) to keep the signal
    # power; text: the class words alternate between the k + 1 banks, word i from bank i mod
    # (k + 1)). Each sub-pattern alone says nothing about the class, so learning the modality
    # needs an interaction of order k + 1 (more SGD steps) while its ceiling stays s + (1 - s)/C.
    # 0 everywhere writes exactly what the generator wrote before this field existed.
    difficulty: dict[str, int] = field(default_factory=dict)
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
        for m, k in self.difficulty.items():
            if m not in known:
                errors.append(f"{path}.difficulty.{m}: not a modality; accepted: {', '.join(known)}")
            elif not 0 <= k <= MAX_DIFFICULTY:
                errors.append(f"{path}.difficulty.{m}: {k} is outside 0..{MAX_DIFFICULTY}")
        # Strengths of modalities not written are dropped: configs merge mappings, so an
        # included base's {audio: ...} must not leak into an image-text dataset's arguments.
        self.strength = {m: s for m, s in self.strength.items()
                         if m in self.modalities or m not in known}
        self.difficulty = {m: k for m, k in self.difficulty.items()
                           if m in self.modalities or m not in known}
        if len(self.splits) != 3 or any(f < 0 for f in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            errors.append(f"{path}.splits: {self.splits} must be 3 non-negative fractions "
                          "(train, val, test) summing to 1")


SPLITS = ("train", "val", "test")
_PATTERN_STREAM = 1_000_003  # rng stream for the class patterns, apart from the sample streams
_AUDIO_AMPLITUDE = 0.25
_CLASS_WORDS = 6
# Sub-pattern banks beyond the class patterns; the audio grid holds 4 banks of chords.
MAX_DIFFICULTY = 3


def _class_patterns(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Banks of sub-patterns, (1 + MAX_DIFFICULTY, C, ...) per modality; bank 0 holds the class
    patterns that difficulty 0 shows."""
    rng = np.random.default_rng([cfg.seed, _PATTERN_STREAM])
    nyquist = cfg.sample_rate / 2
    # Each chord: 3 frequencies of a grid below 0.8 Nyquist, each frequency in one chord only;
    # bank 0 (each class's chord) takes the first C * 3 of the permuted grid.
    grid = np.linspace(150.0, 0.8 * nyquist, (1 + MAX_DIFFICULTY) * cfg.num_classes * 3)
    chords = rng.permutation(grid).reshape(1 + MAX_DIFFICULTY, cfg.num_classes, 3)
    images = rng.uniform(-1.0, 1.0, size=(cfg.num_classes, 4, 4, 3))
    # Banks 1.. of the images are drawn after bank 0, so bank 0 is the same whatever they hold.
    more = rng.uniform(-1.0, 1.0, size=(MAX_DIFFICULTY, cfg.num_classes, 4, 4, 3))
    return {"audio": chords, "image": np.concatenate([images[None], more])}


def _parts(cls: int, k: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """Bank indices a_0..a_k of the sub-patterns showing class `cls`: a_1..a_k uniform,
    a_0 = cls − Σ a_j (mod C). At k = 0 just [cls], with no random draw."""
    if k == 0:
        return [cls]
    rest = rng.integers(num_classes, size=k)
    return [int((cls - rest.sum()) % num_classes), *map(int, rest)]


def _audio(freqs: np.ndarray, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """`freqs`: (parts, 3), one chord per sub-pattern, summed and scaled by 1/sqrt(parts)."""
    t = np.arange(int(round(cfg.sample_rate * cfg.audio_seconds))) / cfg.sample_rate
    phases = rng.uniform(0, 2 * np.pi, size=freqs.size)
    wave = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs.ravel(), phases)) / (
        3 * np.sqrt(len(freqs)))  # 3.0 exactly with one chord: the bytes of difficulty 0
    wave = _AUDIO_AMPLITUDE * (wave + cfg.noise * rng.standard_normal(len(t)))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _image(patterns: np.ndarray, cfg: SyntheticConfig, rng: np.random.Generator) -> Image.Image:
    """`patterns`: (parts, 4, 4, 3) colour fields, each smoothed, summed, scaled by 1/sqrt(parts)."""
    smooth = sum(np.asarray(Image.fromarray(((p + 1) * 127.5).astype(np.uint8)).resize(
        (cfg.image_size, cfg.image_size), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
        for p in patterns) / np.sqrt(len(patterns))
    noisy = smooth + cfg.noise * rng.standard_normal(smooth.shape)
    return Image.fromarray(np.clip(128 + 80 * noisy, 0, 255).astype(np.uint8), mode="RGB")


def _text(parts: list[int], cfg: SyntheticConfig, rng: np.random.Generator) -> str:
    # With noise 0 every word is a class word; noise n makes a word filler with prob n / (1 + n).
    # Word i, when a class word, comes from sub-pattern i mod parts (bank 0 has today's names).
    p_class = 1.0 / (1.0 + cfg.noise)
    names = [f"c{parts[0]}w", *(f"b{j}c{a}w" for j, a in enumerate(parts[1:], start=1))]
    words = [f"{names[i % len(parts)]}{rng.integers(_CLASS_WORDS)}" if rng.random() < p_class
             else f"f{rng.integers(cfg.vocab_words)}" for i in range(cfg.text_words)]
    return " ".join(words) + "\n"


def _splits(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, _PATTERN_STREAM + 1])
    labels = rng.permutation(np.arange(cfg.num_samples) % cfg.num_classes)
    cuts = np.cumsum([round(f * cfg.num_samples) for f in cfg.splits[:2]])
    split = np.full(cfg.num_samples, 2)
    split[: cuts[0]] = 0
    split[cuts[0]: cuts[1]] = 1
    return labels, split


def _write(cfg: SyntheticConfig, out: Path) -> None:
    patterns = _class_patterns(cfg)
    labels, split = _splits(cfg)
    for m in cfg.modalities:
        (out / m).mkdir()
    rows = []
    for i in range(cfg.num_samples):
        sid, y = f"s{i:05d}", int(labels[i])
        rows.append((sid, SPLITS[split[i]], y))
        rng = np.random.default_rng([cfg.seed, i])
        for m in cfg.modalities:  # fixed order keeps each sample's random stream reproducible
            shown = y if rng.random() < cfg.strength[m] else int(rng.integers(cfg.num_classes))
            parts = _parts(shown, cfg.difficulty.get(m, 0), cfg.num_classes, rng)
            if m == "text":
                (out / "text" / f"{sid}.txt").write_text(_text(parts, cfg, rng))
                continue
            bank_of = (np.arange(len(parts)), parts)  # sub-pattern j from bank j
            if m == "audio":
                soundfile.write(out / "audio" / f"{sid}.wav", _audio(patterns["audio"][bank_of], cfg, rng),
                                cfg.sample_rate, subtype="PCM_16")
            else:
                _image(patterns["image"][bank_of], cfg, rng).save(out / "image" / f"{sid}.png")
    with open(out / "index.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "split", "label"])
        w.writerows(rows)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable or half-written: not the same arguments
        return None


def generate(cfg: SyntheticConfig, root: str | Path, overwrite: bool = False) -> Path:
    """Write the dataset at `root` (atomically); a no-op if it is there with the same arguments."""
    root = Path(root).expanduser().resolve()
    args = asdict(cfg)
    if not any(cfg.difficulty.values()):  # as written before difficulty existed: same dataset
        del args["difficulty"]
    meta = json.dumps(args, sort_keys=True, indent=1)
    if (root / "synthetic.json").is_file():
        # Compared as values, so 1 and 1.0 (a YAML int for a float field) are the same argument.
        if _read_meta(root / "synthetic.json") == json.loads(meta):
            return root
        if not overwrite:
            raise FileExistsError(
                f"{root} holds a synthetic dataset written with other arguments "
                f"(see {root / 'synthetic.json'}); choose another data.root or delete it")
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} exists and is not a synthetic dataset; choose another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write(cfg, tmp)
        (tmp / "synthetic.json").write_text(meta)
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# -- reading it back ---------------------------------------------------------------------------

_SUFFIX = {"audio": ".wav", "image": ".png", "text": ".txt"}


class SyntheticSource(Source):
    name = "synthetic"
    Config = SyntheticConfig

    def modalities(self, cfg: DataConfig) -> list[str]:
        root = self.root(cfg)
        mods = [m for m in _SUFFIX if (root / m).is_dir()]
        if len(mods) < 2:
            raise FileNotFoundError(f"{root}: expected 2 or 3 of the folders audio/, image/, text/; "
                                    f"found {mods or 'none'}")
        return mods

    def items(self, cfg: DataConfig) -> list[Item]:
        root = self.root(cfg)
        index = root / "index.csv"
        if not index.is_file():
            raise FileNotFoundError(f"no index file {index}; write the dataset with "
                                    "`pipelines/preprocess.py --generate` or fix data.root")
        mods = self.modalities(cfg)
        items = []
        with open(index, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"id", "split", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{index}: missing column(s) {sorted(missing)}; "
                                 "expected id, split, label")
            seen: set[str] = set()
            for line, row in enumerate(reader, start=2):
                sid, split, label = row["id"] or "", row["split"], row["label"] or ""  # None: short row
                if not sid or sid in seen:
                    raise ValueError(f"{index} line {line}: id {sid!r} is empty or repeated; "
                                     "every sample needs its own id")
                if split not in ("train", "val", "test") or not label.isdigit():
                    raise ValueError(f"{index} line {line}: split must be train, val or test and "
                                     f"label a class index; got {split!r}, {label!r}")
                seen.add(sid)
                # Files are not checked here: a missing one is reported by the featurizer, with
                # the unreadable ones, so data.skip_corrupt treats both alike.
                files = {m: str(root / m / f"{sid}{_SUFFIX[m]}") for m in mods}
                items.append(Item(sid, split, int(label), files))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        root = self.root(cfg)
        meta_path = root / "synthetic.json"
        if meta_path.is_file():
            num_classes = json.loads(meta_path.read_text())["num_classes"]
        else:
            num_classes = 1 + max(int(i.label) for i in self.items(cfg))
        kinds = {m: m for m in self.modalities(cfg)}
        return DatasetSpec(self.name, feature_shapes(kinds, cfg), num_classes)

    def index_files(self, cfg: DataConfig) -> list[Path]:
        return [self.root(cfg) / "index.csv"]
