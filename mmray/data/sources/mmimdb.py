"""MM-IMDB (Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR-W 2017) in its
published HDF5 layout, `multimodal_imdb.hdf5`: the file MultiBench and DynMM train on.

Layout, as written by the dataset's `make_dataset.py` (https://github.com/johnarevalo/gmu-mmimdb)
and read by MultiBench's `datasets/imdb/get_data.py`, one row per movie:

    features      (N, 300)           float32  mean word2vec embedding of the plot      -> "text"
    vgg_features  (N, 4096)          float32  VGG-16 features of the poster           -> "image"
    genres        (N, 23)            int32    multi-hot genres; attrs["target_names"] (JSON)
    images        (N, 3, 256, 160)   int32    the poster, resized and cropped (not read)
    imdb_ids, sequences, three_grams, word_grams                                       (not read)

The rows are already ordered train, dev, test; the standard split (MultiBench, DynMM) is rows
[0, 15552) train, [15552, 18160) val, [18160, 25959) test (the test split runs to the last row).
A smaller file (a subset, or a test fixture) keeps the same boundaries clipped to its N, so it
may have only a train split. Ids are
the row indices ("00000", ...), stable because the row order is the published one.

`data.root` is the folder holding `multimodal_imdb.hdf5`, or the file itself. The file is
validated on the driver with h5py before any Ray work: a missing dataset or a wrong shape raises
naming the file, the dataset and the expected shape. Rows are read by Ray Data tasks, each
opening the file by path and reading one range of rows (HDF5 handles cannot be pickled).

The input fingerprint is the file's name, size and modification time, not its SHA-256: hashing
the 9 GB file would take minutes on every run. Rewriting it in place with the same size and an
unchanged mtime would go unnoticed. Raw posters are not read: both modalities are the
precomputed features, as in DynMM and MultiBench's `vgg=True` loaders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmray.data.sources.source import Item, Source
from mmray.data.spec import DatasetSpec, ModalitySpec

if TYPE_CHECKING:
    from mmray.data.sources import DataConfig

FILE_NAME = "multimodal_imdb.hdf5"
# Exclusive row ends of the standard split (MultiBench `get_dataloader`, DynMM).
SPLIT_ENDS = (("train", 15552), ("val", 18160), ("test", None))  # None: to the last row (25959)
# HDF5 dataset -> (modality, shape of one row); genres is the label.
MODALITIES = {"features": ("text", (300,)), "vgg_features": ("image", (4096,))}
LABEL_KEY, NUM_GENRES = "genres", 23
# The 23 genres by decreasing frequency, the order of `genres` (its attrs["target_names"]).
GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
          "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
          "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir")


def split_ranges(n: int) -> list[tuple[str, int, int]]:
    """(split, start, end) of the standard split clipped to n rows; empty splits left out."""
    out, start = [], 0
    for split, end in SPLIT_ENDS:
        end = n if end is None else min(end, n)
        if end > start:
            out.append((split, start, end))
        start = max(start, end)
    return out


def _expected() -> dict[str, tuple[int, ...]]:
    return {**{k: shape for k, (_, shape) in MODALITIES.items()}, LABEL_KEY: (NUM_GENRES,)}


def validate_file(path: Path) -> int:
    """Check keys, shapes and dtypes with h5py; return the number of rows N."""
    import h5py

    layout = ", ".join(f"{k} (N, {', '.join(map(str, s))})" for k, s in _expected().items())
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e}); expected MM-IMDB's "
                         f"{FILE_NAME} with {layout}") from None
    with f:
        rows = {}
        for key, shape in _expected().items():
            want = "(N, " + ", ".join(map(str, shape)) + ")"
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise ValueError(f"{path}: no dataset {key!r} (expected shape {want}); found "
                                 f"{sorted(f.keys())}. MM-IMDB's layout: {layout}")
            ds = f[key]
            if ds.ndim != 1 + len(shape) or tuple(ds.shape[1:]) != shape:
                raise ValueError(f"{path}: dataset {key!r} has shape {tuple(ds.shape)}; "
                                 f"expected {want}")
            if ds.dtype.kind not in "fiub":
                raise ValueError(f"{path}: dataset {key!r} has dtype {ds.dtype}; expected numbers")
            rows[key] = ds.shape[0]
        if len(set(rows.values())) != 1:
            raise ValueError(f"{path}: datasets disagree on the number of rows: {rows}")
        return next(iter(rows.values()))


def read_ranges(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows [start, end) of each (path, split, start, end) in the batch."""
    import h5py

    cols: dict[str, list] = {"id": [], "split": [], "label": [], "error": [], "error_file": [],
                             **{m: [] for m, _ in MODALITIES.values()}}
    for path, split, start, end in zip(batch["path"], batch["split"], batch["start"], batch["end"]):
        start, end = int(start), int(end)
        with h5py.File(path, "r") as f:  # opened here: h5py handles do not cross processes
            for key, (m, _) in MODALITIES.items():
                cols[m].append(np.asarray(f[key][start:end], dtype=np.float32))
            cols["label"].append(np.asarray(f[LABEL_KEY][start:end], dtype=np.float32))
        n = end - start
        cols["id"].append(np.asarray([f"{i:05d}" for i in range(start, end)], dtype=object))
        cols["split"].append(np.full(n, split, dtype=object))
        cols["error"].append(np.full(n, "", dtype=object))  # a failed read raises instead
        cols["error_file"].append(np.full(n, "", dtype=object))
    return {k: np.concatenate(v) for k, v in cols.items()}


