"""CREMA-D source: labels from clip names, reference CSV and seeded splits, frame folders, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmray.data.features import image_features, load_image
from mmray.data.ingest import read_split
from mmray.data.preprocess import _fingerprint, preprocess
from mmray.data.reader import spec_of
from mmray.data.sources import get_source
from mmray.data.sources.cremad import EMOTIONS
from mmray.data.sources.source import frame_files
from mmray.tune.grid import load_ablation

from helpers import data_config, featurize, ids_by_split, write_noise_wav

SR = 16000
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _clips(per_emotion: int) -> list[str]:
    return [f"{1001 + k}_{('DFA', 'IEO', 'TIE')[k % 3]}_{e}_XX"
            for e in EMOTIONS for k in range(per_emotion)]


def _write(root: Path, clips: list[str], *, frames: int = 3, audio: bool = True) -> Path:
    """The official AudioWAV/ and the references' Image-01-FPS/<clip>/frame_0000k.jpg."""
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (root / "Image-01-FPS").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for clip in clips:
        wav = root / "AudioWAV" / f"{clip}.wav"
        if audio:
            write_noise_wav(wav, rng, 0.5, SR)
        else:
            wav.touch()  # listing reads names only
        folder = root / "Image-01-FPS" / clip
        folder.mkdir(exist_ok=True)
        for k in range(frames):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            Image.new("RGB", (20, 20), color).save(folder / f"frame_{k + 1:05d}.jpg", quality=95)
    return root


def _data(root: Path, tmp_path: Path, *extra: str):
    return data_config("cremad", root, tmp_path, "data.audio.kind=stft", f"data.audio.sample_rate={SR}",
                       "data.audio.seconds=0.5", "data.audio.n_fft=256", "data.audio.hop_length=128",
                       "data.image.size=16", *extra)


def test_labels_come_from_clip_names(tmp_path):
    root = _write(tmp_path / "CREMA-D", _clips(2), frames=0, audio=False)
    (root / "AudioWAV" / "README.txt").write_text("not a clip")  # only *.wav are clips
    data = _data(root, tmp_path)
    items = get_source("cremad").items(data)
    assert [it.id for it in items] == sorted(_clips(2))
    for it in items:
        assert it.label == EMOTIONS.index(it.id.split("_")[2])
        assert it.files == {"audio": str(root.resolve() / "AudioWAV" / f"{it.id}.wav"),
                            "visual": f"{root.resolve() / 'Image-01-FPS' / it.id}/"}
    spec = get_source("cremad").spec(data)
    assert spec.class_names == EMOTIONS == ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
    assert spec.num_classes == 6
    assert spec.modalities["audio"].shape == (1, 63, 129)  # 0.5 s at 16 kHz, n_fft 256, hop 128
    assert spec.modalities["visual"].shape == (3, 16, 16)
    assert get_source("cremad").spec(_data(root, tmp_path, "data.frames=3")).modalities[
        "visual"].shape == (9, 16, 16)
    assert get_source("cremad").index_files(data) == []


def test_seeded_split_is_stratified_and_deterministic(tmp_path):
    root = _write(tmp_path / "CREMA-D", _clips(10), frames=0, audio=False)
    data = _data(root, tmp_path, "data.cremad.test=0.2", "data.cremad.val=0.25")
    items = get_source("cremad").items(data)
    splits = ids_by_split(items)
    for split, per_emotion in (("test", 2), ("val", 2), ("train", 6)):  # val: 0.25 of 8 train
        assert sorted(int(EMOTIONS.index(c.split("_")[2])) for c in splits[split]) == sorted(
            list(range(6)) * per_emotion), split
    assert ids_by_split(get_source("cremad").items(data)) == splits  # same seed, same split
    # Clips rank by a seeded hash of their name: removing an ANG clip moves no other emotion's.
    gone = _clips(10)[0]
    (root / "AudioWAV" / f"{gone}.wav").unlink()
    fewer = ids_by_split(get_source("cremad").items(data))
    assert {c for c in fewer["test"] if "_ANG_" not in c} == {
        c for c in splits["test"] if "_ANG_" not in c}
    other = ids_by_split(get_source("cremad").items(_data(root, tmp_path, "data.cremad.test=0.2",
                                                     "data.cremad.seed=1")))
    assert other["test"] != fewer["test"] and len(other["test"]) == 12


