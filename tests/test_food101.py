"""UPMC Food-101 source: labels and texts from the titles CSVs, the seeded val split, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmray.data.features import tokenize
from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import spec_of
from mmray.data.sources import get_source

from helpers import data_config, featurize

CLASSES = ("pizza", "apple_pie", "hot_dog")  # listed unsorted: labels follow the sorted names


def _write(root: Path, per_class: dict[str, int], *, images: bool = True) -> Path:
    """images/<split>/<class>/<class>_<n>.jpg and headerless texts/<split>_titles.csv."""
    (root / "texts").mkdir(parents=True, exist_ok=True)
    n = 0
    for split, count in per_class.items():
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            writer = csv.writer(f)
            for k in range(count):
                for c, cls in enumerate(CLASSES):
                    name = f"{cls}_{n}.jpg"
                    n += 1
                    # Titles hold commas (quoted in the CSV) and non-ASCII text.
                    writer.writerow([name, f"Best {cls.replace('_', ' ')} recipe, crème #{k}", cls])
                    if images:
                        (root / "images" / split / cls).mkdir(parents=True, exist_ok=True)
                        Image.new("RGB", (24, 20), (40 * c, 200 - 10 * k, 90)).save(
                            root / "images" / split / cls / name)
    return root


def _data(root: Path, tmp_path: Path, *extra: str):
    return data_config("food101", root, tmp_path, "data.image.size=16", "data.text.max_tokens=8", *extra)


def test_labels_texts_and_paths_from_the_csvs(tmp_path):
    root = _write(tmp_path / "food", {"train": 2, "test": 1})
    data = _data(root, tmp_path, "data.food101.val=0")
    source = get_source("food101")
    items = source.items(data)
    assert len(items) == 9 and [it.split for it in items] == ["train"] * 6 + ["test"] * 3
    first = items[0]
    assert first.id == "pizza_0" and first.label == 2  # apple_pie, hot_dog, pizza
    assert first.inline == {"text": "Best pizza recipe, crème #0"}
    assert first.files == {"image": str(root.resolve() / "images/train/pizza/pizza_0.jpg")}
    assert items[-1].files["image"].startswith(str(root.resolve() / "images/test/hot_dog/"))
    spec = source.spec(data)
    assert spec.class_names == ("apple_pie", "hot_dog", "pizza") and spec.num_classes == 3
    assert spec.modalities["image"].shape == (3, 16, 16)  # data.frames is for frame folders only
    assert spec.modalities["text"].shape == (8,)
    assert source.spec(_data(root, tmp_path, "data.frames=3")) == spec
    assert [p.name for p in source.index_files(data)] == ["train_titles.csv", "test_titles.csv"]


def test_val_is_a_seeded_stratified_part_of_train(tmp_path):
    root = _write(tmp_path / "food", {"train": 10, "test": 2}, images=False)
    data = _data(root, tmp_path, "data.food101.val=0.2")
    items = get_source("food101").items(data)
    val = [it for it in items if it.split == "val"]
    assert sorted(it.label for it in val) == [0, 0, 1, 1, 2, 2]
    assert all(it.files["image"].split("/images/")[1].startswith("train/") for it in val)
    assert sum(it.split == "test" for it in items) == 6
    assert [it.id for it in get_source("food101").items(data) if it.split == "val"] == [
        it.id for it in val]
    reseeded = get_source("food101").items(_data(root, tmp_path, "data.food101.val=0.2",
                                                 "data.food101.seed=3"))
    assert {it.id for it in reseeded if it.split == "val"} != {it.id for it in val}


@pytest.mark.parametrize("rows, expected", [
    ('pizza_0.jpg,"a title",pizza\npizza_1.jpg,pizza\n',
     "train_titles.csv line 2: expected 3 columns `image name,text,class` (no header)"),
    ("image_name,text,class\n", "train_titles.csv line 1: expected 3 columns"),
    ('pizza_0.jpg,"a title",\n', "train_titles.csv line 1: expected 3 columns"),
    ('pizza_0.jpg,"a\ntitle",pizza\npizza_0.jpg,again,pizza\n',
     "train_titles.csv line 3: image pizza_0.jpg is listed again (first at"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, rows, expected):
    root = _write(tmp_path / "food", {"test": 1}, images=False)
    (root / "texts" / "train_titles.csv").write_text(rows)
    with pytest.raises(ValueError) as e:
        get_source("food101").items(_data(root, tmp_path))
    assert expected in str(e.value)


def test_layout_errors_name_the_file(tmp_path):
    root = tmp_path / "food"
    with pytest.raises(FileNotFoundError, match=r"no file .*texts/train_titles\.csv"):
        get_source("food101").items(_data(root, tmp_path))
    _write(root, {"train": 1}, images=False)
    with pytest.raises(FileNotFoundError, match=r"texts/test_titles\.csv"):
        get_source("food101").items(_data(root, tmp_path))
    (root / "texts" / "test_titles.csv").write_text("sushi_9.jpg,raw fish,sushi\n")
    with pytest.raises(ValueError, match=r"test_titles\.csv line 1: class 'sushi' is not a class"):
        get_source("food101").items(_data(root, tmp_path))
    (root / "texts" / "test_titles.csv").write_bytes(b"pizza_9.jpg,caf\xe9,pizza\n")
    with pytest.raises(ValueError, match=r"test_titles\.csv: not UTF-8 text"):
        get_source("food101").items(_data(root, tmp_path))


def test_featurizer_names_a_missing_image(tmp_path):
    root = _write(tmp_path / "food", {"train": 1, "test": 0})
    data = _data(root, tmp_path)
    source = get_source("food101")
    items = source.items(data)
    missing = Path(items[1].files["image"])
    missing.unlink()
    out = featurize(source, data, items)
    assert list(out["error_file"]) == ["", str(missing), ""]
    assert str(missing) in out["error"][1]
    np.testing.assert_array_equal(out["text"][0], tokenize(items[0].inline["text"], data.text))


def test_preprocess_shapes_match_spec_and_missing_images_are_skipped(ray_local, tmp_path):
    root = _write(tmp_path / "food", {"train": 3, "test": 1})
    (root / "images/test/pizza/pizza_9.jpg").unlink()
    data = _data(root, tmp_path, "data.food101.val=0.34", "data.skip_corrupt=true")
    prepared = preprocess(data)
    m = prepared.manifest
    assert m["rows"] == {"train": 6, "val": 3, "test": 2}
    assert [(s["id"], Path(s["file"]).name) for s in m["skipped"]] == [("pizza_9", "pizza_9.jpg")]
    spec = spec_of(m)
    assert spec == get_source("food101").spec(data)
    texts = {it.id: it.inline["text"] for it in get_source("food101").items(data)}
    for split, n in m["rows"].items():
        cols = read_split(prepared.version_dir, split)
        for mod, ms in spec.modalities.items():
            assert cols[mod].shape == (n, *ms.shape)
        for sid, tokens in zip(cols["id"], cols["text"]):
            np.testing.assert_array_equal(tokens, tokenize(texts[sid], data.text))
        assert [spec.class_names[y] for y in cols["label"]] == [s.rsplit("_", 1)[0] for s in cols["id"]]
