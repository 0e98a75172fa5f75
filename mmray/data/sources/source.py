"""The source interface: list a raw dataset's samples and describe what they become."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig
    from mmray.data.spec import DatasetSpec


@dataclass
class Item:
    """One raw sample before featurization."""

    id: str
    split: str  # "train" | "val" | "test"
    label: int | list[float]
    # modality -> absolute path of its raw file (WAV, PNG/JPG, TXT, ...); a path ending in "/"
    # names a folder of frames (image kinds), of which data.frames are featurized
    files: dict[str, str] = field(default_factory=dict)
    # modality -> inline raw value (e.g. a caption from a CSV), for modalities with no file
    inline: dict[str, str] = field(default_factory=dict)


class Source:
    name: ClassVar[str]
    # The source's options, a dataclass read from `data.<name>`; None: it takes none.
    Config: ClassVar[type | None] = None

    def items(self, cfg: DataConfig) -> list[Item]:
        """Every sample of every split, in a stable order; raise naming the file if the layout is wrong."""
        raise NotImplementedError

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        """Modalities with the shapes the featurizers produce under `cfg`, and the label space."""
        raise NotImplementedError

    def root(self, cfg: DataConfig) -> Path:
        return Path(cfg.root).expanduser().resolve()

    def index_files(self, cfg: DataConfig) -> list[Path]:
        """Files that list the samples (CSV, JSON lines, ...): hashed into the data version."""
        return []


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def frame_files(folder: str, n: int) -> list[Path]:
    """`n` frames of `folder` evenly spaced in name order: the first of each of n equal segments,
    as the MLA reference picks them (a folder with fewer than n frames repeats some)."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"no frame folder {folder}; expected a folder of JPG frames per sample")
    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise ValueError(f"frame folder {folder} holds no {'/'.join(FRAME_SUFFIXES)} frames")
    return [frames[k * len(frames) // n] for k in range(n)]


def holdout(keys: Iterable[tuple[str, int]], fraction: float, seed: int) -> set[str]:
    """Keys held out, stratified: of each label's n keys, the round(fraction * n) that rank first
    by a seeded hash of the key, so the choice does not depend on listing order or platform."""
    by_label: dict[int, list[str]] = {}
    for key, label in keys:
        by_label.setdefault(label, []).append(key)
    out: set[str] = set()
    for group in by_label.values():
        ranked = sorted(group, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
        out.update(ranked[: round(fraction * len(group))])
    return out


def feature_shapes(kinds: dict[str, str], cfg: DataConfig, frame_folders: Collection[str] = ()) -> dict:
    """ModalitySpec per modality, with the exact shapes the featurizers produce under `cfg`;
    image modalities in `frame_folders` stack data.frames frames: (3 * frames, size, size)."""
    import numpy as np
    from PIL import Image

    from mmray.data.features import audio_features, depth_features, image_features
    from mmray.data.spec import ModalitySpec

    out = {}
    for m, kind in kinds.items():
        if kind == "audio":
            wave = np.zeros(int(round(cfg.audio.sample_rate * cfg.audio.seconds)), np.float32)
            out[m] = ModalitySpec("audio", audio_features(wave, cfg.audio).shape)
        elif kind == "image":
            c, h, w = image_features(Image.new("RGB", (8, 8)), cfg.image).shape
            out[m] = ModalitySpec("image", (c * (cfg.frames if m in frame_folders else 1), h, w))
        elif kind == "depth":
            out[m] = ModalitySpec("depth", depth_features(np.zeros((8, 8), np.float32), cfg.depth).shape)
        elif kind == "text":
            vocab = 49408 if cfg.text.tokenizer == "open_clip" else cfg.text.vocab_size  # CLIP's BPE
            out[m] = ModalitySpec("text", (cfg.text.max_tokens,), vocab_size=vocab)
        else:
            raise ValueError(f"modality {m!r}: kind {kind!r} has no featurizer")
    return out