def test_reference_csv_lists_decide_train_and_test(tmp_path):
    clips = _clips(4)
    root = _write(tmp_path / "CREMA-D", clips, frames=0, audio=False)
    test = [c for c in clips if c.startswith("1004_")]  # one per emotion
    train = [c for c in clips if c not in test]
    # As OGM-GE ships them: no header, `clip_name,emotion`; a BOM is tolerated.
    (root / "train.csv").write_text("\ufeff" + "".join(f"{c},{c.split('_')[2]}\n" for c in train))
    (root / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in test))
    data = _data(root, tmp_path, "data.cremad.val=0.34")
    splits = ids_by_split(get_source("cremad").items(data))
    assert sorted(splits["test"]) == sorted(test)
    assert len(splits["val"]) == 6 and set(splits["val"]) <= set(train)  # round(0.34 * 3) per emotion
    assert sorted(splits["train"] + splits["val"]) == sorted(train)
    assert [p.name for p in get_source("cremad").index_files(data)] == ["train.csv", "test.csv"]


@pytest.mark.parametrize("content, expected", [
    ("1001_DFA_ANG_XX,ANG\n1002_DFA_ANG_XX\n", "train.csv line 2: expected 2 columns `clip_name,emotion`"),
    ("clip_name,emotion\n", "train.csv line 1: 'clip_name','emotion' is not a clip name"),
    ("1001_DFA_ANG_XX,SAD\n", "train.csv line 1: '1001_DFA_ANG_XX','SAD' is not a clip name"),
    ("1001_DFA_ANG_XX,ANG\n\n1001_DFA_ANG_XX,ANG\n", "train.csv line 3: clip 1001_DFA_ANG_XX is listed again (first on line 1)"),
])
def test_malformed_lists_name_the_file_and_line(tmp_path, content, expected):
    root = _write(tmp_path / "CREMA-D", [], frames=0)
    (root / "train.csv").write_text(content)
    (root / "test.csv").write_text("1003_DFA_SAD_XX,SAD\n")
    with pytest.raises(ValueError) as e:
        get_source("cremad").items(_data(root, tmp_path))
    assert expected in str(e.value)


def test_layout_errors_name_the_missing_thing(tmp_path):
    root = tmp_path / "CREMA-D"
    with pytest.raises(FileNotFoundError, match="Image-01-FPS"):
        get_source("cremad").items(_data(root, tmp_path))
    (root / "Image-01-FPS").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="AudioWAV"):
        get_source("cremad").items(_data(root, tmp_path))
    with pytest.raises(FileNotFoundError, match="data.cremad.frames_dir"):
        get_source("cremad").items(_data(root, tmp_path, "data.cremad.frames_dir=frames"))
    (root / "AudioWAV").mkdir()
    (root / "AudioWAV" / "1001_DFA_JOY_XX.wav").touch()
    with pytest.raises(ValueError, match=r"1001_DFA_JOY_XX\.wav: not a CREMA-D clip name"):
        get_source("cremad").items(_data(root, tmp_path))
    (root / "AudioWAV" / "1001_DFA_JOY_XX.wav").unlink()
    (root / "test.csv").write_text("1001_DFA_ANG_XX,ANG\n")
    with pytest.raises(FileNotFoundError, match=r"train\.csv is not"):
        get_source("cremad").items(_data(root, tmp_path))


