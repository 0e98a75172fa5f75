"""A synthetic multimodal dataset written in a real raw layout, with controllable imbalance.

Layout under `root`: `index.csv` (id, split, label), `audio/<id>.wav` (mono PCM-16),
`image/<id>.png` (RGB), `text/<id>.txt`, for 2 or 3 of those modalities, and `synthetic.json`
with the arguments that wrote it.

Signal model, per modality m with strength s_m: each class has a fixed pattern (audio: a chord of
class-specific frequencies; image: a smooth class-specific colour field; text: class-specific
words among filler words). A sample's modality shows its own class's pattern with probability
s_m and a uniformly random class's pattern otherwise, plus noise. The best unimodal accuracy is
therefore about s_m + (1 - s_m)/C: strength 0.9 makes a dominant modality, 0.4 a weak but
informative one, the imbalance OGM-GE and MLA address.

Deterministic: each sample draws from its own `default_rng([seed, index])`, so the same arguments
write byte-identical files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from mmray.config import SyntheticConfig

SPLITS = ("train", "val", "test")
_PATTERN_STREAM = 1_000_003  # rng stream for the class patterns, apart from the sample streams
_AUDIO_AMPLITUDE = 0.25
_CLASS_WORDS = 6


def _class_patterns(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, _PATTERN_STREAM])
    nyquist = cfg.sample_rate / 2
    # Each class: 3 frequencies drawn without replacement from a grid below 0.8 Nyquist.
    grid = np.linspace(150.0, 0.8 * nyquist, 4 * cfg.num_classes * 3)
    freqs = rng.permutation(grid)[: cfg.num_classes * 3].reshape(cfg.num_classes, 3)
    images = rng.uniform(-1.0, 1.0, size=(cfg.num_classes, 4, 4, 3))
    return {"audio": freqs, "image": images}


def _audio(pattern_freqs: np.ndarray, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(round(cfg.sample_rate * cfg.audio_seconds))) / cfg.sample_rate
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wave = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(pattern_freqs, phases)) / 3
    wave = _AUDIO_AMPLITUDE * (wave + cfg.noise * rng.standard_normal(len(t)))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _image(pattern: np.ndarray, cfg: SyntheticConfig, rng: np.random.Generator) -> Image.Image:
    field = np.asarray(Image.fromarray(((pattern + 1) * 127.5).astype(np.uint8)).resize(
        (cfg.image_size, cfg.image_size), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    noisy = field + cfg.noise * rng.standard_normal(field.shape)
    return Image.fromarray(np.clip(128 + 80 * noisy, 0, 255).astype(np.uint8), mode="RGB")


def _text(cls: int, cfg: SyntheticConfig, rng: np.random.Generator) -> str:
    # With noise 0 every word is a class word; noise n makes a word filler with prob n / (1 + n).
    p_class = 1.0 / (1.0 + cfg.noise)
    words = [f"c{cls}w{rng.integers(_CLASS_WORDS)}" if rng.random() < p_class
             else f"f{rng.integers(cfg.vocab_words)}" for _ in range(cfg.text_words)]
    return " ".join(words) + "\n"


def _splits(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, _PATTERN_STREAM + 1])
    labels = rng.permutation(np.arange(cfg.num_samples) % cfg.num_classes)
    bounds = np.cumsum([round(f * cfg.num_samples) for f in cfg.splits[:2]])
    split = np.full(cfg.num_samples, 2)
    split[: bounds[0]] = 0
    split[bounds[0]: bounds[1]] = 1
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
            if m == "audio":
                soundfile.write(out / "audio" / f"{sid}.wav", _audio(patterns["audio"][shown], cfg, rng),
                                cfg.sample_rate, subtype="PCM_16")
            elif m == "image":
                _image(patterns["image"][shown], cfg, rng).save(out / "image" / f"{sid}.png")
            else:
                (out / "text" / f"{sid}.txt").write_text(_text(shown, cfg, rng))
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
    meta = json.dumps(asdict(cfg), sort_keys=True, indent=1)
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
