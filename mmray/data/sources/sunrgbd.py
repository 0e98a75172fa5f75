"""SUN RGB-D (Song, Lichtenberg, Xiao, CVPR 2015) style RGB-D scene classification: an RGB
image, a 16-bit depth PNG and a scene label per sample. NYU-D, as re-released inside SUN RGB-D
(kv1/NYUdata/), reads the same way.

Layout read: SUN RGB-D's per-sample folders, plus split lists

    <root>/<sample>/image/<name>.jpg       the RGB image (the one JPG in image/)
    <root>/<sample>/depth/<name>.png       16-bit depth (the one PNG; data.sunrgbd.depth_dir)
    <root>/<sample>/scene.txt              the scene label, e.g. `bedroom`
    <root>/train.txt, <root>/test.txt      one sample folder per line, e.g. kv1/NYUdata/NYU0001
    <root>/val.txt                         optional

The official split ships as the toolbox's `traintestSUNRGBD/allsplit.mat` (alltrain / alltest,
absolute paths such as /n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/NYU0001); write those paths one per
line into train.txt and test.txt. A listed path containing `SUNRGBD/` is read from after its last
`SUNRGBD/`, so the toolbox's paths can be pasted as they are. SUN RGB-D stores depth in
millimetres rotated left by 3 bits: set data.depth.rotate_bits=3 (configs/datasets/sunrgbd.yaml).

Classes: data.sunrgbd.classes in that order (the 19-class benchmark of scenes with enough
samples; samples of other scenes are left out), or, when empty, every scene of train.txt sorted.
Without val.txt, data.sunrgbd.val of each class of train.txt is held out as val (seeded).
Modalities: `image` (RGB, data.image) and `depth` (normalised disparity, data.depth). A sample
folder whose image/ or depth folder holds no file is reported when featurized (the expected path
is named), so data.skip_corrupt can skip it; a missing folder or scene.txt is a layout error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmray.config import bounds
from mmray.data.sources.source import Item, Source, feature_shapes, holdout
from mmray.data.spec import DatasetSpec

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig

LISTS = ("train.txt", "test.txt")
VAL_LIST = "val.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PREFIX = "SUNRGBD/"


def _one_file(folder: Path, suffixes: tuple[str, ...], sample: Path) -> str:
    """The single file with one of `suffixes` in `folder`; if there is none, the path expected
    for it (named after the sample folder), so the featurizer reports exactly what is missing."""
    found = sorted(p for p in folder.glob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else []
    if len(found) > 1:
        raise ValueError(f"{folder} holds {len(found)} {'/'.join(suffixes)} files; expected one")
    return str(found[0] if found else folder / f"{sample.name}{suffixes[0]}")


@dataclass
class SunRGBDConfig:
    """SUN RGB-D style scenes (`mmray.data.sources.sunrgbd`): per-sample folders and split lists."""

    # Folder of each sample folder holding its depth PNG: depth (raw) or depth_bfx (filled).
    depth_dir: str = "depth"
    # Scene classes kept, in label order; samples of other scenes are left out. Empty: every
    # scene of train.txt, sorted (then a test scene outside them is an error).
    classes: list[str] = field(default_factory=list)
    # Fraction of each class of train.txt held out as val when data.root has no val.txt.
    val: float = field(default=0.1, metadata=bounds(0.0, 0.5))
    # Seed of that hold-out (samples ranked by a seeded hash of their folder path).
    seed: int = 0


class SunRGBDSource(Source):
    name = "sunrgbd"
    Config = SunRGBDConfig

    def _read_list(self, path: Path) -> list[tuple[str, str]]:
        """(sample folder relative to data.root, "<file> line <n>") per listed sample."""
        out: list[tuple[str, str]] = []
        first: dict[str, int] = {}
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            rel = line[line.rfind(PREFIX) + len(PREFIX):] if PREFIX in line else line
            rel = rel.strip("/")
            if not rel or ".." in Path(rel).parts:
                raise ValueError(f"{path} line {n}: {raw!r} is not a sample folder under data.root")
            if rel in first:
                raise ValueError(f"{path} line {n}: {rel} is listed again (first on line "
                                 f"{first[rel]}); every sample is listed once")
            first[rel] = n
            out.append((rel, f"{path} line {n}"))
        return out

    def _lists(self, cfg: DataConfig) -> dict[str, list[tuple[str, str]]]:
        root = self.root(cfg)
        lists = {}
        for split, name in (("train", LISTS[0]), ("test", LISTS[1]), ("val", VAL_LIST)):
            path = root / name
            if not path.is_file():
                if split == "val":
                    continue
                raise FileNotFoundError(f"no file {path}; data.root must hold the split lists "
                                        f"{', '.join(LISTS)} (one sample folder per line) beside "
                                        "the sample folders")
            lists[split] = self._read_list(path)
        seen: dict[str, str] = {}
        for rows in lists.values():
            for rel, where in rows:
                if rel in seen:
                    raise ValueError(f"{where}: {rel} is also listed in {seen[rel]}; a sample "
                                     "belongs to one split")
                seen[rel] = where
        return lists

    def _scene(self, cfg: DataConfig, rel: str, where: str) -> str:
        folder = self.root(cfg) / rel
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: no sample folder {folder}")
        path = folder / "scene.txt"
        try:
            scene = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: cannot read the scene label {path}: {e}") from None
        if not scene or any(c.isspace() for c in scene):
            raise ValueError(f"{path}: expected one scene name such as `bedroom`, got {scene!r}")
        return scene

    def _labelled(self, cfg: DataConfig):
        """({split: [(rel, scene)]} of the kept samples, the class list)."""
        lists = self._lists(cfg)
        scenes = {s: [(rel, self._scene(cfg, rel, where), where) for rel, where in rows]
                  for s, rows in lists.items()}
        classes = list(cfg.sunrgbd.classes) or sorted({sc for _, sc, _ in scenes["train"]})
        if len(set(classes)) != len(classes):
            raise ValueError(f"data.sunrgbd.classes: {classes} names a class twice")
        kept = {}
        for split, rows in scenes.items():
            if not cfg.sunrgbd.classes:
                for _, sc, where in rows:
                    if sc not in classes:
                        raise ValueError(f"{where}: scene {sc!r} is not a scene of train.txt; "
                                         "list the classes to keep in data.sunrgbd.classes")
            kept[split] = [(rel, sc) for rel, sc, _ in rows if sc in classes]
        return kept, classes

    def items(self, cfg: DataConfig) -> list[Item]:
        kept, classes = self._labelled(cfg)
        index = {c: k for k, c in enumerate(classes)}
        val = ({rel for rel, _ in kept["val"]} if "val" in kept else
               holdout([(rel, index[sc]) for rel, sc in kept["train"]], cfg.sunrgbd.val,
                       cfg.sunrgbd.seed))
        root = self.root(cfg)
        items = []
        for split in ("train", "val", "test"):
            for rel, sc in kept.get(split, []):
                folder = root / rel
                files = {"image": _one_file(folder / "image", IMAGE_SUFFIXES, folder),
                         "depth": _one_file(folder / cfg.sunrgbd.depth_dir, (".png",), folder)}
                name = "val" if split == "train" and rel in val else split
                items.append(Item(rel.replace("/", "__"), name, index[sc], files))
        return items

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        _, classes = self._labelled(cfg)
        shapes = feature_shapes({"image": "image", "depth": "depth"}, cfg)
        return DatasetSpec(self.name, shapes, len(classes), class_names=tuple(classes))

    def index_files(self, cfg: DataConfig) -> list[Path]:
        root = self.root(cfg)
        return [root / n for n in (*LISTS, VAL_LIST) if (root / n).is_file()]
