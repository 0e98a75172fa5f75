"""The synthetic generator: layout, determinism, and signal strength that controls learnability."""

from __future__ import annotations

import csv
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmray.data.features import (
    AudioFeatures,
    ImageFeatures,
    audio_features,
    image_features,
    load_audio,
    load_image,
)
from mmray.data.sources import DataConfig
from mmray.data.sources.synthetic import SyntheticConfig, SyntheticSource, generate

SMALL = dict(num_samples=40, num_classes=4, audio_seconds=0.25, image_size=16)


def _cfg(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{**SMALL, **kw})


def test_layout_and_index(tmp_path):
    root = generate(_cfg(), tmp_path / "d")
    with open(root / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "split", "label"]
    assert len(rows) == 40
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert [r["split"] for r in rows].count("train") == 28  # 0.7 of 40
    assert sorted({int(r["label"]) for r in rows}) == [0, 1, 2, 3]
    sid = rows[0]["id"]
    wave, sr = soundfile.read(root / "audio" / f"{sid}.wav")
    assert sr == 8000 and wave.shape == (2000,)
    assert soundfile.info(root / "audio" / f"{sid}.wav").subtype == "PCM_16"
    img = Image.open(root / "image" / f"{sid}.png")
    assert img.mode == "RGB" and img.size == (16, 16)
    assert not (root / "text").exists()
    assert json.loads((root / "synthetic.json").read_text())["num_samples"] == 40


def test_three_modalities_write_text(tmp_path):
    root = generate(_cfg(modalities=["audio", "image", "text"],
                         strength={"audio": 0.9, "image": 0.5, "text": 0.3}), tmp_path / "d")
    texts = sorted((root / "text").glob("*.txt"))
    assert len(texts) == 40 and len(texts[0].read_text().split()) == 12


def test_same_arguments_write_byte_identical_files(tmp_path):
    a = generate(_cfg(modalities=["audio", "image", "text"],
                      strength={"audio": 0.9, "image": 0.5, "text": 0.3}), tmp_path / "a")
    b = generate(_cfg(modalities=["audio", "image", "text"],
                      strength={"audio": 0.9, "image": 0.5, "text": 0.3}), tmp_path / "b")
    cmp = filecmp.dircmp(a, b)
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in ("audio", "image", "text"):
        files = sorted(p.name for p in (a / sub).iterdir())
        match, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, files, shallow=False)
        assert len(match) == 40 and not mismatch and not errors
    c = generate(_cfg(seed=1), tmp_path / "c")
    assert (a / "audio" / "s00000.wav").read_bytes() != (c / "audio" / "s00000.wav").read_bytes()


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path):
    root = generate(_cfg(), tmp_path / "d")
    mtime = (root / "index.csv").stat().st_mtime_ns
    generate(_cfg(), root)
    generate(_cfg(noise=0.5, strength={"audio": 0.9, "image": 0.5}), root)  # same values, spelt out
    assert (root / "index.csv").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="other arguments"):
        generate(_cfg(num_classes=3), root)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def _nearest_mean_accuracy(root, n_train: int) -> float:
    """A unimodal classifier on audio fbank features: nearest class mean, train -> held out."""
    with open(root / "index.csv") as f:
        rows = list(csv.DictReader(f))
    feats_cfg = AudioFeatures(seconds=0.25)
    x = np.stack([audio_features(load_audio(root / "audio" / f"{r['id']}.wav", 8000, 0.25), feats_cfg)
                  .mean(axis=1).ravel() for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    means = np.stack([xtr[ytr == c].mean(0) for c in range(4)])
    pred = np.argmin(((xte[:, None] - means[None]) ** 2).sum(-1), axis=1)
    return float((pred == yte).mean())


def test_signal_strength_controls_what_a_unimodal_model_can_learn(tmp_path):
    strong = generate(_cfg(num_samples=200, strength={"audio": 1.0, "image": 0.5}), tmp_path / "s")
    none = generate(_cfg(num_samples=200, strength={"audio": 0.0, "image": 0.5}), tmp_path / "n")
    acc_strong = _nearest_mean_accuracy(strong, 150)
    acc_none = _nearest_mean_accuracy(none, 150)
    assert acc_strong > 0.9  # the class chords are easy to separate
    assert acc_none < 0.45  # chance is 0.25 with 4 classes; 50 test samples


def test_source_lists_items_and_spec_matches_the_featurizers(tmp_path):
    root = generate(_cfg(), tmp_path / "d")
    data = DataConfig(root=str(root), audio=AudioFeatures(seconds=0.25), image=ImageFeatures(size=16))
    source = SyntheticSource()
    items = source.items(data)
    assert [i.id for i in items[:2]] == ["s00000", "s00001"] and len(items) == 40
    assert set(items[0].files) == {"audio", "image"} and all(Path(f).is_absolute() for f in items[0].files.values())
    spec = source.spec(data)
    assert spec.num_classes == 4 and set(spec.modalities) == {"audio", "image"}
    wav, png = items[0].files["audio"], items[0].files["image"]
    assert audio_features(load_audio(wav, 8000, 0.25), data.audio).shape == spec.modalities["audio"].shape
    assert image_features(load_image(png), data.image).shape == spec.modalities["image"].shape


@pytest.mark.parametrize("content, match", [
    ("id,label\ns00000,1\n", r"index.csv: missing column\(s\) \['split'\]"),
    ("id,split,label\ns00000,train,1\ns00001,dev,1\n", r"index.csv line 3: split must be"),
    ("id,split,label\ns00000,train,cat\n", r"index.csv line 2: .*'cat'"),
    ("id,split,label\ns00000,train,1\ns00000,val,2\n", r"index.csv line 3: id 's00000'"),
    ("id,split,label\ns00000,train\n", r"index.csv line 2: .*'train', ''"),
])
def test_malformed_index_is_named(tmp_path, content, match):
    root = generate(_cfg(), tmp_path / "d")
    (root / "index.csv").write_text(content)
    with pytest.raises(ValueError, match=match):
        SyntheticSource().items(DataConfig(root=str(root)))


def test_missing_layout_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "index.csv")):
        SyntheticSource().items(DataConfig(root=str(tmp_path / "nowhere")))
