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
