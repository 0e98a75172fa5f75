"""ESC-50 source: meta/esc50.csv, folds, recording-grouped val, class names, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import spec_of
from mmray.data.sources import get_source

from helpers import data_config, write_noise_wav

HEADER = "filename,fold,target,category,esc10,src_file,take\n"
CATEGORIES = ("dog", "rooster", "chirping_birds")
SR = 44100


def _rows(per_fold: int = 2) -> list[tuple[str, int, int, str, str, str]]:
    """(filename, fold, target, category, src_file, take): per fold and class, `per_fold`
    recordings, each cut into clips A and B (the official names: fold-src-take-target.wav)."""
    rows = []
    for fold in range(1, 6):
        for target, cat in enumerate(CATEGORIES):
            for r in range(per_fold):
                src = f"{fold}{target}{r}{'7' * 3}"
                for take in "AB":
                    rows.append((f"{fold}-{src}-{take}-{target}.wav", fold, target, cat, src, take))
    return rows


def _write(root: Path, rows, audio: bool = True) -> Path:
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    lines = [HEADER] + [f"{f},{fold},{t},{c},{t == 0},{s},{k}\n" for f, fold, t, c, s, k in rows]
    (root / "meta" / "esc50.csv").write_text("".join(lines))
    rng = np.random.default_rng(0)
    for f, *_ in rows:
        if audio:
            write_noise_wav(root / "audio" / f, rng, 0.25, SR)
    return root


def _data(root: Path, tmp_path: Path, *extra: str):
    return data_config("esc50", root, tmp_path, "data.audio.sample_rate=16000", "data.audio.seconds=0.25",
                       "data.audio.n_mels=16", "data.audio.n_fft=400", "data.audio.hop_length=160", *extra)


def test_labels_folds_and_class_names(tmp_path):
    rows = _rows()
    root = _write(tmp_path / "ESC-50", rows, audio=False)
    data = _data(root, tmp_path, "data.esc50.test_fold=2", "data.esc50.val=0.5")
    items = get_source("esc50").items(data)
    by_id = {it.id: it for it in items}
    assert len(items) == len(rows)
    for f, fold, target, *_ in rows:
        it = by_id[Path(f).stem]
        assert it.label == target
        assert it.files == {"audio": str(root.resolve() / "audio" / f)}
        assert (it.split == "test") == (fold == 2)
    spec = get_source("esc50").spec(data)
    assert spec.class_names == CATEGORIES and spec.num_classes == 3
    assert spec.modalities["audio"].shape == (1, 23, 16)  # 0.25 s at 16 kHz, 25 ms / 10 ms frames
    assert [p.name for p in get_source("esc50").index_files(data)] == ["esc50.csv"]


def test_val_holds_out_whole_recordings_per_class(tmp_path):
    rows = _rows(per_fold=2)  # 4 training folds x 2 recordings = 8 recordings per class
    root = _write(tmp_path / "ESC-50", rows, audio=False)
    data = _data(root, tmp_path, "data.esc50.val=0.25")
    items = {it.id: it for it in get_source("esc50").items(data)}
    val_src = {s for f, _, _, _, s, _ in rows if items[Path(f).stem].split == "val"}
    for target in range(3):  # round(0.25 * 8) recordings of each class
        assert len({s for f, _, t, _, s, _ in rows if t == target and s in val_src}) == 2
    for f, fold, _, _, src, _ in rows:  # both clips of a held-out recording are val
        assert (items[Path(f).stem].split == "val") == (src in val_src)
        assert fold != 5 or items[Path(f).stem].split == "test"
    again = {it.id: it.split for it in get_source("esc50").items(data)}
    assert again == {k: it.split for k, it in items.items()}
    other = {it.id: it.split for it in get_source("esc50").items(
        _data(root, tmp_path, "data.esc50.val=0.25", "data.esc50.seed=1"))}
    assert other != again


@pytest.mark.parametrize("line, expected", [
    ("1-1-A-0.wav,6,0,dog,False,1,A", "esc50.csv line 2: fold '6' is not one of [1, 2, 3, 4, 5]"),
    ("1-1-A-0.wav,1,x,dog,False,1,A", "esc50.csv line 2: target 'x' is not a class index"),
    ("1-1-A-0.mp3,1,0,dog,False,1,A", "esc50.csv line 2: filename '1-1-A-0.mp3' is not a WAV"),
    ("1-1-A-0.wav,1,0,,False,1,A", "esc50.csv line 2: category and src_file must not be empty"),
])
def test_malformed_rows_name_the_file_line_and_field(tmp_path, line, expected):
    root = _write(tmp_path / "ESC-50", [], audio=False)
    (root / "meta" / "esc50.csv").write_text(HEADER + line + "\n")
    with pytest.raises(ValueError) as e:
        get_source("esc50").items(_data(root, tmp_path))
    assert expected in str(e.value)


def test_inconsistent_or_incomplete_labels_and_layout_errors(tmp_path):
    root = _write(tmp_path / "ESC-50", [], audio=False)
    csv = root / "meta" / "esc50.csv"
    csv.write_text(HEADER + "1-1-A-0.wav,1,0,dog,True,1,A\n1-2-A-0.wav,1,0,cat,True,2,A\n")
    with pytest.raises(ValueError, match="line 3: target 0 is 'cat' here but 'dog' on line 2"):
        get_source("esc50").items(_data(root, tmp_path))
    csv.write_text(HEADER + "1-1-A-0.wav,1,0,dog,True,1,A\n1-1-A-0.wav,2,0,dog,True,1,A\n")
    with pytest.raises(ValueError, match=r"line 3: 1-1-A-0.wav is listed again \(first on line 2\)"):
        get_source("esc50").items(_data(root, tmp_path))
    csv.write_text(HEADER + "1-1-A-0.wav,1,0,dog,True,1,A\n1-2-A-2.wav,1,2,cow,False,2,A\n")
    with pytest.raises(ValueError, match=r"no clip has target\(s\) \[1\]"):
        get_source("esc50").items(_data(root, tmp_path))
    csv.write_text(HEADER + "1-1-A-0.wav,1,0,dog,True,1,A\n")
    with pytest.raises(ValueError, match="data.esc50.test_fold=5: no clip"):
        get_source("esc50").items(_data(root, tmp_path))
    csv.write_text("filename,fold,target\n")
    with pytest.raises(ValueError, match=r"esc50.csv: missing column\(s\) \['category', 'src_file'\]"):
        get_source("esc50").items(_data(root, tmp_path))
    csv.unlink()
    with pytest.raises(FileNotFoundError, match=r"meta/esc50.csv; data.root must be the ESC-50"):
        get_source("esc50").items(_data(root, tmp_path))


def test_preprocess_shapes_match_spec_and_a_missing_wav_is_named(ray_local, tmp_path):
    rows = _rows(per_fold=1)
    root = _write(tmp_path / "ESC-50", rows)
    (root / "audio" / rows[0][0]).unlink()
    data = _data(root, tmp_path)
    with pytest.raises(ValueError, match=f"{root.resolve() / 'audio' / rows[0][0]}"):
        preprocess(data)
    prepared = preprocess(_data(root, tmp_path, "data.skip_corrupt=true"))
    m = prepared.manifest
    assert sum(m["rows"].values()) == len(rows) - 1 and m["rows"]["test"] == 6
    assert [s["id"] for s in m["skipped"]] == [Path(rows[0][0]).stem]
    spec = spec_of(m)
    assert spec.class_names == CATEGORIES
    cols = read_split(prepared.version_dir, "test")
    assert cols["audio"].shape == (6, *spec.modalities["audio"].shape)
    assert sorted(cols["label"]) == [0, 0, 1, 1, 2, 2]
