"""ESC-50 (Piczak, ACM MM 2015): 2,000 five-second clips of environmental sound in 50 classes,
arranged in 5 folds.

Layout read, as the official repository (github.com/karolpiczak/ESC-50) ships it:

    <root>/meta/esc50.csv     header `filename,fold,target,category,esc10,src_file,take`
    <root>/audio/<filename>   e.g. 1-100032-A-0.wav (44.1 kHz mono)

Columns used: filename, fold (1–5), target (the class index 0–49), category (the class name,
e.g. `dog`, `chirping_birds`) and src_file (the Freesound recording the clip was cut from).
Labels are `target`; `DatasetSpec.class_names[target]` is its category.

Splits: the fold `data.esc50.test_fold` is test (the benchmark reports the mean over the five
choices); the other four folds train. ESC-50 has no val split; mmray holds out
`data.esc50.val` of each class's source recordings (seeded) from the training folds and puts every
clip of a held-out recording in val. The folds keep clips of one recording together for the same
reason: fragments of one recording in train and val would make val optimistic.
Modality: `audio` (the WAV, resampled to data.audio.sample_rate and cropped from the start to
data.audio.seconds). A missing WAV is reported when featurized, so data.skip_corrupt can skip it.
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

CSV = Path("meta") / "esc50.csv"
AUDIO_DIR = "audio"
COLUMNS = ("filename", "fold", "target", "category", "src_file")
FOLDS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Clip:
    filename: str
    fold: int
    target: int
    category: str
    src_file: str


def _int(value: str) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


@dataclass
class Esc50Config:
    """ESC-50 (`mmray.data.sources.esc50`): meta/esc50.csv plus audio/*.wav in 5 folds."""

    # The fold held out as test (the benchmark reports the mean over the 5 choices).
    test_fold: int = field(default=5, metadata=bounds(1, 5))
    # Fraction of each class's source recordings (`src_file`) of the other folds held out as
    # val; every clip cut from a held-out recording goes to val, as the folds keep them together.
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of the hold-out (recordings ranked by a seeded hash of their name).
    seed: int = 0


class Esc50Source(Source):
    name = "esc50"
    Config = Esc50Config

    def _csv(self, cfg: DataConfig) -> Path:
        return self.root(cfg) / CSV

    def clips(self, cfg: DataConfig) -> list[Clip]:
        """Every row of meta/esc50.csv, checked: errors name the file, line and field."""
        path = self._csv(cfg)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}; data.root must be the ESC-50 folder holding "
                                    f"{CSV} and {AUDIO_DIR}/*.wav")
        clips: list[Clip] = []
        first: dict[str, int] = {}  # filename -> line
        names: dict[int, tuple[str, int]] = {}  # target -> (category, line)
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; expected the header "
                                 "filename,fold,target,category,esc10,src_file,take")
            for row in reader:
                line = f"{path} line {reader.line_num}"
                name, cat, src = (row[c] or "" for c in ("filename", "category", "src_file"))
                fold, target = _int(row["fold"] or ""), _int(row["target"] or "")
                if not name.lower().endswith(".wav") or "/" in name:
                    raise ValueError(f"{line}: filename {name!r} is not a WAV file name")
                if fold not in FOLDS:
                    raise ValueError(f"{line}: fold {row['fold']!r} is not one of {list(FOLDS)}")
                if target is None:
                    raise ValueError(f"{line}: target {row['target']!r} is not a class index")
                if not cat.strip() or not src.strip():
                    raise ValueError(f"{line}: category and src_file must not be empty")
                if name in first:
                    raise ValueError(f"{line}: {name} is listed again (first on line {first[name]})")
                known = names.setdefault(target, (cat, reader.line_num))
                if known[0] != cat:
                    raise ValueError(f"{line}: target {target} is {cat!r} here but {known[0]!r} "
                                     f"on line {known[1]}; a target names one category")
                first[name] = reader.line_num
                clips.append(Clip(name, fold, target, cat, src))
        absent = sorted(set(range(len(names))) - set(names))
        if absent:
            raise ValueError(f"{path}: targets must be 0..{len(names) - 1} with none missing; "
                             f"no clip has target(s) {absent[:10]}")
        return clips

    def class_names(self, clips: list[Clip]) -> tuple[str, ...]:
        by_target = {c.target: c.category for c in clips}
        return tuple(by_target[t] for t in range(len(by_target)))

    def items(self, cfg: DataConfig) -> list[Item]:
        c = cfg.esc50
        clips = self.clips(cfg)
        if not any(clip.fold == c.test_fold for clip in clips):
            raise ValueError(f"data.esc50.test_fold={c.test_fold}: no clip of {self._csv(cfg)} "
                             "is in that fold")
        train = [clip for clip in clips if clip.fold != c.test_fold]
        # Recordings (with their class) are held out, so their clips stay together.
        val_src = holdout(sorted({(clip.src_file, clip.target) for clip in train}), c.val, c.seed)
        audio = self.root(cfg) / AUDIO_DIR
        items = []
        for clip in clips:
            split = ("test" if clip.fold == c.test_fold else
                     "val" if clip.src_file in val_src else "train")
            # The WAV is not checked here: a missing one is reported by the featurizer, so
            # data.skip_corrupt treats it like an unreadable file.
            items.append(Item(Path(clip.filename).stem, split, clip.target,
                              files={"audio": str(audio / clip.filename)}))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        names = self.class_names(self.clips(cfg))
        return DatasetSpec(self.name, feature_shapes({"audio": "audio"}, cfg), len(names),
                           class_names=names)

    def index_files(self, cfg: DataConfig) -> list[Path]:
        return [self._csv(cfg)]
