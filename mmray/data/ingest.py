"""Training ingest: each epoch's rows in a seeded order, decoded and augmented, as batches.

Shared by Ray Train workers and the local loop (`mmray.train`), so both see the same batches:

- **Order.** Train: a permutation of all rows seeded by (seed, epoch) (`epoch_indices`); with W
  workers, worker r takes every W-th row of it, so the W local batches of a step together are
  the one global batch a single worker would take (the tail of n mod W rows is left out that
  epoch, a different tail each epoch). Val and test: the rows in file order, cut into W
  contiguous parts, every row exactly once.
- **Rows.** `TableRows`: the split as one Arrow table, in memory or, on Ray, in the object store
  shared by a node's workers (cached). `ParquetRows`: read from the shard files on demand, a row
  group at a time (streamed; memory bounded by the batches in flight). `choose_cache` picks by
  size.
- **Decode.** `Decoder` turns stored values into inputs (`mmray.data.codec`), augmenting train
  rows with a generator seeded by (seed, epoch, sample id): the same crops on resume, in any
  order, on any number of workers.
- **Overlap.** Batches are read and decoded by a pool of threads a few batches ahead of the
  training loop (Arrow, PIL and torch release the GIL while they work).
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mmray.data import codec
from mmray.data.features import AudioFeatures, ImageFeatures
from mmray.data.reader import collate, load_manifest, shard_files, spec_of
from mmray.data.spec import DatasetSpec

# A split is cached when it takes at most this fraction of the cluster's object store (a sweep
# runs several trials at once, each with its own copy).
CACHE_FRACTION = 1 / 8


def epoch_indices(n: int, split: str, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> np.ndarray:
    """The rows (indices into the split) this worker reads this epoch, in order."""
    if split != "train":
        return np.arange(rank * n // world, (rank + 1) * n // world)
    order = np.random.default_rng(seed * 1000 + epoch).permutation(n) if shuffle else np.arange(n)
    if world > 1:
        order = order[: n - n % world][rank::world]
    return order


def split_bytes(version_dir: str | Path, split: str) -> int:
    return sum(p.stat().st_size for p in shard_files(version_dir, split))


def choose_cache(mode: str, nbytes: int, object_store_bytes: float) -> bool:
    """train.ingest: cache or stream a split of `nbytes` (auto: cache up to CACHE_FRACTION of the
    object store)."""
    if mode != "auto":
        return mode == "cache"
    return nbytes <= CACHE_FRACTION * object_store_bytes


def read_table(version_dir: str | Path, split: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in shard_files(version_dir, split)])


class TableRows:
    """A whole split as one Arrow table (in memory, or mapped from Ray's object store)."""

    def __init__(self, table):
        self.table = table
        self.n = table.num_rows

    def take(self, idx: np.ndarray):
        import pyarrow as pa

        return self.table.take(pa.array(idx, type=pa.int64()))


class ParquetRows:
    """A split read from its shard files on demand: a row costs reading its row group (about
    64 KB, written by preprocessing), each thread keeps its own file handles."""

    def __init__(self, version_dir: str | Path, split: str):
        import pyarrow.parquet as pq

        self.files = [str(p) for p in shard_files(version_dir, split)]
        groups = []  # (file index, row group, rows)
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.groups = groups
        self.starts = np.cumsum([0] + [rows for _, _, rows in groups])
        self.n = int(self.starts[-1])
        self._local = threading.local()

    def _file(self, f: int):
        import pyarrow.parquet as pq

        handles = self._local.__dict__.setdefault("handles", {})
        if f not in handles:
            handles[f] = pq.ParquetFile(self.files[f])
        return handles[f]

    def take(self, idx: np.ndarray):
        import pyarrow as pa

        idx = np.asarray(idx, dtype=np.int64)
        group = np.searchsorted(self.starts, idx, side="right") - 1
        pieces, where = [], np.empty(len(idx), dtype=np.int64)
        offset = 0
        for g in np.unique(group):
            f, k, _ = self.groups[g]
            mine = np.flatnonzero(group == g)
            table = self._file(f).read_row_group(k)
            pieces.append(table.take(pa.array(idx[mine] - self.starts[g])))
            where[mine] = np.arange(offset, offset + len(mine))
            offset += len(mine)
        return pa.concat_tables(pieces).take(pa.array(where))


def encodings_of(manifest: dict) -> dict[str, dict]:
    """The manifest's per-modality encodings; shards written before encodings existed: raw."""
    spec = manifest["spec"]["modalities"]
    return manifest.get("params", {}).get("encodings") or {m: {"codec": "raw"} for m in spec}


def table_columns(table, spec: DatasetSpec, encs: dict[str, dict]) -> dict[str, np.ndarray]:
    """Arrow rows -> numpy columns: fixed-shape modalities as (n, *shape) arrays, encoded ones
    (jpeg, pcm16) as object arrays of bytes."""
    cols: dict[str, np.ndarray] = {"id": np.asarray(table.column("id").to_pylist(), dtype=object)}
    label = table.column("label").to_pylist()
    cols["label"] = np.asarray(label, dtype=np.float32 if spec.multilabel else np.int64)
    n = table.num_rows
    for m, ms in spec.modalities.items():
        dtype, shape = codec.stored_column(ms, encs[m])
        column = table.column(m)
        if dtype is None:
            cols[m] = np.asarray(column.to_pylist() + [None], dtype=object)[:n]
            continue
        flat = column.combine_chunks()
        # Ray writes fixed-shape tensors as an extension type over fixed-size lists.
        storage = flat.storage if hasattr(flat, "storage") else flat
        cols[m] = storage.flatten().to_numpy(zero_copy_only=False).reshape(n, *shape)
    for name in table.column_names:
        if name.startswith("present_"):
            cols[name] = np.asarray(table.column(name).to_pylist(), dtype=bool)
    return cols


class Decoder:
    """Stored columns -> model inputs, augmenting train rows (`codec.Augment`)."""

    def __init__(self, manifest: dict, augment: codec.Augment | None = None):
        self.spec = spec_of(manifest)
        self.encodings = encodings_of(manifest)
        params = manifest.get("params", {})
        # The feature parameters the shards were written with (the decode must match them).
        self.features = SimpleNamespace(image=ImageFeatures(**params.get("image", {})),
                                        audio=AudioFeatures(**params.get("audio", {})))
        self.augment = augment or codec.Augment()
        codec.check_augment(self.augment, self.spec.modalities, self.encodings,
                            f"the shards at version {manifest.get('version')}")

    def __call__(self, cols: dict[str, np.ndarray], train: bool = False, seed: int = 0,
                 epoch: int = 0) -> dict[str, np.ndarray]:
        out = dict(cols)
        per_sample = [m for m in self.spec.modalities if self.encodings[m]["codec"] in
                      ("jpeg", "uint8", "pcm16")]
        for m in self.spec.modalities:
            if self.encodings[m]["codec"] == "float16":
                out[m] = cols[m].astype(np.float32)
        if not per_sample:
            return out
        n = len(cols["id"])
        decoded = {m: np.empty((n, *self.spec.modalities[m].shape), dtype=np.float32) for m in per_sample}
        for i in range(n):
            rng = sample_rng(seed, epoch, cols["id"][i]) if train else None
            for m in per_sample:
                decoded[m][i] = codec.decode(cols[m][i], self.spec.modalities[m], self.encodings[m],
                                             self.features, self.augment, rng)
        out.update(decoded)
        return out


def sample_rng(seed: int, epoch: int, sample_id) -> np.random.Generator:
    """The generator a train sample's augmentation draws from: (seed, epoch, id) alone."""
    return np.random.default_rng([seed, epoch, zlib.crc32(str(sample_id).encode())])


def ordered_map(fn: Callable, items: list, threads: int, ahead: int) -> Iterator:
    """fn over items in a thread pool, in order, at most `ahead` results in flight."""
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="mmray-ingest")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class SplitReader:
    """One split of one run: batches for an epoch, in the batch contract (`reader.collate`)."""

    def __init__(self, rows, decoder: Decoder, split: str, *, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True, threads: int = 1):
        self.rows, self.decoder, self.split = rows, decoder, split
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle, self.threads = shuffle, threads

    def __len__(self) -> int:
        return len(epoch_indices(self.rows.n, self.split, 0, self.seed, self.rank, self.world))

    def columns(self, epoch: int, transform: Callable | None = None) -> Iterator:
        """This worker's decoded numpy batches for `epoch`; `transform` (e.g. a missing-modality
        table, then collate) runs on each in the pool too."""
        idx = epoch_indices(self.rows.n, self.split, epoch, self.seed, self.rank, self.world, self.shuffle)
        chunks = [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        train = self.split == "train"
        spec, encs = self.decoder.spec, self.decoder.encodings

        def load(chunk):
            cols = self.decoder(table_columns(self.rows.take(chunk), spec, encs), train, self.seed, epoch)
            return transform(cols) if transform is not None else cols

        return ordered_map(load, chunks, self.threads, ahead=2 * self.threads)

    def batches(self, epoch: int, transform: Callable | None = None,
                device: torch.device | None = None) -> Iterator[dict]:
        """Batches in the contract every method consumes, collated in the pool; moved to an
        accelerator `device` here."""
        spec = self.decoder.spec

        def finish(cols):
            return collate(transform(cols) if transform is not None else cols, spec)

        for batch in self.columns(epoch, finish):
            if device is not None and device.type != "cpu":
                batch = {**batch, "inputs": {m: x.to(device, non_blocking=True) for m, x in batch["inputs"].items()},
                         "present": {m: x.to(device) for m, x in batch["present"].items()},
                         "label": batch["label"].to(device)}
            yield batch


SPLITS = ("train", "val", "test")


def split_readers(cfg, version_dir: str | Path, manifest: dict, tables: dict, rank: int = 0,
                  world: int = 1) -> dict[str, SplitReader]:
    """A worker's reader of each split of the run `cfg` (an ExperimentConfig): from the Arrow
    table in `tables` (cached), else from the shard files (streamed)."""
    decoder = Decoder(manifest, cfg.data.augment)
    threads = cfg.train.ingest_threads or max(1, int(cfg.train.cpus_per_worker))
    readers = {}
    for s in SPLITS:
        if manifest["rows"].get(s):
            rows = TableRows(tables[s]) if s in tables else ParquetRows(version_dir, s)
            readers[s] = SplitReader(rows, decoder, s, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                     rank=rank, world=world, shuffle=cfg.train.shuffle, threads=threads)
    return readers


def batches_fn(version_dir: str | Path, manifest: dict, readers: dict[str, SplitReader],
               device: torch.device | None):
    """`fit`'s batches(split, epoch, missing spec): the split's reader, with the missing-modality
    table (sampled once, stored beside the shards) applied to each batch."""
    from mmray.data import missing

    tables: dict[tuple, missing.MissingTable] = {}

    def batches(split: str, epoch: int, miss: missing.MissingSpec | None):
        transform = None
        if miss is not None:
            if (split, miss) not in tables:
                tables[(split, miss)] = missing.load(version_dir, manifest, split, miss)
            transform = tables[(split, miss)].apply
        return readers[split].batches(epoch, transform, device)

    return batches


def read_split(version_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """A whole split decoded with the eval transform, as numpy columns in file order."""
    manifest = load_manifest(version_dir)
    decoder = Decoder(manifest)
    return decoder(table_columns(read_table(version_dir, split), decoder.spec, decoder.encodings))
