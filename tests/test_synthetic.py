"""The synthetic generator: layout, determinism, signal strength that controls what a unimodal
model can learn, and difficulty that controls how many steps it takes."""

from __future__ import annotations

import csv
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

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
from mmray.encoders.small import SmallCNN
from mmray.train.experiment import load_experiment

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


def test_difficulty_zero_writes_what_the_generator_wrote_without_it(tmp_path):
    """Explicit zeros are the default: the same files, and a synthetic.json without the field,
    so a raw folder written before difficulty existed is still the same dataset."""
    three = dict(modalities=["audio", "image", "text"], strength={"audio": 0.9, "image": 0.5, "text": 0.3})
    a = generate(_cfg(**three), tmp_path / "a")
    b = generate(_cfg(**three, difficulty={"audio": 0, "image": 0, "text": 0}), tmp_path / "b")
    for sub in ("", "audio", "image", "text"):
        files = sorted(p.name for p in (a / sub).iterdir() if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, files, shallow=False)
        assert files and not mismatch and not errors, sub
    assert "difficulty" not in json.loads((b / "synthetic.json").read_text())
    hard = generate(_cfg(**three, difficulty={"image": 1}), tmp_path / "h")
    assert json.loads((hard / "synthetic.json").read_text())["difficulty"] == {"image": 1}
    assert (hard / "audio" / "s00000.wav").read_bytes() == (a / "audio" / "s00000.wav").read_bytes()
    assert (hard / "image" / "s00000.png").read_bytes() != (a / "image" / "s00000.png").read_bytes()
    words = (generate(_cfg(**three, difficulty={"text": 1}), tmp_path / "t") / "text" / "s00000.txt").read_text()
    assert any(w.startswith("b1c") for w in words.split())  # class words of the second bank


@pytest.mark.parametrize("override, expected", [
    ("data.synthetic.difficulty={image: 4}", "data.synthetic.difficulty.image: 4 is outside 0..3"),
    ("data.synthetic.difficulty={imgae: 1}", "data.synthetic.difficulty.imgae: not a modality; accepted: audio, image, text"),
])
def test_difficulty_errors_name_the_key(override, expected):
    from mmray.config import ConfigError

    with pytest.raises(ConfigError, match=expected):
        load_experiment(None, [override])


def _features(root: Path, modality: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, is_train) of every sample of one modality, as preprocessing makes them."""
    with open(root / "index.csv") as f:
        rows = list(csv.DictReader(f))
    if modality == "image":
        x = [image_features(load_image(root / "image" / f"{r['id']}.png"), ImageFeatures(size=16))
             for r in rows]
    else:
        x = [audio_features(load_audio(root / "audio" / f"{r['id']}.wav", 8000, 0.25),
                            AudioFeatures(seconds=0.25)) for r in rows]
    return (torch.tensor(np.stack(x)), torch.tensor([int(r["label"]) for r in rows]),
            torch.tensor([r["split"] == "train" for r in rows]))



def _steps_to_learn(x, y, train, threshold: float, steps: int,
                    stop: bool = False) -> tuple[int | None, float]:
    """A small CNN trained alone with Adam (cosine decay over `steps`, batch 32): the first step
    (checked every 5) at which its held-out accuracy reaches `threshold`, and its accuracy at
    the end (or at that step, with `stop`)."""
    torch.manual_seed(0)
    net = nn.Sequential(SmallCNN(x.shape[1], 8, 16), nn.Linear(16, 4))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(0)
    xtr, ytr, xte, yte = x[train], y[train], x[~train], y[~train]
    reached, step, acc = None, 0, 0.0
    while step < steps:
        for idx in torch.randperm(len(ytr), generator=order).split(32)[: steps - step]:
            net.train()
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 5 == 0 or step == steps:
                net.eval()
                with torch.no_grad():
                    acc = float((net(xte).argmax(1) == yte).float().mean())
                reached = step if reached is None and acc >= threshold else reached
                if stop and reached:
                    return reached, acc
    return reached, acc


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_difficulty_takes_more_steps_to_the_same_ceiling(tmp_path, modality, one_thread):
    """Strength 1 (ceiling 1.0): difficulty 1 (the class in a pair of sub-patterns) takes at least
    twice the steps of difficulty 0 to 90% held-out accuracy, and still gets to about 1.0.
    Measured (steps, final accuracy): image 20 -> 90 (0.96), audio 30 -> 80 (1.0); at
    difficulty 2 neither reaches 90% in 400 steps."""
    runs = {}
    for k in (0, 1):
        root = generate(_cfg(num_samples=600, splits=[0.6, 0.1, 0.3], strength={"audio": 1.0, "image": 1.0},
                             difficulty={modality: k}), tmp_path / str(k))
        runs[k] = _steps_to_learn(*_features(root, modality), threshold=0.9, steps=400, stop=k == 0)
    (easy, _), (hard, hard_acc) = runs[0], runs[1]
    assert easy is not None and hard is not None and hard >= 2 * easy, runs
    assert hard_acc >= 0.93, runs  # 240 held-out samples
