"""Dataset sources: each turns a raw dataset in its official layout into items to featurize.

An explicit registry filled by explicit imports; `get_source` fails on an unknown name.
"""

from __future__ import annotations

from mmray.data.sources.base import Item, Source
from mmray.data.sources.cremad import CremadSource
from mmray.data.sources.esc50 import Esc50Source
from mmray.data.sources.food101 import Food101Source
from mmray.data.sources.hateful_memes import HatefulMemesSource
from mmray.data.sources.mmimdb import MMIMDBSource
from mmray.data.sources.mmimdb_raw import MMIMDBRawSource
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


__all__ = ["SOURCES", "Item", "Source", "get_source"]
