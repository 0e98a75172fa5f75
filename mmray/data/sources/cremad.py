"""CREMA-D (Cao et al., 2014): 7,442 clips of 91 actors speaking 12 sentences in 6 emotions.

Layout read, as in the official release plus the frames the OGM-GE and MLA reference code
(github.com/GeWu-Lab/OGM-GE_CVPR2022, github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation)
extracts from each video:

    <root>/AudioWAV/1001_DFA_ANG_XX.wav       actor _ sentence _ emotion _ intensity
    <root>/Image-01-FPS/1001_DFA_ANG_XX/      frame_00001.jpg, ... (data.cremad.frames_dir)
    <root>/train.csv, <root>/test.csv         optional: headerless rows `clip_name,emotion`

With the two CSV lists (OGM-GE's data/CREMAD/{train,test}.csv) they decide train and test;
without them a seeded split stratified by emotion holds out data.cremad.test of the clips. Either
way val is data.cremad.val of each emotion's train clips. Labels index ANG DIS FEA HAP NEU SAD in
that (alphabetical) order, which MLA's sorted class list also uses; OGM-GE orders them NEU HAP
SAD FEA DIS ANG, so its class indices differ from these but not its accuracy.
Modalities: `audio` (the WAV) and `visual` (data.frames frames of the clip's folder, stacked on
the channel axis). A missing WAV or frame folder is reported when featurized, so
data.skip_corrupt can skip it.
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

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
AUDIO_DIR = "AudioWAV"
LISTS = ("train.csv", "test.csv")


def clip_label(name: str) -> int | None:
    """Class index from a clip name like 1001_DFA_ANG_XX; None if the name is not of that form."""
    parts = name.split("_")
    if len(parts) != 4 or not parts[0].isdigit() or parts[2] not in EMOTIONS:
        return None
    return EMOTIONS.index(parts[2])


@dataclass
class CremadConfig:
    """CREMA-D (`mmray.data.sources.cremad`): official AudioWAV/ plus frames extracted per clip."""

    # Folder under data.root with one folder of JPG frames per clip, named like the clip;
    # Image-01-FPS (1 frame per second) is where the OGM-GE and MLA reference code reads them.
    frames_dir: str = "Image-01-FPS"
    # Fraction of each emotion's clips held out as test, used only when data.root has no
    # train.csv/test.csv lists (with them, the lists decide test).
    test: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Fraction of each emotion's train clips held out as val (the references have no val).
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of both hold-outs, which take the clips that rank first by a seeded hash of the name.
    seed: int = 0


class CremadSource(Source):
    name = "cremad"
    Config = CremadConfig

    def _lists(self, cfg: DataConfig) -> list[Path]:
        """The reference split lists, if data.root has them (both or neither)."""
        found = [self.root(cfg) / n for n in LISTS if (self.root(cfg) / n).is_file()]
        if len(found) == 1:
            missing = next(n for n in LISTS if n != found[0].name)
            raise FileNotFoundError(f"{found[0]} is there but {self.root(cfg) / missing} is not; "
                                    "give both split lists (rows `clip_name,emotion`) or neither")
        return found

    def _read_list(self, path: Path) -> list[tuple[str, int]]:
        clips: dict[str, tuple[int, int]] = {}  # clip -> (label, line)
        # utf-8-sig: the reference lists are read that way (a BOM must not join the first name).
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                line = f"{path} line {reader.line_num}"
                if not row:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{line}: expected 2 columns `clip_name,emotion` (no header), "
                                     f"got {row!r}")
                clip, emotion = row[0].strip(), row[1].strip()
                label = clip_label(clip)
                if label is None or emotion != EMOTIONS[label]:
                    raise ValueError(f"{line}: {clip!r},{emotion!r} is not a clip name like "
                                     f"1001_DFA_ANG_XX with its emotion, one of {', '.join(EMOTIONS)}")
                if clip in clips:
                    raise ValueError(f"{line}: clip {clip} is listed again (first on line "
                                     f"{clips[clip][1]}); every clip is listed once")
                clips[clip] = (label, reader.line_num)
        return [(clip, label) for clip, (label, _) in clips.items()]

    def _scan(self, cfg: DataConfig) -> list[tuple[str, int]]:
        audio = self.root(cfg) / AUDIO_DIR
        if not audio.is_dir():
            raise FileNotFoundError(f"no folder {audio}; data.root must be the CREMA-D folder "
                                    f"holding {AUDIO_DIR}/ (and {cfg.cremad.frames_dir}/)")
        clips = []
        for wav in sorted(audio.glob("*.wav")):
            label = clip_label(wav.stem)
            if label is None:
                raise ValueError(f"{wav}: not a CREMA-D clip name <actor>_<sentence>_<emotion>_"
                                 f"<intensity>.wav with emotion one of {', '.join(EMOTIONS)}")
            clips.append((wav.stem, label))
        return clips

    def items(self, cfg: DataConfig) -> list[Item]:
        c = cfg.cremad
        frames = self.root(cfg) / c.frames_dir
        if not frames.is_dir():  # one missing clip folder is a bad sample; all of them, a layout error
            raise FileNotFoundError(f"no folder {frames} of per-clip frame folders; extract the "
                                    "frames (1 fps JPGs) or set data.cremad.frames_dir")
        lists = self._lists(cfg)
        if lists:
            train, test = (self._read_list(p) for p in lists)
            test_names = {n for n, _ in test}
            both = sorted({n for n, _ in train} & test_names)
            if both:
                raise ValueError(f"{lists[0]} and {lists[1]} both list {both[:5]}; "
                                 "a clip belongs to one split")
            clips = sorted(train + test)
        else:
            clips = self._scan(cfg)
            test_names = holdout(clips, c.test, c.seed)
        val_names = holdout([(n, y) for n, y in clips if n not in test_names], c.val, c.seed)
        root = self.root(cfg)
        items = []
        for name, label in clips:
            split = "test" if name in test_names else "val" if name in val_names else "train"
            # Files are not checked here: a missing WAV or frame folder is reported by the
            # featurizer, so data.skip_corrupt treats it like an unreadable file.
            files = {"audio": str(root / AUDIO_DIR / f"{name}.wav"),
                     "visual": f"{root / c.frames_dir / name}/"}  # "/": a folder of frames
            items.append(Item(name, split, label, files))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        shapes = feature_shapes({"audio": "audio", "visual": "image"}, cfg, frame_folders={"visual"})
        return DatasetSpec(self.name, shapes, len(EMOTIONS), class_names=EMOTIONS)

    def index_files(self, cfg: DataConfig) -> list[Path]:
        return self._lists(cfg)
