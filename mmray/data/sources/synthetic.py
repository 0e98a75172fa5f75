"""The synthetic dataset of `mmray.data.synthetic`, read back from its raw layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mmray.config import DataConfig
from mmray.data.sources.base import Item, Source, feature_shapes
from mmray.data.spec import DatasetSpec

_SUFFIX = {"audio": ".wav", "image": ".png", "text": ".txt"}


class SyntheticSource(Source):
    name = "synthetic"

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
