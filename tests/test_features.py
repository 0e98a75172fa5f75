"""Featurizers: shapes, normalisation, stable token ids, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmray.data.features import (
    AudioFeatures,
    ImageFeatures,
    TextFeatures,
    audio_features,
    image_features,
    load_audio,
    load_image,
    tokenize,
)


def _wav(path, sr=8000, seconds=0.5, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def test_load_audio_crops_pads_and_resamples(tmp_path):
    p = _wav(tmp_path / "a.wav", sr=16000, seconds=0.5)
    assert load_audio(p, 16000, 0.25).shape == (4000,)
    padded = load_audio(p, 16000, 1.0)
    assert padded.shape == (16000,) and np.all(padded[8000:] == 0)
    assert load_audio(p, 8000, 0.5).shape == (4000,)  # resampled 16 kHz -> 8 kHz


@pytest.mark.parametrize("kind, bins", [("fbank", 32), ("logmel", 32), ("stft", 129)])
def test_audio_feature_shapes(tmp_path, kind, bins):
    wave = load_audio(_wav(tmp_path / "a.wav"), 8000, 0.5)
    cfg = AudioFeatures(kind=kind, sample_rate=8000, seconds=0.5, n_mels=32, n_fft=256, hop_length=128)
    x = audio_features(wave, cfg)
    assert x.dtype == np.float32 and x.ndim == 3 and x.shape[0] == 1 and x.shape[2] == bins
    assert np.isfinite(x).all()


def test_audio_normalisation_is_applied():
    wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    raw = audio_features(wave, AudioFeatures())
    norm = audio_features(wave, AudioFeatures(mean=-4.0, std=2.0))
    np.testing.assert_allclose(norm, (raw + 4.0) / 2.0, rtol=1e-5, atol=1e-5)


def test_image_features_resize_and_normalise(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 128)).save(tmp_path / "i.png")
    x = image_features(load_image(tmp_path / "i.png"), ImageFeatures(size=16, mean=[0.5] * 3, std=[0.5] * 3))
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -1.0, (128 / 255 - 0.5) / 0.5], atol=1e-5)


def test_tokenize_is_stable_padded_and_truncated():
    cfg = TextFeatures(vocab_size=100, max_tokens=5)
    a = tokenize("The cat, the CAT!", cfg)
    assert a.dtype == np.int64 and a.shape == (5,)
    assert a[0] == a[2] and a[1] == a[3] and a[4] == 0 and np.all(a[:4] > 0) and np.all(a < 100)
    assert tokenize("one two three four five six seven", cfg).tolist() == tokenize(
        "one two three four five", cfg).tolist()
    assert tokenize("the", cfg)[0] == 1 + 0x3C456DE6 % 99  # crc32("the"): same in every process


def test_corrupt_files_are_named(tmp_path):
    bad_wav = tmp_path / "bad.wav"
    bad_wav.write_bytes(b"RIFF not really a wave")
    with pytest.raises(ValueError, match="bad.wav"):
        load_audio(bad_wav, 8000, 0.5)
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(bad_png)
    with pytest.raises(ValueError, match="absent.wav"):
        load_audio(tmp_path / "absent.wav", 8000, 0.5)
