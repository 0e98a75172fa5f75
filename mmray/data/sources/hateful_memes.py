"""Hateful Memes (Kiela et al., NeurIPS 2020): meme images and their overlaid text, labelled
hateful (1) or not (0); reported by AUROC.

Layout read (the challenge release, and the layout the MAP reference's DATA.md asks for):

    <root>/img/<id>.png
    <root>/train.jsonl, <root>/dev.jsonl, <root>/test.jsonl
        one JSON object a line: {"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}

Splits. train.jsonl is train. The dev file (data.hateful_memes.dev_file, dev.jsonl; the phase-2
release names the same 500 memes dev_seen.jsonl, and adds dev_unseen.jsonl) is val. The test
file (test_file) is test when it is labelled, e.g. phase 2's test_seen.jsonl. The original
test.jsonl has its labels withheld: then, as most published results on this dataset do, the dev
file becomes test, and val is `val` of train (stratified, seeded), so model selection never sees
the test split. test_file="" asks for that directly.

Ids are the "id" field; image paths are the "img" field, relative to the root. Text is inline.
Malformed lines (not JSON, missing fields, a label other than 0/1, an id listed twice) stop with
the file and line; a missing image is reported when featurized (data.skip_corrupt can skip it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmray.config import bounds
from mmray.data.sources.source import Item, Source, feature_shapes, holdout
from mmray.data.spec import DatasetSpec

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig

CLASS_NAMES = ("not_hateful", "hateful")

# (id, image path relative to the root, label or None, text, "<file> line <n>")
Row = tuple[str, str, int | None, str, str]


@dataclass
class HatefulMemesConfig:
    """Hateful Memes (`mmray.data.sources.hateful_memes`): img/ plus train/dev/test JSON lines."""

    # The labelled dev split, read as val (phase-2 downloads name it dev_seen.jsonl).
    dev_file: str = "dev.jsonl"
    # The test split: a labelled file is read as test. An unlabelled one (the original
    # test.jsonl, labels withheld), or "", makes the dev file the test split and holds out
    # `val` of train (stratified, seeded) as val instead.
    test_file: str = "test.jsonl"
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    seed: int = 0


class HatefulMemesSource(Source):
    name = "hateful_memes"
    Config = HatefulMemesConfig

    def _file(self, cfg: DataConfig, name: str) -> Path:
        return self.root(cfg) / name

    def _rows(self, path: Path, labelled: bool | None) -> list[Row]:
        """The lines of a JSON-lines file. labelled: True every line needs a label, None: the
        file decides (all lines or none)."""
        if not path.is_file():
            hint = (" (phase-2 releases name it dev_seen.jsonl: set "
                    "data.hateful_memes.dev_file=dev_seen.jsonl)" if path.name == "dev.jsonl" else "")
            raise FileNotFoundError(f"no file {path}; data.root must be the Hateful Memes folder "
                                    f"holding img/ and train/dev/test .jsonl files{hint}")
        rows: list[Row] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        for n, line in enumerate(lines, start=1):
            where = f"{path} line {n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or any(k not in obj for k in ("id", "img", "text")):
                raise ValueError(f"{where}: expected an object with \"id\", \"img\", \"text\" "
                                 f"(and \"label\" 0 or 1); got {line[:120]!r}")
            label = obj.get("label")
            if label is not None and (isinstance(label, bool) or label not in (0, 1)):
                raise ValueError(f"{where}: \"label\" must be 0 or 1; got {label!r}")
            if label is None and labelled:
                raise ValueError(f"{where}: no \"label\"; every line of {path.name} needs one")
            rows.append((str(obj["id"]), str(obj["img"]), label, str(obj["text"]), where))
        has = {r[2] is not None for r in rows}
        if labelled is None and len(has) > 1:
            raise ValueError(f"{path}: some lines have a \"label\" and some do not; a test file is "
                             "either labelled (it is the test split) or not (dev becomes test)")
        return rows

    def split_rows(self, cfg: DataConfig) -> dict[str, list[Row]]:
        """train / val / test rows, with the rule of the module docstring for the test split."""
        hm = cfg.hateful_memes
        train = self._rows(self._file(cfg, "train.jsonl"), labelled=True)
        dev = self._rows(self._file(cfg, hm.dev_file), labelled=True)
        test = self._rows(self._file(cfg, hm.test_file), labelled=None) if hm.test_file else []
        if test and test[0][2] is not None:
            return {"train": train, "val": dev, "test": test}
        held = holdout([(r[0], r[2]) for r in train], hm.val, hm.seed)
        return {"train": [r for r in train if r[0] not in held],
                "val": [r for r in train if r[0] in held], "test": dev}

    def items(self, cfg: DataConfig) -> list[Item]:
        root = self.root(cfg)
        first: dict[str, str] = {}
        items = []
        for split, rows in self.split_rows(cfg).items():
            for sid, img, label, text, where in rows:
                if sid in first:
                    raise ValueError(f"{where}: id {sid} is listed again (first at {first[sid]}); "
                                     "every meme belongs to one split")
                first[sid] = where
                # Images are not checked here: a missing one is reported by the featurizer.
                items.append(Item(sid, split, int(label), files={"image": str(root / img)},
                                  inline={"text": text}))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        shapes = feature_shapes({"image": "image", "text": "text"}, cfg)
        return DatasetSpec(self.name, shapes, len(CLASS_NAMES), class_names=CLASS_NAMES)

    def index_files(self, cfg: DataConfig) -> list[Path]:
        hm = cfg.hateful_memes
        return [self._file(cfg, f) for f in ("train.jsonl", hm.dev_file, hm.test_file) if f]
