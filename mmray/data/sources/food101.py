"""UPMC Food-101 (Wang et al., ICME-W 2015): about 90k recipe-page images with the pages' titles,
in the 101 classes of Food-101.

Layout read, as the UPMC release (and its Kaggle mirror) ships it and the missing-modality
reference code expects it (github.com/YiLunLee/missing_aware_prompts, DATA.md):

    <root>/images/{train,test}/<class>/<class>_<n>.jpg
    <root>/texts/train_titles.csv, test_titles.csv    headerless rows `image name,text,class`

The CSVs are read as those references read them (pandas `read_csv(names=[...])`: no header,
standard CSV quoting). Labels index the train CSV's classes in alphabetical order. The official
split has no val: data.food101.val of each class's train rows is held out (seeded). Modalities:
`image` (the JPG) and `text` (the title, inline from the CSV). A missing image is reported when
featurized, so data.skip_corrupt can skip it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmray.config import bounds
from mmray.data.sources.source import Item, Source, feature_shapes, holdout
from mmray.data.spec import DatasetSpec

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Food101Config:
    """UPMC Food-101 (`mmray.data.sources.food101`): images/{train,test}/ plus texts/*_titles.csv."""

    # Fraction of each class of train_titles.csv held out as val (the official split has none).
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of the hold-out, which takes the images that rank first by a seeded hash of the name.
    seed: int = 0


class Food101Source(Source):
    name = "food101"
    Config = Food101Config

    def _csv(self, cfg: DataConfig, split: str) -> Path:
        return self.root(cfg) / "texts" / f"{split}_titles.csv"

    def _rows(self, cfg: DataConfig, split: str) -> list[tuple[str, str, str, str]]:
        """(image name, text, class, "<file> line <n>") per row of the split's CSV."""
        path = self._csv(cfg, split)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}; data.root must be the UPMC Food-101 folder "
                                    "holding images/{train,test}/<class>/ and texts/{train,test}_titles.csv")
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                for row in reader:
                    where = f"{path} line {reader.line_num}"
                    if not row:
                        continue
                    name, cls = (row[0].strip(), row[2].strip()) if len(row) == 3 else ("", "")
                    if not (name.lower().endswith(IMAGE_SUFFIXES) and cls):
                        raise ValueError(f"{where}: expected 3 columns `image name,text,class` (no "
                                         f"header) with a {'/'.join(IMAGE_SUFFIXES)} name and a "
                                         f"class; got {row!r}")
                    rows.append((name, row[1], cls, where))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        return rows

    def classes(self, cfg: DataConfig) -> list[str]:
        return sorted({cls for _, _, cls, _ in self._rows(cfg, "train")})

    def items(self, cfg: DataConfig) -> list[Item]:
        root = self.root(cfg)
        rows = {split: self._rows(cfg, split) for split in SPLITS}
        index = {c: k for k, c in enumerate(sorted({cls for _, _, cls, _ in rows["train"]}))}
        first: dict[str, str] = {}  # image id -> where it was listed
        for name, _, cls, where in rows["train"] + rows["test"]:
            sid = Path(name).stem
            if sid in first:
                raise ValueError(f"{where}: image {name} is listed again (first at {first[sid]}); "
                                 "every image is listed once")
            if cls not in index:
                raise ValueError(f"{where}: class {cls!r} is not a class of "
                                 f"{self._csv(cfg, 'train')}; the test classes must be train classes")
            first[sid] = where
        val = holdout([(Path(n).stem, index[c]) for n, _, c, _ in rows["train"]],
                      cfg.food101.val, cfg.food101.seed)
        items = []
        for split in SPLITS:
            for name, text, cls, _ in rows[split]:
                sid = Path(name).stem
                # Images are not checked here: a missing one is reported by the featurizer, so
                # data.skip_corrupt treats it like an unreadable file.
                items.append(Item(sid, "val" if sid in val else split, index[cls],
                                  files={"image": str(root / "images" / split / cls / name)},
                                  inline={"text": text}))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        classes = self.classes(cfg)
        shapes = feature_shapes({"image": "image", "text": "text"}, cfg)
        return DatasetSpec(self.name, shapes, len(classes), class_names=tuple(classes))

    def index_files(self, cfg: DataConfig) -> list[Path]:
        return [self._csv(cfg, split) for split in SPLITS]
