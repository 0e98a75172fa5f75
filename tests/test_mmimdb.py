"""MM-IMDB from its published HDF5 layout: split ranges, validation errors, Ray Data shards."""

from __future__ import annotations

import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import load_manifest, spec_of
from mmray.data.sources import get_source
from mmray.data.sources.mmimdb import FILE_NAME, GENRES, split_ranges
from mmray.methods import MethodConfig

from helpers import smoke_experiment

N = 40


def write_hdf5(folder, n: int = N, skip: str = "", shapes: dict | None = None, genres=None):
    """A small file with the published keys, dtypes and shapes (images left unwritten: no space)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = {"features": (n, 300), "vgg_features": (n, 4096), "genres": (n, 23),
              "images": (n, 3, 256, 160), **(shapes or {})}
    data = {"features": rng.standard_normal(shapes["features"]).astype(np.float32),
            "vgg_features": rng.random(shapes["vgg_features"]).astype(np.float32),
            "genres": genres if genres is not None else
            (rng.random(shapes["genres"]) < 0.2).astype(np.int32)}
    with h5py.File(folder / FILE_NAME, "w") as f:
        for key, value in data.items():
            if key != skip:
                f.create_dataset(key, data=value)
        f.create_dataset("images", shapes["images"], dtype="int32")
        f.create_dataset("imdb_ids", data=np.asarray([f"{i:07d}" for i in range(n)], dtype="S7"))
        if skip != "genres":
            f["genres"].attrs["target_names"] = json.dumps(list(GENRES))
    return data


def data_cfg(tmp_path, *extra):
    return smoke_experiment(tmp_path, "data.dataset=mmimdb", "data.batch_rows=16", *extra)


def test_standard_split_clipped_to_the_file():
    assert split_ranges(25959) == [("train", 0, 15552), ("val", 15552, 18160), ("test", 18160, 25959)]
    assert split_ranges(40) == [("train", 0, 40)]
    assert split_ranges(16000) == [("train", 0, 15552), ("val", 15552, 16000)]
    assert split_ranges(18160) == [("train", 0, 15552), ("val", 15552, 18160)]


def test_spec_and_items(tmp_path):
    data = write_hdf5(tmp_path / "raw")
    cfg = data_cfg(tmp_path).data
    source = get_source("mmimdb")
    spec = source.spec(cfg)
    assert {m: (s.kind, s.shape) for m, s in spec.modalities.items()} == {
        "text": ("vector", (300,)), "image": ("vector", (4096,))}
    assert spec.num_classes == 23 and spec.multilabel and spec.class_names == GENRES
    items = source.items(cfg)
    assert [it.id for it in items[:2]] == ["00000", "00001"] and {it.split for it in items} == {"train"}
    assert np.array_equal(np.asarray([it.label for it in items]), data["genres"])
    fp = source.fingerprint(cfg)
    assert fp["file"] == FILE_NAME and fp["size"] == (tmp_path / "raw" / FILE_NAME).stat().st_size


@pytest.mark.parametrize("skip, shapes, named", [
    ("vgg_features", None, r"no dataset 'vgg_features' \(expected shape \(N, 4096\)\)"),
    ("genres", None, r"no dataset 'genres' \(expected shape \(N, 23\)\)"),
    ("", {"vgg_features": (N, 100)}, r"'vgg_features' has shape \(40, 100\); expected \(N, 4096\)"),
    ("", {"features": (N, 300, 1)}, r"'features' has shape \(40, 300, 1\); expected \(N, 300\)"),
    ("", {"genres": (N - 1, 23)}, r"disagree on the number of rows"),
])
def test_layout_errors_name_file_key_and_shape_before_any_ray_work(tmp_path, monkeypatch, skip,
                                                                   shapes, named):
    write_hdf5(tmp_path / "raw", skip=skip, shapes=shapes)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the file was validated")

    monkeypatch.setattr("mmray.ray_utils.init_ray", no_ray)
    with pytest.raises(ValueError, match=named) as e:
        preprocess(data_cfg(tmp_path).data)
    assert str(tmp_path / "raw" / FILE_NAME) in str(e.value)


def test_labels_must_be_multi_hot_and_the_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=FILE_NAME):
        get_source("mmimdb").items(data_cfg(tmp_path).data)
    genres = np.zeros((N, 23), np.int32)
    genres[7, 3] = 2
    write_hdf5(tmp_path / "raw", genres=genres)
    with pytest.raises(ValueError, match="'genres' must be multi-hot.*row 7 holds 2"):
        get_source("mmimdb").items(data_cfg(tmp_path).data)


def test_preprocess_reads_the_rows_in_parallel_and_caches(ray_local, tmp_path):
    data = write_hdf5(tmp_path / "raw")
    cfg = data_cfg(tmp_path)
    prepared = preprocess(cfg.data)
    manifest = load_manifest(prepared.version_dir)
    assert manifest["rows"] == {"train": N} and manifest["source"] == "mmimdb"
    spec = spec_of(manifest)
    cols = read_split(prepared.version_dir, "train")
    assert cols["text"].shape == (N, 300) and cols["image"].shape == (N, 4096)
    assert cols["label"].shape == (N, 23) and set(np.unique(cols["label"])) <= {0.0, 1.0}
    order = np.argsort(cols["id"].astype(int))
    assert list(cols["id"][order]) == [f"{i:05d}" for i in range(N)]
    np.testing.assert_array_equal(cols["label"][order], data["genres"].astype(np.float32))
    np.testing.assert_array_equal(cols["text"][order], data["features"])
    np.testing.assert_array_equal(cols["image"][order], data["vgg_features"])
    assert spec.multilabel and spec.class_names == GENRES

    assert preprocess(cfg.data).cache_hit  # size and mtime unchanged
    path = tmp_path / "raw" / FILE_NAME
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    again = preprocess(cfg.data)
    assert not again.cache_hit and again.version_dir != prepared.version_dir

    # DynMM on the shards: experts first, then the gate; text-only and late fusion as in the paper.
    from mmray.train.loop import run_local

    run = dataclasses.replace(cfg, method=MethodConfig(
        "dynmm", "concat", {"experts": ["text", "late_fusion"], "pretrain_epochs": 1}))
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, epochs=2))
    history = run_local(run, prepared.version_dir)
    assert "train/loss/late_fusion" in history[0] and "train/dynmm/flops_saving" in history[1]
    assert history[1]["dynmm/cost_late_fusion"] > history[1]["dynmm/cost_text"]
