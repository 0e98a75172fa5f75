"""How each modality is stored in the shards, and how a stored value becomes the model's input.

Preprocessing (`Featurizer`) calls `encode`; reading (`mmray.data.ingest`) calls `decode`, with
the train-time augmentation of `Augment` drawn from a per-sample generator. What each modality is
stored as is recorded in the manifest (`encodings`, also part of the data version):

- image: ``jpeg`` (frames packed into one binary value, see `pack`), ``uint8`` (the resized image,
  a (3·frames, size, size) tensor) or ``float32`` (the normalised features);
- audio: ``pcm16`` (the waveform at the target rate, unpadded, as little-endian int16 bytes),
  ``float16`` or ``float32`` (the features);
- depth, text, vector: ``raw`` (the features or token ids, as before).

A manifest without encodings (shards written before they existed) reads as ``raw`` throughout.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mmray.config import bounds
from mmray.data import features as F
from mmray.data.spec import ModalitySpec


@dataclass
class Augment:
    """Train-time transforms applied when batches are read (`data.augment`; not a shard parameter,
    so changing it reuses the shards). Draws are random per (seed, epoch, sample): a resumed run
    sees exactly the crops an uninterrupted one would. Val and test are never augmented."""

    # random_resized_crop: torchvision's RandomResizedCrop (a crop of `crop_scale` of the area at
    # an aspect ratio in `crop_ratio`, log-uniform, resized to size × size; each frame of a clip
    # draws its own, as the CREMA-D references transform each frame on its own); none: the eval
    # transform.
    image_train: Literal["none", "random_resized_crop"] = "none"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    # Horizontal flip with probability 0.5, in train.
    flip: bool = False
    # Eval (and train without a crop): resize to size × size (aspect not kept, the CREMA-D
    # references' Resize((224, 224))); center_crop: shorter side to size / center_fraction, then
    # the central size × size (Resize(256) + CenterCrop(224) at 0.875).
    image_eval: Literal["resize", "center_crop"] = "resize"
    center_fraction: float = field(default=0.875, metadata=bounds(0.1, 1.0))
    # The audio window in train: start (the clip's first `seconds`) or random (anywhere in the
    # stored clip, `data.audio.store_seconds`); eval always reads from the start.
    audio_crop: Literal["start", "random"] = "start"

    def validate(self, path: str, errors: list[str]) -> None:
        lo, hi = (self.crop_scale + [0, 0])[:2]
        if len(self.crop_scale) != 2 or not 0 < lo <= hi <= 1:
            errors.append(f"{path}.crop_scale: {self.crop_scale} must be [lo, hi] with 0 < lo <= hi <= 1")
        lo, hi = (self.crop_ratio + [0, 0])[:2]
        if len(self.crop_ratio) != 2 or not 0 < lo <= hi:
            errors.append(f"{path}.crop_ratio: {self.crop_ratio} must be [lo, hi] with 0 < lo <= hi")


def encodings(modalities: dict[str, ModalitySpec], cfg) -> dict[str, dict]:
    """What the shards store per modality, with the parameters that decide it (`cfg`: the
    DataConfig). Written into the manifest."""
    out = {}
    for m, ms in modalities.items():
        if ms.kind == "image":
            codec = cfg.image.stored_as()
            out[m] = {"codec": codec}
            if codec == "jpeg":
                out[m].update(quality=cfg.image.quality, store_size=cfg.image.store_side())
        elif ms.kind == "audio":
            out[m] = {"codec": cfg.audio.stored_as(ms.shape)}
            if out[m]["codec"] == "pcm16":
                out[m].update(sample_rate=cfg.audio.sample_rate,
                              store_seconds=cfg.audio.store_seconds or cfg.audio.seconds)
        else:
            out[m] = {"codec": "raw"}
    return out


def stored_column(ms: ModalitySpec, enc: dict) -> tuple[type | None, tuple[int, ...]]:
    """(numpy dtype, per-sample shape) of a modality's shard column; dtype None: binary."""
    codec = enc["codec"]
    if codec in ("jpeg", "pcm16"):
        return None, ()
    if codec == "uint8":
        return np.uint8, ms.shape
    if codec == "float16":
        return np.float16, ms.shape
    return (np.int64 if ms.kind == "text" else np.float32), ms.shape


def pack(blobs: list[bytes]) -> bytes:
    """Several encoded frames as one value: count, lengths (uint32 LE), then the bytes."""
    return struct.pack(f"<I{len(blobs)}I", len(blobs), *map(len, blobs)) + b"".join(blobs)


def unpack(value: bytes) -> list[bytes]:
    (n,) = struct.unpack_from("<I", value)
    lengths = struct.unpack_from(f"<{n}I", value, 4)
    out, at = [], 4 + 4 * n
    for k in lengths:
        out.append(value[at:at + k])
        at += k
    return out


