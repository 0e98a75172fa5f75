"""The source interface: list a raw dataset's samples and describe what they become."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from mmray.config import DataConfig
    from mmray.data.spec import DatasetSpec


@dataclass
class Item:
    """One raw sample before featurization."""

    id: str
    split: str  # "train" | "val" | "test"
    label: int | list[float]
    # modality -> absolute path of its raw file (WAV, PNG/JPG, TXT, ...)
    files: dict[str, str] = field(default_factory=dict)
    # modality -> inline raw value (e.g. a caption from a CSV), for modalities with no file
    inline: dict[str, str] = field(default_factory=dict)


class Source:
    name: ClassVar[str]

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


def feature_shapes(kinds: dict[str, str], cfg: DataConfig) -> dict:
    """ModalitySpec per modality, with the exact shapes the featurizers produce under `cfg`."""
    import numpy as np
    from PIL import Image

    from mmray.data.features import audio_features, image_features
    from mmray.data.spec import ModalitySpec

    out = {}
    for m, kind in kinds.items():
        if kind == "audio":
            wave = np.zeros(int(round(cfg.audio.sample_rate * cfg.audio.seconds)), np.float32)
            out[m] = ModalitySpec("audio", audio_features(wave, cfg.audio).shape)
        elif kind == "image":
            out[m] = ModalitySpec("image", image_features(Image.new("RGB", (8, 8)), cfg.image).shape)
        elif kind == "text":
            vocab = 49408 if cfg.text.tokenizer == "open_clip" else cfg.text.vocab_size  # CLIP's BPE
            out[m] = ModalitySpec("text", (cfg.text.max_tokens,), vocab_size=vocab)
        else:
            raise ValueError(f"modality {m!r}: kind {kind!r} has no featurizer")
    return out
