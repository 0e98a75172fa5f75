"""What a preprocessed dataset holds: modalities, their tensor shapes, and the label space.

A `DatasetSpec` is written into every shard manifest, so training reads the shapes from the data
it trains on instead of from a config that might disagree with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

ModalityKind = Literal["audio", "image", "text", "vector", "depth"]


@dataclass(frozen=True)
class ModalitySpec:
    kind: ModalityKind
    # Shape of one sample's tensor as stored in the shards, e.g. (1, frames, mels) for a
    # spectrogram, (3, H, W) for an image, (tokens,) for token ids, (dim,) for a feature vector,
    # (1, H, W) for a depth map (normalised disparity).
    shape: tuple[int, ...]
    # Token vocabulary size for kind == "text" (ids are in [0, vocab_size)); 0 otherwise.
    vocab_size: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modalities: dict[str, ModalitySpec]
    num_classes: int
    # Multi-label datasets (MM-IMDB's 23 genres) store a multi-hot label and train with BCE.
    multilabel: bool = False
    class_names: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = {
            m: {"kind": s.kind, "shape": list(s.shape), "vocab_size": s.vocab_size}
            for m, s in self.modalities.items()
        }
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        mods = {
            m: ModalitySpec(kind=s["kind"], shape=tuple(s["shape"]), vocab_size=s.get("vocab_size", 0))
            for m, s in d["modalities"].items()
        }
        return cls(
            name=d["name"],
            modalities=mods,
            num_classes=int(d["num_classes"]),
            multilabel=bool(d.get("multilabel", False)),
            class_names=tuple(d.get("class_names", ())),
        )
