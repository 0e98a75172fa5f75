"""Hateful Memes: JSON-lines splits, how test is formed with and without test labels, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import spec_of
from mmray.data.sources import get_source

from helpers import data_config, featurize, ids_by_split


def line(sid: int, label: int | None, text: str = "") -> str:
    obj = {"id": sid, "img": f"img/{sid:05d}.png", "text": text or f"meme {sid}, \"quoted\""}
    if label is not None:
        obj["label"] = label
    return json.dumps(obj)


def write(root: Path, n_train: int = 10, test_labelled: bool = False, images: bool = True) -> Path:
    """train: ids 100.., labels alternating; dev: 200..203; test: 300..302."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": [line(100 + i, i % 2) for i in range(n_train)],
             "dev.jsonl": [line(200 + i, i % 2) for i in range(4)],
             "test.jsonl": [line(300 + i, i % 2 if test_labelled else None) for i in range(3)]}
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    if images:
        (root / "img").mkdir(exist_ok=True)
        for lines in files.values():
            for text in lines:
                Image.new("RGB", (24, 18), (10, 20, 30)).save(root / json.loads(text)["img"])
    return root


def data_cfg(root: Path, tmp_path: Path, *extra: str):
    return data_config("hateful_memes", root, tmp_path, "data.image.size=16", "data.text.max_tokens=8",
                       *extra)


def test_a_labelled_test_file_is_the_test_split(tmp_path):
    root = write(tmp_path / "hm", test_labelled=True)
    source = get_source("hateful_memes")
    items = source.items(data_cfg(root, tmp_path))
    assert ids_by_split(items) == {"train": [str(100 + i) for i in range(10)],
                             "val": ["200", "201", "202", "203"], "test": ["300", "301", "302"]}
    first = items[0]
    assert first.label == 0 and items[1].label == 1
    assert first.inline == {"text": 'meme 100, "quoted"'}
    assert first.files == {"image": str(root.resolve() / "img/00100.png")}
    spec = source.spec(data_cfg(root, tmp_path))
    assert spec.num_classes == 2 and not spec.multilabel
    assert spec.class_names == ("not_hateful", "hateful")
    assert [p.name for p in source.index_files(data_cfg(root, tmp_path))] == [
        "train.jsonl", "dev.jsonl", "test.jsonl"]


def test_an_unlabelled_test_file_makes_dev_the_test_split_and_holds_out_val(tmp_path):
    root = write(tmp_path / "hm")
    items = get_source("hateful_memes").items(data_cfg(root, tmp_path, "data.hateful_memes.val=0.2"))
    s = ids_by_split(items)
    assert s["test"] == ["200", "201", "202", "203"] and "300" not in [it.id for it in items]
    assert len(s["val"]) == 2 and sorted(int(i) % 2 for i in s["val"]) == [0, 1]  # stratified
    assert len(s["train"]) == 8 and not set(s["val"]) & set(s["train"])
    again = get_source("hateful_memes").items(data_cfg(root, tmp_path, "data.hateful_memes.val=0.2"))
    assert ids_by_split(again) == s
    reseeded = get_source("hateful_memes").items(data_cfg(
        root, tmp_path, "data.hateful_memes.val=0.2", "data.hateful_memes.seed=5"))
    assert ids_by_split(reseeded)["val"] != s["val"]
    no_test = get_source("hateful_memes").items(
        data_cfg(root, tmp_path, "data.hateful_memes.test_file="))
    assert ids_by_split(no_test)["test"] == s["test"]


def test_phase_two_file_names(tmp_path):
    root = write(tmp_path / "hm", test_labelled=True)
    (root / "dev.jsonl").rename(root / "dev_seen.jsonl")
    (root / "test.jsonl").rename(root / "test_seen.jsonl")
    with pytest.raises(FileNotFoundError, match="set data.hateful_memes.dev_file=dev_seen.jsonl"):
        get_source("hateful_memes").items(data_cfg(root, tmp_path))
    items = get_source("hateful_memes").items(data_cfg(
        root, tmp_path, "data.hateful_memes.dev_file=dev_seen.jsonl",
        "data.hateful_memes.test_file=test_seen.jsonl"))
    assert ids_by_split(items)["test"] == ["300", "301", "302"]


@pytest.mark.parametrize("name, content, expected", [
    ("train.jsonl", line(1, 0) + "\n{oops\n", r"train.jsonl line 2: not valid JSON"),
    ("train.jsonl", '{"id": 1, "text": "x", "label": 0}\n',
     r"train.jsonl line 1: expected an object with \"id\", \"img\", \"text\""),
    ("dev.jsonl", line(1, 2) + "\n", r"dev.jsonl line 1: \"label\" must be 0 or 1; got 2"),
    ("train.jsonl", line(1, 0) + "\n" + line(2, None) + "\n",
     r"train.jsonl line 2: no \"label\"; every line of train.jsonl needs one"),
    ("test.jsonl", line(300, 1) + "\n" + line(301, None) + "\n",
     r"test.jsonl: some lines have a \"label\" and some do not"),
    ("dev.jsonl", line(100, 1) + "\n",
     r"dev.jsonl line 1: id 100 is listed again \(first at .*train.jsonl line 1\)"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, name, content, expected):
    root = write(tmp_path / "hm", images=False)
    (root / name).write_text(content)
    with pytest.raises(ValueError, match=expected):
        get_source("hateful_memes").items(data_cfg(root, tmp_path))


def test_missing_files_are_named(tmp_path):
    root = write(tmp_path / "hm", images=False)
    (root / "train.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no file .*train.jsonl; data.root must be"):
        get_source("hateful_memes").items(data_cfg(root, tmp_path))
    root = write(tmp_path / "hm2", images=False)
    (root / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no file .*test.jsonl"):
        get_source("hateful_memes").items(data_cfg(root, tmp_path))


def test_featurizer_names_a_missing_image(tmp_path):
    root = write(tmp_path / "hm", n_train=2)
    data = data_cfg(root, tmp_path)
    source = get_source("hateful_memes")
    items = [it for it in source.items(data) if it.split == "train"]
    missing = Path(items[1].files["image"])
    missing.unlink()
    out = featurize(source, data, items)
    assert list(out["error_file"]) == ["", str(missing)]


def test_preprocess_shards_and_skipped_images(ray_local, tmp_path):
    root = write(tmp_path / "hm", n_train=6)
    (root / "img/00201.png").unlink()
    data = data_cfg(root, tmp_path, "data.skip_corrupt=true", "data.hateful_memes.val=0.34")
    prepared = preprocess(data)
    m = prepared.manifest
    assert m["rows"] == {"train": 4, "val": 2, "test": 3}
    assert [s["id"] for s in m["skipped"]] == ["201"]
    spec = spec_of(m)
    cols = read_split(prepared.version_dir, "test")
    assert list(cols["id"]) == ["200", "202", "203"] and cols["label"].tolist() == [0, 0, 1]
    assert cols["image"].shape == (3, *spec.modalities["image"].shape)