def encode_jpeg(path: str | Path, cfg: F.ImageFeatures) -> bytes:
    """The file's own bytes when it is a JPEG or PNG near the store size (decoded once here, so
    a corrupt file fails at preprocessing), else resized to the store size and re-encoded."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, (w, h) = img.format, img.size
            side = cfg.store_side()
            if fmt in ("JPEG", "PNG") and min(w, h) <= 1.25 * side:
                return data
            img = img.convert("RGB")
            scale = side / min(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=cfg.quality)
            return buf.getvalue()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot read image file {path}: {e}") from None


def encode_uint8(img: Image.Image, cfg: F.ImageFeatures) -> np.ndarray:
    """(3, size, size) uint8: the resize `features.image_features` does, before normalising."""
    return np.asarray(img.resize((cfg.size, cfg.size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)


def encode_pcm16(wave: np.ndarray) -> bytes:
    return np.clip(np.round(wave * 32768.0), -32768, 32767).astype("<i2").tobytes()


def decode_pcm16(value: bytes) -> np.ndarray:
    return np.frombuffer(value, dtype="<i2").astype(np.float32) / 32768.0


def _normalise(img: Image.Image, cfg: F.ImageFeatures) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def crop_box(w: int, h: int, aug: Augment, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, right, bottom): ten tries at a random area and
    log-uniform aspect ratio, else the central crop at the nearest allowed ratio."""
    area = w * h
    log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    for _ in range(10):
        target = area * rng.uniform(aug.crop_scale[0], aug.crop_scale[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    ratio = w / h
    if ratio < aug.crop_ratio[0]:
        cw, ch = w, round(w / aug.crop_ratio[0])
    elif ratio > aug.crop_ratio[1]:
        cw, ch = round(h * aug.crop_ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def transform_image(img: Image.Image, cfg: F.ImageFeatures, aug: Augment,
                    rng: np.random.Generator | None) -> np.ndarray:
    """(3, size, size) float32 from a decoded image: the train transform when `rng` is given,
    else the eval transform."""
    img = img.convert("RGB")
    size = cfg.size
    if rng is not None and aug.image_train == "random_resized_crop":
        img = img.resize((size, size), Image.BILINEAR, box=crop_box(*img.size, aug, rng))
    elif aug.image_eval == "center_crop":
        w, h = img.size
        short = round(size / aug.center_fraction)
        scale = short / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BILINEAR)
    if rng is not None and aug.flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _normalise(img, cfg)


def _decode_image(value, ms: ModalitySpec, enc: dict, cfg, aug: Augment,
                  rng: np.random.Generator | None) -> np.ndarray:
    if enc["codec"] == "jpeg":
        frames = []
        for blob in unpack(value):
            with Image.open(io.BytesIO(blob)) as img:
                frames.append(img.convert("RGB"))
    else:  # uint8, (3 · frames, size, size)
        arr = np.asarray(value, dtype=np.uint8).reshape(ms.shape)
        frames = [Image.fromarray(np.ascontiguousarray(arr[k:k + 3].transpose(1, 2, 0)), "RGB")
                  for k in range(0, arr.shape[0], 3)]
    return np.concatenate([transform_image(f, cfg.image, aug, rng) for f in frames])


def _decode_audio(value, enc: dict, cfg, aug: Augment, rng: np.random.Generator | None) -> np.ndarray:
    a = cfg.audio
    wave = decode_pcm16(value)
    n = int(round(a.sample_rate * a.seconds))
    start = 0
    if rng is not None and aug.audio_crop == "random" and len(wave) > n:
        start = int(rng.integers(0, len(wave) - n + 1))
    out = np.zeros(n, dtype=np.float32)
    window = wave[start:start + n]
    out[:len(window)] = window
    return F.audio_features(out, a)


def decode(value, ms: ModalitySpec, enc: dict, cfg, aug: Augment,
           rng: np.random.Generator | None) -> np.ndarray:
    """One sample's stored value -> the model's input of shape `ms.shape` (float32, or int64
    token ids). `cfg`: the DataConfig the shards were written with; `rng`: the sample's
    generator in train (augmentation drawn from it), None in eval."""
    codec = enc["codec"]
    if codec in ("jpeg", "uint8"):
        return _decode_image(value, ms, enc, cfg, aug, rng)
    if codec == "pcm16":
        return _decode_audio(value, enc, cfg, aug, rng)
    if codec == "float16":
        return np.asarray(value, dtype=np.float32)
    return np.asarray(value)


def check_augment(aug: Augment, modalities: dict[str, ModalitySpec], encs: dict[str, dict],
                  where: str) -> None:
    """Augmentation asks for shards that keep what it transforms; name the mismatch."""
    for m, ms in modalities.items():
        codec = encs[m]["codec"]
        if ms.kind == "image" and aug.image_train != "none" and codec not in ("jpeg", "uint8"):
            raise ValueError(f"data.augment.image_train={aug.image_train} needs images stored as "
                             f"jpeg or uint8; {where} store {m!r} as {codec} (preprocess again with "
                             "data.image.encoding=auto)")
        if ms.kind == "audio" and aug.audio_crop == "random" and codec != "pcm16":
            raise ValueError(f"data.augment.audio_crop=random needs audio stored as pcm16; {where} "
                             f"store {m!r} as {codec} (preprocess again with data.audio.encoding=pcm16)")