class MMIMDBSource(Source):
    name = "mmimdb"

    def path(self, cfg: DataConfig) -> Path:
        root = self.root(cfg)
        path = root if root.is_file() else root / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {FILE_NAME} at {root}: set data.root to the folder that "
                                    f"holds it (or to the file); it is published at "
                                    "https://archive.org/download/mmimdb/multimodal_imdb.hdf5")
        return path

    def items(self, cfg: DataConfig) -> list[Item]:
        import h5py

        path = self.path(cfg)
        n = validate_file(path)
        with h5py.File(path, "r") as f:
            genres = np.asarray(f[LABEL_KEY][:])
        bad = np.argwhere((genres != 0) & (genres != 1))
        if len(bad):
            raise ValueError(f"{path}: dataset {LABEL_KEY!r} must be multi-hot (0/1); row "
                             f"{bad[0][0]} holds {genres[tuple(bad[0])]}")
        labels = genres.astype(np.float32)
        return [Item(f"{i:05d}", split, labels[i].tolist())
                for split, start, end in split_ranges(n) for i in range(start, end)]

    def spec(self, cfg: DataConfig) -> DatasetSpec:
        import h5py

        with h5py.File(self.path(cfg), "r") as f:
            names = f[LABEL_KEY].attrs.get("target_names") if LABEL_KEY in f else None
        try:
            class_names = tuple(json.loads(names)) if names is not None else GENRES
        except (TypeError, ValueError):
            class_names = GENRES
        if len(class_names) != NUM_GENRES:
            class_names = GENRES
        mods = {m: ModalitySpec("vector", shape) for m, shape in MODALITIES.values()}
        return DatasetSpec(self.name, mods, NUM_GENRES, multilabel=True, class_names=class_names)

    def fingerprint(self, cfg: DataConfig) -> dict:
        """Name, size and mtime of the HDF5 file (hashing 9 GB would take minutes)."""
        stat = self.path(cfg).stat()
        return {"file": self.path(cfg).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def read_rows(self, cfg: DataConfig):
        """A Ray Dataset of the Featurizer's columns (id, split, label, text, image, error,
        error_file), row ranges read in parallel."""
        import ray

        path = self.path(cfg)
        n = validate_file(path)  # before any Ray work: a bad file fails here, naming the problem
        step = cfg.batch_rows
        ranges = [{"path": str(path), "split": split, "start": s, "end": min(s + step, end)}
                  for split, start, end in split_ranges(n) for s in range(start, end, step)]
        ds = ray.data.from_items(ranges, override_num_blocks=max(1, min(len(ranges), 4 * cfg.parallelism)))
        # Tasks, not actors; 0.5 CPU each so that reads never wait on a CPU held elsewhere.
        return ds.map_batches(read_ranges, batch_size=1, batch_format="numpy", num_cpus=0.5,
                              concurrency=cfg.parallelism)
