"""MM-IMDB (Arevalo et al., ICLR-W 2017) from its raw release: movie posters and plot text, 23
genres, multi-label. The missing-modality references (MAP, DCP, REP) read it this way; the
`mmimdb` source reads the precomputed-feature HDF5 file instead.

Layout read (the release archive `mmimdb.tar.gz`, https://archive.org/download/mmimdb):

    <root>/split.json               {"train": [id, ...], "dev": [...], "test": [...]}
    <root>/dataset/<id>.jpeg        the poster
    <root>/dataset/<id>.json        {"plot": [str, ...], "genres": [str, ...], ...}

The MAP reference's re-organised copy (`<root>/images/<id>.jpeg`, `<root>/labels/<id>.json`) is
read too. Splits: train, dev → val, test, as split.json lists them. Labels are multi-hot over the
23 genres of `mmimdb.GENRES` (other genres, e.g. News, are ignored, as in the references). Text:
the first plot, or all plots joined (data.mmimdb_raw.plots); the MAP reference makes one sample
per plot instead. Modalities: `image` (the poster) and `text` (inline). The JSON files are read
here, on the driver, so a missing or malformed one stops with its name; a missing poster is
reported when featurized, so data.skip_corrupt can skip it.

The data version hashes the ids, split, poster paths and sizes and the texts; a label edited in
a JSON file without touching the text or the split does not change it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mmray.data.sources.mmimdb import GENRES
from mmray.data.sources.source import Item, Source, feature_shapes
from mmray.data.spec import DatasetSpec

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig

SPLITS = {"train": "train", "dev": "val", "test": "test"}  # split.json key -> mmray split
# (folder of posters, folder of JSON files): the release's, then MAP's re-organised copy.
LAYOUTS = (("dataset", "dataset"), ("images", "labels"))


@dataclass
class MMIMDBRawConfig:
    """MM-IMDB from its raw release (`mmray.data.sources.mmimdb_raw`): posters and plots."""

    # A movie's text: its first plot (what CLIP's context mostly holds anyway), or all its plots
    # joined by spaces. The MAP reference makes one sample per plot instead.
    plots: Literal["first", "join"] = "first"


class MMIMDBRawSource(Source):
    name = "mmimdb_raw"
    Config = MMIMDBRawConfig

    def _split_file(self, cfg: DataConfig) -> Path:
        return self.root(cfg) / "split.json"

    def folders(self, cfg: DataConfig) -> tuple[Path, Path]:
        root = self.root(cfg)
        for images, labels in LAYOUTS:
            if (root / images).is_dir() and (root / labels).is_dir():
                return root / images, root / labels
        raise FileNotFoundError(f"{root}: no dataset/ folder (the MM-IMDB release: "
                                "dataset/<id>.jpeg + <id>.json) nor images/ + labels/ folders; "
                                "data.root must be the folder holding split.json and dataset/")

    def split_ids(self, cfg: DataConfig) -> dict[str, list[str]]:
        path = self._split_file(cfg)
        data = _read_json(path, "data.root must be the MM-IMDB folder holding split.json and dataset/")
        if not isinstance(data, dict) or not set(SPLITS) <= set(data):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path}: expected an object with lists {sorted(SPLITS)}; got {keys}")
        seen: dict[str, str] = {}
        out = {}
        for key in SPLITS:
            ids = data[key]
            if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
                raise ValueError(f"{path}: {key!r} must be a list of movie ids (strings)")
            for i in ids:
                if i in seen:
                    raise ValueError(f"{path}: id {i!r} is listed in {seen[i]!r} and again in "
                                     f"{key!r}; every movie belongs to one split")
                seen[i] = key
            out[key] = ids
        return out

    def _movie(self, path: Path) -> tuple[list[str], list[str]]:
        """(plots, genres) of one movie's JSON file."""
        meta = _read_json(path, "split.json lists the movie, so its JSON (plot and genres) "
                                "must be there")
        plots, genres = (meta.get("plot"), meta.get("genres")) if isinstance(meta, dict) else (0, 0)
        if not (isinstance(plots, list) and plots and all(isinstance(p, str) for p in plots)):
            raise ValueError(f"{path}: \"plot\" must be a non-empty list of strings; got {plots!r}")
        if not (isinstance(genres, list) and all(isinstance(g, str) for g in genres)):
            raise ValueError(f"{path}: \"genres\" must be a list of strings; got {genres!r}")
        return plots, genres

    def items(self, cfg: DataConfig) -> list[Item]:
        images, labels = self.folders(cfg)
        index = {g: k for k, g in enumerate(GENRES)}
        items = []
        for key, ids in self.split_ids(cfg).items():
            for sid in ids:
                plots, genres = self._movie(labels / f"{sid}.json")
                label = [0.0] * len(GENRES)
                for g in genres:
                    if g in index:
                        label[index[g]] = 1.0
                text = plots[0] if cfg.mmimdb_raw.plots == "first" else " ".join(plots)
                items.append(Item(sid, SPLITS[key], label, inline={"text": text},
                                  files={"image": str(images / f"{sid}.jpeg")}))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        shapes = feature_shapes({"image": "image", "text": "text"}, cfg)
        return DatasetSpec(self.name, shapes, len(GENRES), multilabel=True, class_names=GENRES)

    def index_files(self, cfg: DataConfig) -> list[Path]:
        return [self._split_file(cfg)]


def _read_json(path: Path, missing_hint: str):
    """A JSON file's content; a missing or unreadable file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}; {missing_hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
