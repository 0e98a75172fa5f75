"""Ray Data preprocessing: shards and manifest, cache hits, and atomic failure on bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from mmray.cli import SMOKE_OVERRIDES
from mmray.config import load_config
from mmray.data.preprocess import preprocess
from mmray.data.reader import load_manifest, read_split, spec_of
from mmray.data.synthetic import generate

pytestmark = pytest.mark.ray


def _data_cfg(tmp_path, *extra):
    cfg = load_config(None, [*SMOKE_OVERRIDES, "data.synthetic.num_samples=40",
                             f"data.root={tmp_path / 'raw'}", f"data.data_dir={tmp_path / 'shards'}",
                             *extra])
    generate(cfg.data.synthetic, cfg.data.root)
    return cfg.data


def test_shards_and_manifest(ray_local, tmp_path):
    data = _data_cfg(tmp_path, "data.rows_per_file=10")
    prepared = preprocess(data)
    assert not prepared.cache_hit
    m = load_manifest(prepared.version_dir)
    assert m["version"] == prepared.version_dir.name and m["source"] == "synthetic"
    assert m["rows"] == {"train": 28, "val": 6, "test": 6}
    assert m["params"]["audio"]["n_mels"] == data.audio.n_mels and m["skipped"] == []
    for rel, digest in m["files"].items():
        assert hashlib.sha256((prepared.version_dir / rel).read_bytes()).hexdigest() == digest
    assert len([f for f in m["files"] if f.startswith("train/")]) >= 2  # rows_per_file splits files
    spec = spec_of(m)
    cols = read_split(prepared.version_dir, "train")
    assert len(cols["id"]) == 28 and cols["label"].dtype == np.int64
    for mod, ms in spec.modalities.items():
        assert cols[mod].shape == (28, *ms.shape)
    val_ids = set(read_split(prepared.version_dir, "val")["id"])
    assert not val_ids & set(cols["id"])


def test_second_run_is_a_cache_hit_and_a_parameter_change_is_not(ray_local, tmp_path):
    data = _data_cfg(tmp_path)
    first = preprocess(data)
    stamp = (first.version_dir / "manifest.json").stat().st_mtime_ns
    again = preprocess(data)
    assert again.cache_hit and again.version_dir == first.version_dir
    assert (first.version_dir / "manifest.json").stat().st_mtime_ns == stamp
    other = preprocess(_data_cfg(tmp_path, "data.audio.n_mels=16"))
    assert not other.cache_hit and other.version_dir != first.version_dir
    assert first.version_dir.exists()  # the old version stays


@pytest.mark.parametrize("modality, name", [("audio", "s00003.wav"), ("image", "s00005.png")])
def test_corrupt_file_is_named_and_nothing_is_written(ray_local, tmp_path, modality, name):
    data = _data_cfg(tmp_path)
    (tmp_path / "raw" / modality / name).write_bytes(b"garbage, not a media file")
    with pytest.raises(ValueError, match=name) as e:
        preprocess(data)
    assert "data.skip_corrupt=true" in str(e.value)
    shards = tmp_path / "shards"
    assert not shards.exists() or not any((shards / "synthetic").iterdir())


def test_skip_corrupt_and_missing_files_are_counted(ray_local, tmp_path):
    data = _data_cfg(tmp_path, "data.skip_corrupt=true")
    (tmp_path / "raw" / "audio" / "s00003.wav").write_bytes(b"garbage")
    (tmp_path / "raw" / "image" / "s00007.png").unlink()
    prepared = preprocess(data)
    skipped = prepared.manifest["skipped"]
    assert sorted(s["id"] for s in skipped) == ["s00003", "s00007"]
    assert any("s00007.png" in s["error"] for s in skipped)
    assert sum(prepared.manifest["rows"].values()) == 38


def test_missing_index_is_named(tmp_path):
    data = _data_cfg(tmp_path)
    shutil.rmtree(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="index.csv"):
        preprocess(data)


def test_version_without_manifest_is_replaced(ray_local, tmp_path):
    data = _data_cfg(tmp_path)
    first = preprocess(data)
    (first.version_dir / "manifest.json").unlink()  # as if a crash left a bare folder
    again = preprocess(data)
    assert not again.cache_hit and json.loads((again.version_dir / "manifest.json").read_text())
