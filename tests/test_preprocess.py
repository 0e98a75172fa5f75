"""Ray Data preprocessing: shards and manifest, cache hits, and atomic failure on bad inputs."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmray.data import ingest
from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import collate, load_manifest, spec_of
from mmray.data.sources import get_source
from mmray.data.sources.synthetic import generate

from helpers import featurize, smoke_experiment


def _data_cfg(tmp_path, *extra):
    cfg = smoke_experiment(tmp_path, "data.synthetic.num_samples=40", *extra)
    generate(cfg.data.synthetic, cfg.data.root)
    return cfg.data


THREE = ("data.synthetic.modalities=[audio, image, text]",
         "data.synthetic.strength={audio: 0.9, image: 0.5, text: 0.3}")


def _index_ids(root, split: str) -> list[str]:
    with open(root / "index.csv") as f:
        return [r["id"] for r in csv.DictReader(f) if r["split"] == split]


def test_shards_and_manifest(ray_local, tmp_path):
    # One block of 40 rows, 2 rows per file: a write task writes 14 train files, which Ray's
    # default names (`...-10.parquet` sorts before `...-2.parquet`) would put out of row order.
    data = _data_cfg(tmp_path, *THREE, "data.rows_per_file=2", "data.batch_rows=40", "data.parallelism=1",
                     "data.audio.encoding=pcm16")
    prepared = preprocess(data)
    assert not prepared.cache_hit
    m = load_manifest(prepared.version_dir)
    assert m["version"] == prepared.version_dir.name and m["source"] == "synthetic"
    assert m["rows"] == {"train": 28, "val": 6, "test": 6}
    assert m["params"]["audio"]["n_mels"] == data.audio.n_mels and m["skipped"] == []
    assert m["params"]["modalities"] == {"audio": "audio", "image": "image", "text": "text"}
    # What each column stores, recorded (small images as uint8, audio as asked: unpadded PCM).
    assert m["params"]["encodings"] == {"audio": {"codec": "pcm16", "sample_rate": 8000, "store_seconds": 0.25},
                                        "image": {"codec": "uint8"}, "text": {"codec": "raw"}}
    schema = pq.read_schema(prepared.version_dir / "train" / "part-00000.parquet")
    assert schema.field("audio").type == pa.binary()
    assert schema.field("image").type.storage_type.value_type == pa.uint8()
    for rel, digest in m["files"].items():
        assert hashlib.sha256((prepared.version_dir / rel).read_bytes()).hexdigest() == digest
    train_files = sorted(f for f in m["files"] if f.startswith("train/"))
    assert train_files == [f"train/part-{k:05d}.parquet" for k in range(14)]
    spec = spec_of(m)
    cols = read_split(prepared.version_dir, "train")
    assert list(cols["id"]) == _index_ids(tmp_path / "raw", "train")  # file order is row order
    assert cols["label"].dtype == np.int64 and cols["text"].dtype == np.int64
    for mod, ms in spec.modalities.items():
        assert cols[mod].shape == (28, *ms.shape)
    val_ids = set(read_split(prepared.version_dir, "val")["id"])
    assert not val_ids & set(cols["id"])

    # What a Train worker does with the split streamed from its files: an epoch's batches in
    # the contract.
    row_of = {sid: k for k, sid in enumerate(cols["id"])}
    seen = []
    reader = ingest.SplitReader(ingest.ParquetRows(prepared.version_dir, "train"), ingest.Decoder(m),
                                "train", batch_size=8, seed=0)
    for b in reader.batches(epoch=0):
        n = len(b["id"])
        for mod, ms in spec.modalities.items():
            assert b["inputs"][mod].shape == (n, *ms.shape)
            assert b["present"][mod].dtype == torch.bool and bool(b["present"][mod].all())
            rows = [row_of[sid] for sid in b["id"]]
            np.testing.assert_array_equal(b["inputs"][mod].numpy(), cols[mod][rows])
        assert b["inputs"]["audio"].dtype == torch.float32 and b["inputs"]["text"].dtype == torch.long
        assert b["label"].dtype == torch.long and b["label"].tolist() == cols["label"][rows].tolist()
        seen += b["id"]
    assert sorted(seen) == sorted(cols["id"])

    # Ray hands out read-only arrays: the batch must own its memory, so that a method writing
    # into its inputs never changes the data that later epochs read.
    frozen = {k: np.array(v[:4]) for k, v in cols.items()}
    for v in frozen.values():
        v.flags.writeable = False
    before = frozen["audio"].copy()
    collate(frozen, spec)["inputs"]["audio"].add_(1.0)
    np.testing.assert_array_equal(frozen["audio"], before)


def test_cache_hit_crash_leftover_and_parameter_change(ray_local, tmp_path):
    data = _data_cfg(tmp_path)
    first = preprocess(data)
    stamp = (first.version_dir / "manifest.json").stat().st_mtime_ns
    again = preprocess(data)
    assert again.cache_hit and again.version_dir == first.version_dir
    assert (first.version_dir / "manifest.json").stat().st_mtime_ns == stamp

    (first.version_dir / "manifest.json").unlink()  # as if a crash left a bare folder
    rewritten = preprocess(data)
    assert not rewritten.cache_hit and rewritten.version_dir == first.version_dir
    assert load_manifest(rewritten.version_dir) == rewritten.manifest
    # Same inputs, same shards: file names and bytes (ordered rows, our own file names).
    assert rewritten.manifest["files"] == first.manifest["files"]

    other = preprocess(_data_cfg(tmp_path, "data.audio.n_mels=16"))
    assert not other.cache_hit and other.version_dir != first.version_dir
    assert first.version_dir.exists()  # the old version stays

    # The old float32 encoding is another version, and holds exactly what the compact one reads
    # back as (synthetic images are 32 px uint8, its WAVs 16-bit PCM at the target rate).
    dense = preprocess(_data_cfg(tmp_path, "data.image.encoding=float32", "data.audio.encoding=float32"))
    assert dense.version_dir not in (first.version_dir, other.version_dir)
    assert dense.manifest["params"]["encodings"]["image"] == {"codec": "float32"}
    for split in ("train", "test"):
        compact, full = read_split(first.version_dir, split), read_split(dense.version_dir, split)
        for mod in ("audio", "image"):
            np.testing.assert_array_equal(compact[mod], full[mod])
    size = {p.version_dir: sum(f.stat().st_size for f in p.version_dir.rglob("*.parquet")) for p in (first, dense)}
    assert size[first.version_dir] < size[dense.version_dir]


def test_corrupt_files_are_named_and_nothing_is_written(ray_local, tmp_path):
    data = _data_cfg(tmp_path)
    (tmp_path / "raw" / "audio" / "s00003.wav").write_bytes(b"garbage, not a media file")
    (tmp_path / "raw" / "image" / "s00005.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError) as e:
        preprocess(data)
    for name in ("audio/s00003.wav", "image/s00005.png", "data.skip_corrupt=true", "2 input file(s)"):
        assert name in str(e.value)
    shards = tmp_path / "shards"
    assert not shards.exists() or not any((shards / "synthetic").iterdir())  # no version, no .tmp-*


def test_skip_corrupt_and_missing_files_are_counted(ray_local, tmp_path):
    data = _data_cfg(tmp_path, "data.skip_corrupt=true")
    (tmp_path / "raw" / "audio" / "s00003.wav").write_bytes(b"garbage")
    (tmp_path / "raw" / "image" / "s00007.png").unlink()
    prepared = preprocess(data)
    skipped = sorted(prepared.manifest["skipped"], key=lambda s: s["id"])
    assert [s["id"] for s in skipped] == ["s00003", "s00007"]
    assert [Path(s["file"]).name for s in skipped] == ["s00003.wav", "s00007.png"]
    assert all(s["file"] in s["error"] for s in skipped)
    assert sum(prepared.manifest["rows"].values()) == 38
    read_back = np.concatenate([read_split(prepared.version_dir, s)["id"] for s in prepared.manifest["rows"]])
    assert len(read_back) == 38 and not {"s00003", "s00007"} & set(read_back)


def test_featurizer_names_a_missing_file_instead_of_raising(tmp_path):
    # The actor body without Ray: errors become a column, so one bad file cannot abort a batch.
    data = _data_cfg(tmp_path)
    source = get_source("synthetic")
    items = source.items(data)[:3]
    missing = Path(items[1].files["image"])
    missing.unlink()
    out = featurize(source, data, items)
    assert list(out["error_file"]) == ["", str(missing), ""]
    assert out["error"][0] == "" and str(missing) in out["error"][1]
    assert out["image"].shape[0] == 3 and np.abs(out["image"][0]).sum() > 0


def test_missing_index_is_named(tmp_path):
    data = _data_cfg(tmp_path)
    shutil.rmtree(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="index.csv"):
        preprocess(data)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _ray_data_lines(data) -> str:
    """What Ray Data logs while `data` is preprocessed (its own loggers, read directly: their
    console handlers may hold a stream an earlier test's capture swapped in)."""
    handler, logger = _Lines(), logging.getLogger("ray.data")
    logger.addHandler(handler)
    try:
        preprocess(data)
    finally:
        logger.removeHandler(handler)
    return "\n".join(handler.lines)


def test_progress_is_shown_unless_turned_off(ray_local, tmp_path):
    """Ray Data's progress of the featurizing pass: bars on a terminal, lines in a log."""
    shown = _ray_data_lines(_data_cfg(tmp_path / "on", "data.progress=true"))
    hidden = _ray_data_lines(_data_cfg(tmp_path / "off", "data.progress=false"))
    assert "MapBatches(Featurizer)" in shown and "Total Progress" in shown
    assert "Execution plan" in hidden and "Total Progress" not in hidden
