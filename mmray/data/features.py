"""Decoding and featurizing raw files: pure functions, no Ray, so they are testable and reusable.

Every decode error names the file it came from.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image

from mmray.config import bounds


@dataclass
class AudioFeatures:
    # fbank: torchaudio Kaldi filterbank; logmel: log mel spectrogram; stft: log-magnitude STFT.
    kind: Literal["fbank", "logmel", "stft"] = "fbank"
    sample_rate: int = field(default=8000, metadata=bounds(1000, 192000))
    # Fixed-length crop (or zero pad) in seconds, taken from the start of the clip.
    seconds: float = field(default=0.5, metadata=bounds(0.05, 60.0))
    n_mels: int = field(default=32, metadata=bounds(4, 512))
    n_fft: int = field(default=256, metadata=bounds(16, 16384))
    hop_length: int = field(default=128, metadata=bounds(1, 16384))
    # Per-feature normalisation after the transform: (x - mean) / std.
    mean: float = 0.0
    std: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))
    # How the shards store audio (`mmray.data.ingest` computes the features when reading):
    # pcm16: the waveform at `sample_rate` as 16-bit PCM, unpadded, up to `store_seconds`
    # (features from it are within 16-bit quantisation of the float waveform's, exact for 16-bit
    # sources at that rate; a train-time random crop needs it); float16 / float32: the features
    # themselves (no crop augmentation). auto: pcm16 when the stored clip takes fewer bytes than
    # the float32 features (CREMA-D's 5 s STFT: 160 KB against 323 KB), else float32 (short
    # clips with few mel bins, as the synthetic data's).
    encoding: Literal["auto", "pcm16", "float16", "float32"] = "auto"
    # Seconds of each clip the pcm16 shards keep; 0: `seconds` (all a start crop reads). Longer
    # lets `data.augment.audio_crop=random` pick a window anywhere in the first store_seconds.
    store_seconds: float = field(default=0.0, metadata=bounds(0.0, 600.0))

    def stored_as(self, feature_shape: tuple[int, ...]) -> str:
        """The encoding the shards get (auto resolved by bytes per sample)."""
        if self.encoding != "auto":
            return self.encoding
        pcm = 2 * round(self.sample_rate * (self.store_seconds or self.seconds))
        return "pcm16" if pcm < 4 * math.prod(feature_shape) else "float32"


@dataclass
class ImageFeatures:
    size: int = field(default=32, metadata=bounds(8, 1024))
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # How the shards store images (`mmray.data.ingest` decodes and augments them when reading):
    # jpeg: the source file's bytes when it is a JPEG or PNG whose shorter side is at most
    # 1.25 × store_size, else resized so that its shorter side is store_size and re-encoded as
    # JPEG at `quality`; uint8: resized to size × size, 8 bits per channel (lossless next to the
    # float32 features: the same resize, normalised when read); float32: the normalised features
    # (4 bytes per value, no augmentation). auto: uint8 up to 64 px, else jpeg.
    encoding: Literal["auto", "jpeg", "uint8", "float32"] = "auto"
    quality: int = field(default=90, metadata=bounds(1, 100))
    # Shorter side of a re-encoded JPEG; 0: size × 8/7 (256 for 224), the usual margin a random
    # resized or centre crop takes from.
    store_size: int = field(default=0, metadata=bounds(0, 4096))

    def stored_as(self) -> str:
        """The encoding the shards get (auto resolved)."""
        if self.encoding != "auto":
            return self.encoding
        return "uint8" if self.size <= 64 else "jpeg"

    def store_side(self) -> int:
        return self.store_size or round(self.size * 8 / 7)


@dataclass
class TextFeatures:
    # hash: a stable hash of each lower-cased word into [1, vocab_size), 0 pads (for the small
    # bag-of-embeddings encoder); open_clip: the BPE tokenizer of `open_clip_model`.
    tokenizer: Literal["hash", "open_clip"] = "hash"
    vocab_size: int = field(default=1024, metadata=bounds(8, 10_000_000))
    # Tokens per sample (the context length for open_clip).
    max_tokens: int = field(default=32, metadata=bounds(1, 4096))
    open_clip_model: str = "mmray-tiny"


@dataclass
class DepthFeatures:
    """Depth maps -> normalised disparity (`mmray.data.features.depth_features`).

    With d the depth in metres, clamped to [min_depth, max_depth], a pixel's value is
    (min_depth / d − mean) / std: disparity scaled to (0, 1] (1 at min_depth), then normalised.
    Pixels with no reading (stored 0) are 0 after normalisation.
    """

    # Output size (size × size); nearest-neighbour resize, so no-reading zeros never blend in.
    size: int = field(default=32, metadata=bounds(8, 1024))
    # The stored 16-bit values are the millimetres rotated left by this many bits, undone on
    # reading: 3 for SUN RGB-D's depth PNGs (its toolbox's read3dPoints.m), 0 for plain mm.
    rotate_bits: int = field(default=0, metadata=bounds(0, 15))
    # Depth range in metres: nearer readings count as min_depth, farther ones as max_depth
    # (the SUN RGB-D toolbox caps at 8 m).
    min_depth: float = field(default=0.5, metadata=bounds(0.0, None, lo_open=True))
    max_depth: float = field(default=10.0, metadata=bounds(0.0, None, lo_open=True))
    # Normalisation of the scaled disparity: (x - mean) / std.
    mean: float = 0.0
    std: float = field(default=1.0, metadata=bounds(0.0, None, lo_open=True))

    def validate(self, path: str, errors: list[str]) -> None:
        if self.min_depth >= self.max_depth:
            errors.append(f"{path}.min_depth: {self.min_depth} must be below max_depth "
                          f"({self.max_depth})")


def load_audio(path: str | Path, sample_rate: int, seconds: float, pad: bool = True) -> np.ndarray:
    """Mono float32 waveform at `sample_rate`, cropped from the start to `seconds` and, with
    `pad`, zero-padded to it."""
    try:
        wave, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, ... by format
        raise ValueError(f"cannot read audio file {path}: {e}") from None
    wave = wave.mean(axis=1)
    if sr != sample_rate:
        wave = torchaudio.functional.resample(torch.from_numpy(wave), sr, sample_rate).numpy()
    n = int(round(sample_rate * seconds))
    if not pad:
        return np.ascontiguousarray(wave[:n], dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(wave))] = wave[:n]
    return out


def audio_features(wave: np.ndarray, cfg: AudioFeatures) -> np.ndarray:
    """(1, frames, bins) float32: Kaldi fbank, log-mel, or log-magnitude STFT, then normalised."""
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if cfg.kind == "fbank":
        ms = 1000.0 / cfg.sample_rate
        feats = torchaudio.compliance.kaldi.fbank(
            x.unsqueeze(0), sample_frequency=cfg.sample_rate, num_mel_bins=cfg.n_mels,
            frame_length=cfg.n_fft * ms, frame_shift=cfg.hop_length * ms, dither=0.0,
            htk_compat=True, use_energy=False, window_type="hanning")
    elif cfg.kind == "logmel":
        mel = torchaudio.transforms.MelSpectrogram(cfg.sample_rate, n_fft=cfg.n_fft,
                                                   hop_length=cfg.hop_length, n_mels=cfg.n_mels)
        feats = torch.log(mel(x) + 1e-6).T
    else:
        spec = torch.stft(x, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                          window=torch.hann_window(cfg.n_fft), return_complex=True)
        feats = torch.log(spec.abs() + 1e-6).T
    feats = (feats - cfg.mean) / cfg.std
    return feats.unsqueeze(0).numpy().astype(np.float32)


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot read image file {path}: {e}") from None


def image_features(img: Image.Image, cfg: ImageFeatures) -> np.ndarray:
    """(3, size, size) float32: bilinear resize, scale to [0, 1], normalise per channel."""
    img = img.resize((cfg.size, cfg.size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


# PIL modes of single-channel 16-bit PNGs (by Pillow version and byte order), and of 32-bit ints.
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")


def load_depth(path: str | Path, rotate_bits: int = 0) -> np.ndarray:
    """(H, W) float32 depth in millimetres from a single-channel 16-bit PNG; 0 = no reading.

    `rotate_bits` undoes a left rotation of the stored 16-bit values: SUN RGB-D's PNGs hold the
    millimetres rotated left by 3 bits, which its toolbox reads back as
    bitor(bitshift(v, -3), bitshift(v, 16 - 3)).
    """
    try:
        with Image.open(path) as img:
            mode, arr = img.mode, np.array(img)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ...
        raise ValueError(f"cannot read depth file {path}: {e}") from None
    if mode not in _DEPTH_MODES or arr.ndim != 2 or arr.min() < 0 or arr.max() > 0xFFFF:
        raise ValueError(f"depth file {path}: expected a single-channel 16-bit PNG of millimetres, "
                         f"got PIL mode {mode} with shape {arr.shape}")
    v = arr.astype(np.uint32)
    if rotate_bits:
        v = ((v >> rotate_bits) | (v << (16 - rotate_bits))) & 0xFFFF
    return v.astype(np.float32)


def depth_features(depth_mm: np.ndarray, cfg: DepthFeatures) -> np.ndarray:
    """(1, size, size) float32 normalised disparity (see `mmray.config.DepthFeatures`).

    x = (min_depth / clamp(d, min_depth, max_depth) − mean) / std, d in metres; 0 where d = 0.
    Resized nearest-neighbour first, so a pixel is one reading, never a blend with a hole.
    """
    img = Image.fromarray(np.ascontiguousarray(depth_mm, dtype=np.float32))  # mode "F"
    d = np.asarray(img.resize((cfg.size, cfg.size), Image.NEAREST), dtype=np.float32) / 1000.0
    disparity = cfg.min_depth / np.clip(d, cfg.min_depth, cfg.max_depth)
    out = np.where(d > 0, (disparity - cfg.mean) / cfg.std, 0.0)
    return out[None].astype(np.float32)


_WORD = re.compile(r"[a-z0-9']+")


@functools.lru_cache(maxsize=4)
def _clip_tokenizer(model: str, context_length: int):
    import open_clip

    from mmray.encoders.pretrained import register_tiny_clip

    register_tiny_clip()
    return open_clip.get_tokenizer(model, context_length=context_length)


def tokenize(text: str, cfg: TextFeatures) -> np.ndarray:
    """(max_tokens,) int64 ids: open_clip's BPE, or a stable hash (crc32) of each lower-cased
    word into [1, vocab). Python's own `hash` is salted per process: every worker would differ.
    """
    if cfg.tokenizer == "open_clip":
        return _clip_tokenizer(cfg.open_clip_model, cfg.max_tokens)([text])[0].numpy().astype(np.int64)
    ids = [1 + zlib.crc32(w.encode()) % (cfg.vocab_size - 1) for w in _WORD.findall(text.lower())]
    out = np.zeros(cfg.max_tokens, dtype=np.int64)
    ids = ids[: cfg.max_tokens]
    out[: len(ids)] = ids
    return out


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read text file {path}: {e}") from None
