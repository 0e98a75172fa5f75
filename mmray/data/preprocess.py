"""Ray Data preprocessing: raw dataset -> versioned Parquet shards per split + manifest.json.

    <data_dir>/<dataset>/<version>/{train,val,test}/*.parquet
    <data_dir>/<dataset>/<version>/manifest.json

A source normally lists items whose files the `Featurizer` decodes; a source stored as arrays
(MM-IMDB's HDF5 file) instead implements `read_rows(cfg)`, returning a Ray Dataset of finished
rows, and may implement `fingerprint(cfg)` when its inputs are too large to hash.

The version is a hash of the source, every preprocessing parameter and a fingerprint of the
inputs (each file's relative path and size, the index files' SHA-256), so the same inputs and
parameters are a cache hit and anything else is a new version beside the old one. Shards are
written into a temporary sibling folder that is renamed into place only when complete: a failed
or interrupted run leaves nothing that looks like a version. Shard files are renamed
`part-00000.parquet`, ... in the order Ray wrote them, so names sort in row order and the same
inputs give the same file names (and bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mmray.data import codec
from mmray.data.sources import DataConfig, Item, get_source
from mmray.data.spec import DatasetSpec

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    version_dir: Path
    manifest: dict
    cache_hit: bool


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _params(cfg: DataConfig, spec: DatasetSpec) -> dict:
    """Every parameter that changes what the shards hold."""
    kinds = {m: s.kind for m, s in spec.modalities.items()}
    used = {k: asdict(getattr(cfg, k)) for k in ("audio", "image", "text", "depth")
            if k in kinds.values()}
    if "image" in kinds.values():
        used["frames"] = cfg.frames  # frames stacked per folder-of-frames image modality
    # rows_per_file changes the files, not the rows; the encodings are in `used` (the
    # feature configs) and resolved here (image.encoding=auto by size).
    return {"modalities": kinds, **used, "skip_corrupt": cfg.skip_corrupt,
            "rows_per_file": cfg.rows_per_file,
            "encodings": codec.encodings(spec.modalities, cfg)}


def _fingerprint(source, cfg: DataConfig, items: list[Item]) -> dict:
    if hasattr(source, "fingerprint"):  # inputs too large to hash (MM-IMDB's 9 GB HDF5 file)
        return source.fingerprint(cfg)
    root = source.root(cfg)
    h = hashlib.sha256()
    for item in items:
        # A seeded split is decided by the source; a label may come from a file not hashed below
        # (SUN RGB-D's scene.txt).
        h.update(f"{item.id}\0{item.split}\0{item.label}\n".encode())
        for path in sorted(item.files.values()):
            p = Path(path)
            # A folder of frames: the frames in it are the input, not the folder entry.
            for f in sorted(p.iterdir()) if p.is_dir() else [p]:
                size = f.stat().st_size if f.exists() else -1
                h.update(f"{os.path.relpath(f, root)}\0{size}\n".encode())
        for m, text in sorted(item.inline.items()):
            h.update(f"{item.id}\0{m}\0{text}\n".encode())
    return {"files": h.hexdigest(), "index": {str(p.relative_to(root)): _sha256(p)
                                               for p in source.index_files(cfg)}}


def _version(source_name: str, root: Path, params: dict, fingerprint: dict) -> str:
    blob = json.dumps({"source": source_name, "root": str(root), "params": params,
                       "fingerprint": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def valid_manifest(version_dir: Path) -> dict | None:
    try:
        manifest = json.loads((version_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == version_dir.name else None


class Featurizer:
    """A Ray Data actor: decodes and featurizes a batch of raw items; errors become rows."""

    def __init__(self, spec: dict, cfg: dict):
        import torch

        from mmray.config import from_dict

        torch.set_num_threads(1)  # one core per actor; parallelism comes from the actor pool
        self.spec = DatasetSpec.from_dict(spec)
        self.cfg = from_dict(DataConfig, cfg)
        self.encodings = codec.encodings(self.spec.modalities, self.cfg)

    def _image(self, path: str, codec_name: str):
        from mmray.data import features as F

        if path.endswith("/"):  # a folder of frames, stacked on channels
            from mmray.data.sources.source import frame_files

            files = frame_files(path, self.cfg.frames)
        else:
            files = [path]
        if codec_name == "jpeg":
            return codec.pack([codec.encode_jpeg(f, self.cfg.image) for f in files])
        if codec_name == "uint8":
            return np.concatenate([codec.encode_uint8(F.load_image(f), self.cfg.image) for f in files])
        return np.concatenate([F.image_features(F.load_image(f), self.cfg.image) for f in files])

    def _one(self, m: str, path: str, inline: str):
        from mmray.data import features as F

        kind, enc = self.spec.modalities[m].kind, self.encodings[m]["codec"]
        if kind == "audio":
            a = self.cfg.audio
            if enc == "pcm16":  # unpadded: a short clip stores only what it has
                wave = F.load_audio(path, a.sample_rate, a.store_seconds or a.seconds, pad=False)
                return codec.encode_pcm16(wave)
            feats = F.audio_features(F.load_audio(path, a.sample_rate, a.seconds), a)
            return feats.astype(np.float16) if enc == "float16" else feats
        if kind == "image":
            return self._image(path, enc)
        if kind == "depth":
            return F.depth_features(F.load_depth(path, self.cfg.depth.rotate_bits), self.cfg.depth)
        return F.tokenize(inline if not path else F.read_text(path), self.cfg.text)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = {k: batch[k] for k in ("id", "split", "label")}
        errors, error_files = [""] * n, [""] * n
        for m, ms in self.spec.modalities.items():
            dtype, shape = codec.stored_column(ms, self.encodings[m])
            col = np.full(n, b"", dtype=object) if dtype is None else np.zeros((n, *shape), dtype=dtype)
            for i in range(n):
                path = batch[f"file_{m}"][i]
                try:
                    col[i] = self._one(m, path, batch[f"inline_{m}"][i])
                except Exception as e:  # one bad file must not abort the batch; reported below
                    if not errors[i]:  # the first bad file of a sample is the one reported
                        msg = str(e)
                        where = path or f"{batch['id'][i]}/{m}"  # inline values have no file
                        errors[i] = msg if where in msg else f"{where}: {msg}"
                        error_files[i] = where
            out[m] = col
        out["error"] = np.asarray(errors, dtype=object)
        out["error_file"] = np.asarray(error_files, dtype=object)
        return out


def _rows(items: list[Item], spec: DatasetSpec) -> list[dict]:
    rows = []
    for it in items:
        row = {"id": it.id, "split": it.split,
               "label": np.asarray(it.label, np.float32) if spec.multilabel else int(it.label)}
        for m in spec.modalities:
            row[f"file_{m}"] = it.files.get(m, "")
            row[f"inline_{m}"] = it.inline.get(m, "")
        rows.append(row)
    return rows


def _featurize(source, items: list[Item], spec: DatasetSpec, cfg: DataConfig):
    import ray

    from mmray.ray_utils import init_ray

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same row order in the shards
    ctx.enable_progress_bars = cfg.progress
    if not cfg.parallelism:  # one featurizer per CPU
        cfg = dataclasses.replace(cfg, parallelism=max(1, int(ray.cluster_resources().get("CPU", 1))))
    if hasattr(source, "read_rows"):
        # Sources stored as arrays (MM-IMDB's HDF5) read their own rows, already featurized:
        # the Featurizer's columns (id, split, label, one per modality, error, error_file).
        return source.read_rows(cfg).materialize()
    n_blocks = max(cfg.parallelism, -(-len(items) // cfg.batch_rows))
    ds = ray.data.from_items(_rows(items, spec), override_num_blocks=n_blocks)
    # 0.5 CPU per actor: actors x CPUs must stay below the machine's CPUs or the tasks that feed
    # them never get scheduled (a deadlock seen on 2 cores).
    return ds.map_batches(Featurizer, fn_constructor_kwargs={"spec": spec.to_dict(), "cfg": asdict(cfg)},
                          concurrency=cfg.parallelism, num_cpus=0.5, batch_size=cfg.batch_rows,
                          batch_format="numpy").materialize()


def _shard_names():
    """Names `<write uuid>_<task>-{i}.parquet`, parsed back by `_rename_shards`.

    Ray's default names end in pyarrow's unpadded file counter `{i}` (so `-10` sorts before `-2`)
    and may change between releases; here the format is ours. Defined inside a function so that
    importing this module does not import Ray Data (cloudpickle ships the class by value).
    """
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{write_uuid}_{task_index:06d}-{{i}}.parquet"

    return ShardNames(file_format="parquet")


_SHARD_NAME = re.compile(r"_(\d+)-(\d+)\.parquet$")


def _rename_shards(folder: Path) -> None:
    """Name the files `part-00000.parquet`, ... in the order Ray wrote them (task, then file)."""
    files = []
    for p in folder.glob("*.parquet"):
        match = _SHARD_NAME.search(p.name)
        if not match:
            raise RuntimeError(f"{p}: expected a shard named <write uuid>_<task>-<i>.parquet "
                               "(see _shard_names); cannot tell the shards' row order")
        files.append(((int(match[1]), int(match[2])), p))
    width = max(5, len(str(len(files) - 1)))  # one width per split, so names sort as numbers
    for k, (_, p) in enumerate(sorted(files)):
        p.rename(folder / f"part-{k:0{width}d}.parquet")


# Rows per Parquet row group are chosen for about this many bytes: a streamed epoch reads a
# whole row group to fetch one row in a random order. Reading costs about 0.3 ms per row read
# (48 KB rows: 0.33 ms for a group of 1, 1.34 ms for a group of 5), so large rows get a group
# each and small ones share (a group of 20 for the synthetic 3 KB rows).
ROW_GROUP_BYTES = 64 * 1024


def _regroup(folder: Path) -> None:
    """Rewrite each shard with row groups of about ROW_GROUP_BYTES (Ray writes one per file)."""
    import pyarrow.parquet as pq

    for p in sorted(folder.glob("*.parquet")):
        table = pq.read_table(p)
        if not table.num_rows:
            continue
        rows = max(1, min(table.num_rows, ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes)))
        tmp = p.with_suffix(".regroup")
        pq.write_table(table, tmp, row_group_size=rows)
        os.replace(tmp, p)


def _write_split(ds, split: str, folder: Path, cfg: DataConfig) -> None:
    from ray.data.expressions import col

    # An Arrow-native filter keeps the tensor columns' type even for blocks left empty (a numpy
    # batch function there makes Ray fall back to pickled objects for that block).
    rows = ds.filter(expr=(col("split") == split) & (col("error") == "")).drop_columns(
        ["split", "error", "error_file"])
    # min bundles small blocks into one write task; max cuts a task's rows into files.
    rows.write_parquet(str(folder / split), min_rows_per_file=cfg.rows_per_file,
                       max_rows_per_file=cfg.rows_per_file, filename_provider=_shard_names())
    _rename_shards(folder / split)
    _regroup(folder / split)


def preprocess(cfg: DataConfig, *, force: bool = False) -> Prepared:
    """Featurize the dataset into shards (or find them cached); raise naming every bad file."""
    import pyarrow.parquet as pq
    from ray.data.expressions import col

    source = get_source(cfg.dataset)
    items = source.items(cfg)
    if not items:
        raise ValueError(f"{source.root(cfg)}: the {cfg.dataset} source found no samples")
    spec = source.spec(cfg)
    params = _params(cfg, spec)
    fingerprint = _fingerprint(source, cfg, items)
    version = _version(source.name, source.root(cfg), params, fingerprint)
    base = Path(cfg.data_dir).expanduser().resolve() / cfg.dataset
    target = base / version
    if not force and (manifest := valid_manifest(target)):
        return Prepared(target, manifest, cache_hit=True)

    ds = _featurize(source, items, spec, cfg)
    bad = ds.filter(expr=col("error") != "").select_columns(["id", "error_file", "error"]).take_all()
    if bad and not cfg.skip_corrupt:
        listing = "\n  ".join(r["error"] for r in bad)
        raise ValueError(f"{len(bad)} input file(s) of {cfg.dataset} at {source.root(cfg)} could "
                         f"not be read (set data.skip_corrupt=true to skip them):\n  {listing}")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))
    try:
        for split in SPLITS:
            if any(it.split == split for it in items):
                _write_split(ds, split, tmp, cfg)
        files = sorted(p for p in tmp.rglob("*.parquet"))
        rows = {s: sum(pq.ParquetFile(p).metadata.num_rows for p in files if p.parent.name == s)
                for s in SPLITS}
        manifest = {
            "source": source.name, "root": str(source.root(cfg)), "version": version,
            "params": params, "fingerprint": fingerprint, "spec": spec.to_dict(),
            "rows": {s: n for s, n in rows.items() if n},
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
            "skipped": [{"id": r["id"], "file": r["error_file"], "error": r["error"]} for r in bad],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if target.exists():  # a folder without a valid manifest (or --force): replace it whole
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(target, manifest, cache_hit=False)
