"""MM-IMDB from its raw release: split.json, posters and per-movie JSON, errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmray.data.features import tokenize
from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import spec_of
from mmray.data.sources import get_source
from mmray.data.sources.mmimdb import GENRES

from helpers import data_config, featurize

MOVIES = {  # id -> (plots, genres); News is not one of the 23 genres
    "0000001": (["A drama, with commas.", "A second plot."], ["Drama", "Romance"]),
    "0000002": (["Café comedy"], ["Comedy", "News"]),
    "0000003": (["War story"], ["War", "History", "Drama"]),
    "0000004": (["Noir"], ["Film-Noir"]),
}
SPLIT = {"train": ["0000001", "0000002"], "dev": ["0000003"], "test": ["0000004"]}


def write(root: Path, layout: tuple[str, str] = ("dataset", "dataset"), split=None) -> Path:
    images, labels = (root / layout[0], root / layout[1])
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (root / "split.json").write_text(json.dumps(split or SPLIT))
    for k, (sid, (plots, genres)) in enumerate(MOVIES.items()):
        (labels / f"{sid}.json").write_text(json.dumps({"plot": plots, "genres": genres,
                                                        "title": f"Movie {k}"}))
        Image.new("RGB", (20, 30), (50 * k, 100, 200)).save(images / f"{sid}.jpeg", "JPEG")
    return root


def data_cfg(root: Path, tmp_path: Path, *extra: str):
    return data_config("mmimdb_raw", root, tmp_path, "data.image.size=16", "data.text.max_tokens=8",
                       *extra)


def test_splits_labels_texts_and_paths(tmp_path):
    root = write(tmp_path / "mmimdb")
    source = get_source("mmimdb_raw")
    items = source.items(data_cfg(root, tmp_path))
    assert [(it.id, it.split) for it in items] == [
        ("0000001", "train"), ("0000002", "train"), ("0000003", "val"), ("0000004", "test")]
    labels = {it.id: {GENRES[k] for k, v in enumerate(it.label) if v} for it in items}
    assert labels == {"0000001": {"Drama", "Romance"}, "0000002": {"Comedy"},
                      "0000003": {"War", "History", "Drama"}, "0000004": {"Film-Noir"}}
    assert all(len(it.label) == 23 for it in items)
    assert items[0].inline == {"text": "A drama, with commas."}
    assert items[0].files == {"image": str(root.resolve() / "dataset/0000001.jpeg")}
    joined = source.items(data_cfg(root, tmp_path, "data.mmimdb_raw.plots=join"))
    assert joined[0].inline["text"] == "A drama, with commas. A second plot."
    spec = source.spec(data_cfg(root, tmp_path))
    assert spec.multilabel and spec.num_classes == 23 and spec.class_names == GENRES
    assert spec.modalities["image"].shape == (3, 16, 16) and spec.modalities["text"].shape == (8,)
    assert [p.name for p in source.index_files(data_cfg(root, tmp_path))] == ["split.json"]


def test_the_map_references_images_and_labels_copy_is_read_too(tmp_path):
    root = write(tmp_path / "mmimdb", layout=("images", "labels"))
    items = get_source("mmimdb_raw").items(data_cfg(root, tmp_path))
    assert len(items) == 4 and items[0].files["image"].endswith("/images/0000001.jpeg")


@pytest.mark.parametrize("split, expected", [
    ('["0000001"]', r"split.json: expected an object with lists \['dev', 'test', 'train'\]"),
    ('{"train": ["0000001"], "dev": []}', r"split.json: expected an object .* got \['dev', 'train'\]"),
    ('{"train": [1], "dev": [], "test": []}', "split.json: 'train' must be a list of movie ids"),
    ('{"train": ["0000001"], "dev": ["0000001"], "test": []}',
     r"split.json: id '0000001' is listed in 'train' and again in 'dev'"),
    ('{"train": [', r"split.json: not valid JSON"),
])
def test_malformed_split_json_is_named(tmp_path, split, expected):
    root = write(tmp_path / "mmimdb")
    (root / "split.json").write_text(split)
    with pytest.raises(ValueError, match=expected):
        get_source("mmimdb_raw").items(data_cfg(root, tmp_path))


@pytest.mark.parametrize("content, expected", [
    (None, r"no file .*dataset/0000002.json; split.json lists the movie"),
    ("{not json", r"dataset/0000002.json: not valid JSON"),
    ('{"plot": [], "genres": ["Drama"]}', r"0000002.json: \"plot\" must be a non-empty list"),
    ('{"plot": ["x"], "genres": "Drama"}', r"0000002.json: \"genres\" must be a list of strings"),
])
def test_a_missing_or_malformed_movie_json_is_named(tmp_path, content, expected):
    root = write(tmp_path / "mmimdb")
    path = root / "dataset/0000002.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        get_source("mmimdb_raw").items(data_cfg(root, tmp_path))


def test_layout_errors_name_what_is_missing(tmp_path):
    root = tmp_path / "mmimdb"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset/ folder .*nor images/ \\+ labels/"):
        get_source("mmimdb_raw").items(data_cfg(root, tmp_path))
    (root / "dataset").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no file .*split.json"):
        get_source("mmimdb_raw").items(data_cfg(root, tmp_path))


def test_featurizer_names_a_missing_poster(tmp_path):
    root = write(tmp_path / "mmimdb")
    data = data_cfg(root, tmp_path)
    source = get_source("mmimdb_raw")
    items = source.items(data)
    missing = Path(items[1].files["image"])
    missing.unlink()
    out = featurize(source, data, items)
    assert list(out["error_file"]) == ["", str(missing), "", ""]
    np.testing.assert_array_equal(out["text"][2], tokenize("War story", data.text))


def test_preprocess_with_clip_tokens_gives_multi_hot_shards(ray_local, tmp_path):
    root = write(tmp_path / "mmimdb")
    data = data_cfg(root, tmp_path, "data.text.tokenizer=open_clip", "data.text.max_tokens=32")
    prepared = preprocess(data)
    assert prepared.manifest["rows"] == {"train": 2, "val": 1, "test": 1}
    spec = spec_of(prepared.manifest)
    assert spec.multilabel and spec.modalities["text"].vocab_size == 49408
    cols = read_split(prepared.version_dir, "train")
    assert cols["label"].shape == (2, 23) and cols["label"][1].tolist() == [
        1.0 if g == "Comedy" else 0.0 for g in GENRES]
    np.testing.assert_array_equal(cols["text"][1], tokenize("Café comedy", data.text))
    assert cols["image"].shape == (2, 3, 16, 16)