def test_frames_are_evenly_spaced_in_name_order(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for k in (10, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        (folder / f"frame_{k:05d}.jpg").touch()
    (folder / "notes.txt").touch()
    assert [p.name for p in frame_files(f"{folder}/", 3)] == [
        "frame_00001.jpg", "frame_00004.jpg", "frame_00007.jpg"]
    assert [p.name for p in frame_files(f"{folder}/", 1)] == ["frame_00001.jpg"]
    few = tmp_path / "few"
    few.mkdir()
    (few / "frame_00001.jpg").touch()
    (few / "frame_00002.jpg").touch()
    assert [p.name for p in frame_files(f"{few}/", 3)] == [
        "frame_00001.jpg", "frame_00001.jpg", "frame_00002.jpg"]  # fewer frames: repeated
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"frame folder {tmp_path / 'empty'}/ holds no"):
        frame_files(f"{tmp_path / 'empty'}/", 2)
    with pytest.raises(ValueError, match=f"no frame folder {tmp_path / 'absent'}/"):
        frame_files(f"{tmp_path / 'absent'}/", 2)


def test_featurizer_stacks_frames_and_names_a_missing_folder(tmp_path):
    clips = _clips(1)[:3]
    root = _write(tmp_path / "CREMA-D", clips, frames=3)
    data = _data(root, tmp_path, "data.frames=3")
    source = get_source("cremad")
    items = source.items(data)
    missing = Path(items[1].files["visual"])
    for f in missing.iterdir():
        f.unlink()
    missing.rmdir()
    out = featurize(source, data, items)
    assert out["visual"].shape == (3, 9, 16, 16) and out["audio"].shape == (3, 1, 63, 129)
    frames = sorted(Path(items[0].files["visual"]).iterdir())
    expected = np.concatenate([image_features(load_image(f), data.image) for f in frames])
    np.testing.assert_allclose(out["visual"][0], expected)  # frame k in channels 3k..3k+2
    assert list(out["error_file"]) == ["", items[1].files["visual"], ""]
    assert f"no frame folder {items[1].files['visual']}" in out["error"][1]


def test_preprocess_shapes_match_spec_and_bad_clips_are_skipped(ray_local, tmp_path):
    root = _write(tmp_path / "CREMA-D", _clips(2), frames=3)
    bad = root / "Image-01-FPS" / _clips(2)[0]
    for f in bad.iterdir():
        f.unlink()  # a clip whose frames were never extracted
    data = _data(root, tmp_path, "data.frames=2", "data.cremad.test=0.5", "data.skip_corrupt=true")
    bad_split = next(i.split for i in get_source("cremad").items(data) if i.id == bad.name)
    prepared = preprocess(data)
    m = prepared.manifest
    assert m["params"]["frames"] == 2 and m["params"]["modalities"] == {"audio": "audio", "visual": "image"}
    rows = {"train": 6, "test": 6}
    rows[bad_split] -= 1
    assert m["rows"] == rows
    assert [s["id"] for s in m["skipped"]] == [_clips(2)[0]]
    assert m["skipped"][0]["file"] == f"{bad.resolve()}/" and "holds no" in m["skipped"][0]["error"]
    spec = spec_of(m)
    assert spec == get_source("cremad").spec(data)
    assert spec.modalities["visual"].shape == (6, 16, 16)
    for split, n in m["rows"].items():
        cols = read_split(prepared.version_dir, split)
        for mod, ms in spec.modalities.items():
            assert cols[mod].shape == (n, *ms.shape)
        assert [EMOTIONS[y] for y in cols["label"]] == [i.split("_")[2] for i in cols["id"]]
    assert preprocess(data).cache_hit
    # Other frames, another version: the frame files (not the folders) are fingerprinted.
    items = get_source("cremad").items(data)
    before = _fingerprint(get_source("cremad"), data, items)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(bad / "frame_00001.jpg")
    assert _fingerprint(get_source("cremad"), data, items) != before


def test_the_balance_grid_runs_on_cremad_with_one_override_of_the_data_root(ray_local, tmp_path):
    """configs/ablations/balance_cremad.yaml as the sweep builds each trial: every cell (ResNet18
    encoders as configured) trains on CREMA-D files, sized down to seconds."""
    from mmray.config import to_dict
    from mmray.pipeline_support import prepare_data
    from mmray.train.loop import run_local
    from mmray.tune.grid import expand_grid, trial_experiment

    root = _write(tmp_path / "CREMA-D", _clips(4), frames=3)
    shrink = [f"data.data_dir={tmp_path / 'shards'}", "data.audio.seconds=0.25",
              "data.image.size=16", "data.frames=2", "train.epochs=1", "train.batch_size=8",
              "model.feature_dim=16", "data.cremad.test=0.25", "data.cremad.val=0.34",
              "grid.seed=[0]"]
    abl = load_ablation(CONFIGS / "ablations" / "balance_cremad.yaml", [f"data.root={root}", *shrink])
    assert abl.experiment.data.dataset == "cremad" and abl.experiment.model.encoder == "timm"
    prepared = prepare_data(abl.experiment.data)
    assert prepared.manifest["spec"]["modalities"]["visual"]["shape"] == [6, 16, 16]
    base = to_dict(abl.experiment)
    names = []
    for cell in expand_grid(abl.grid):
        cfg = trial_experiment(base, cell, {})
        last = run_local(cfg, prepared.version_dir)[-1]
        names.append((cfg.method.name, cfg.method.preset))
        assert 0.0 <= last["test/acc"] <= 1.0 and "val/acc_visual" in last and "val/acc_audio" in last
        assert set(abl.report.metrics) <= set(last)  # the report's metrics are what runs log
    assert names == [("normal", ""), ("ogm_ge", "reference"), ("ogm_ge", "paper"), ("qmf", "mla"),
                     ("mla", "reference"), ("mla", "reference"), ("mla", "paper")]
