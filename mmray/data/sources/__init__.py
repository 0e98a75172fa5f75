"""Dataset sources, and the data config they make up.

Each source turns a raw dataset in its official layout into items to featurize, and owns its
options (`Source.Config`, a dataclass in the source's own file, read from `data.<source name>`).
The registry is an explicit dict filled by explicit imports; `get_source` fails on an unknown name.
Adding a source touches its file, one line here, a YAML and a test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmray.config import bounds, path_field
from mmray.data.codec import Augment
from mmray.data.features import AudioFeatures, DepthFeatures, ImageFeatures, TextFeatures
from mmray.data.missing import MissingConfig
from mmray.data.sources.cremad import CremadSource
from mmray.data.sources.esc50 import Esc50Source
from mmray.data.sources.food101 import Food101Source
from mmray.data.sources.hateful_memes import HatefulMemesSource
from mmray.data.sources.mmimdb import MMIMDBSource
from mmray.data.sources.mmimdb_raw import MMIMDBRawSource
from mmray.data.sources.source import Item, Source
from mmray.data.sources.sunrgbd import SunRGBDSource
from mmray.data.sources.synthetic import SyntheticSource

SOURCES: dict[str, type[Source]] = {
    SyntheticSource.name: SyntheticSource,
    CremadSource.name: CremadSource,
    Food101Source.name: Food101Source,
    MMIMDBSource.name: MMIMDBSource,
    MMIMDBRawSource.name: MMIMDBRawSource,
    HatefulMemesSource.name: HatefulMemesSource,
    Esc50Source.name: Esc50Source,
    SunRGBDSource.name: SunRGBDSource,
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]()
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}") from None


@dataclass
class DataSettings:
    """What every dataset shares; `DataConfig` adds one field per source with options."""

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
    # Train-time augmentation, applied when batches are read (not a shard parameter).
    augment: Augment = field(default_factory=Augment)
    # Frames per sample for an image modality stored as a folder of frames (CREMA-D's visual):
    # evenly spaced, stacked on the channel axis into (3 * frames, size, size). Single-file
    # images (synthetic, Food-101) ignore it.
    frames: int = field(default=1, metadata=bounds(1, 3))
    # Skip unreadable input files (counted and named in the manifest) instead of failing.
    skip_corrupt: bool = False
    # Featurizer actors run in parallel by Ray Data (0: one per CPU of the cluster; each runs
    # torch on one thread), and rows per map_batches call.
    parallelism: int = field(default=0, metadata=bounds(0, 4096))
    batch_rows: int = field(default=64, metadata=bounds(1, 1_000_000))
    # Rows per Parquet file (the unit of streaming and of worker sharding).
    rows_per_file: int = field(default=256, metadata=bounds(1, 10_000_000))
    # Ray Data's progress display while preprocessing: bars on a terminal, periodic progress
    # lines in a log (a job's output).
    progress: bool = True
    # Missing modalities (does not change the shards: tables are stored beside them).
    missing: MissingConfig = field(default_factory=MissingConfig)

    def validate(self, path: str, errors: list[str]) -> None:
        if self.dataset not in SOURCES:
            errors.append(f"{path}.dataset: unknown dataset {self.dataset!r}; known: {sorted(SOURCES)}")
        if len(self.image.mean) != 3 or len(self.image.std) != 3:
            errors.append(f"{path}.image.mean/std: need 3 values (RGB)")


# `data:` of a config: the shared settings plus `data.<name>` for each source with options
# (data.synthetic.num_samples, data.cremad.frames_dir, ...), built from the registry.
DataConfig = dataclasses.make_dataclass(
    "DataConfig",
    [(name, src.Config, field(default_factory=src.Config))
     for name, src in SOURCES.items() if src.Config is not None],
    bases=(DataSettings,),
    namespace={"__module__": __name__, "__doc__": "The data config: shared settings and one "
               "field of options per dataset source (`Source.Config`)."},
)

__all__ = ["SOURCES", "DataConfig", "Item", "Source", "get_source"]
