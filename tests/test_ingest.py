"""Training ingest (`mmray.data.codec`, `mmray.data.ingest`): what the shards store and how it
reads back, augmentation random per (seed, epoch, sample), a new permutation of all rows every
epoch, and cached and streamed reads alike. Shards are written here with pyarrow in the layout
preprocessing writes (Ray-free); `test_preprocess.py` covers Ray's own writes."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray.data import codec, ingest
from mmray.data.features import (
    AudioFeatures,
    ImageFeatures,
    audio_features,
    image_features,
    load_image,
)
from mmray.data.preprocess import _params, _version
from mmray.data.spec import DatasetSpec, ModalitySpec

from helpers import data_config

AUDIO = AudioFeatures(kind="fbank", sample_rate=8000, seconds=0.25, n_mels=16)
IMAGE = ImageFeatures(size=16)
CLASSES, PER_CLASS = 4, 100


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour gradients plus mild noise: compresses like a photo, not like noise."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)),
                     np.sin(4 * (x + y))], axis=-1)
    pixels = 128 + 90 * base + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _audio_shape() -> tuple[int, ...]:
    return audio_features(np.zeros(int(AUDIO.seconds * AUDIO.sample_rate), np.float32), AUDIO).shape


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _shards(folder, image_codec: str = "jpeg", rows_per_file: int = 64, row_group: int = 8,
            seed: int = 0, per_class: int = PER_CLASS):
    """A train split of CLASSES × per_class rows sorted by class (as a class-by-class folder
    walk lists them), images 24 × 20 px and 0.4 s clips; returns (version dir, manifest)."""
    rng = np.random.default_rng(seed)
    n = CLASSES * per_class
    wave_len = int(0.4 * AUDIO.sample_rate)
    spec = DatasetSpec("toy", {"image": ModalitySpec("image", (3, IMAGE.size, IMAGE.size)),
                               "audio": ModalitySpec("audio", _audio_shape())},
                       CLASSES)
    images = [_photo(rng, 24, 20) for _ in range(n)]
    if image_codec == "jpeg":
        image_col = pa.array([codec.pack([_jpeg(im)]) for im in images], pa.binary())
    else:
        flat = np.stack([codec.encode_uint8(im, IMAGE) for im in images]).reshape(n, -1)
        image_col = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    waves = [0.3 * np.sin(np.arange(wave_len) * (0.05 + 0.01 * k)) for k in range(n)]
    table = pa.table({"id": [f"c{k // per_class}-{k:04d}" for k in range(n)],
                      "label": np.repeat(np.arange(CLASSES), per_class),
                      "image": image_col,
                      "audio": pa.array([codec.encode_pcm16(w) for w in waves], pa.binary())})
    version = folder / "v1"
    (version / "train").mkdir(parents=True)
    for k, start in enumerate(range(0, n, rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), version / "train" / f"part-{k:05d}.parquet",
                       row_group_size=row_group)
    data = data_config("synthetic", folder, folder, "data.image.size=16")
    data.image, data.audio = IMAGE, AUDIO
    encs = {"image": codec.encodings(spec.modalities, data)["image"] | {"codec": image_codec},
            "audio": {"codec": "pcm16", "sample_rate": AUDIO.sample_rate, "store_seconds": 0.4}}
    manifest = {"version": "v1", "spec": spec.to_dict(), "rows": {"train": n},
                "params": {"image": asdict(IMAGE), "audio": asdict(AUDIO), "encodings": encs}}
    (version / "manifest.json").write_text(json.dumps(manifest))
    return version, manifest


def _reader(version, manifest, augment=None, cache=True, **kw) -> ingest.SplitReader:
    rows = ingest.TableRows(ingest.read_table(version, "train")) if cache else ingest.ParquetRows(version, "train")
    return ingest.SplitReader(rows, ingest.Decoder(manifest, augment), "train",
                              **{"batch_size": 32, "seed": 0, **kw})


CROP = codec.Augment(image_train="random_resized_crop", flip=True)


# -- what the shards store -------------------------------------------------------------------

def test_a_jpeg_near_the_store_size_is_kept_byte_for_byte_and_decodes_as_its_features(tmp_path):
    path = tmp_path / "small.jpg"
    path.write_bytes(_jpeg(_photo(np.random.default_rng(1), 24, 20)))
    stored = codec.encode_jpeg(path, IMAGE)
    assert stored == path.read_bytes()
    ms = ModalitySpec("image", (3, 16, 16))
    out = codec.decode(codec.pack([stored]), ms, {"codec": "jpeg"}, _feats(), codec.Augment(), None)
    np.testing.assert_array_equal(out, image_features(load_image(path), IMAGE))


def _feats():
    from types import SimpleNamespace

    return SimpleNamespace(image=IMAGE, audio=AUDIO)


def test_a_large_image_is_reencoded_at_the_store_size_within_the_stated_tolerance(tmp_path):
    """Tolerance: the decoded model input differs from the source's by at most 0.02 (mean) and
    0.25 (max) in [0, 1] pixel units: JPEG at quality 90 after a resize to the store size."""
    cfg = ImageFeatures(size=64, quality=90)  # store side 73
    src = tmp_path / "large.png"
    _photo(np.random.default_rng(2), 400, 300).save(src)
    stored = codec.encode_jpeg(src, cfg)
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == "JPEG" and min(img.size) == cfg.store_side() == 73
    assert len(stored) < src.stat().st_size / 10
    from types import SimpleNamespace

    got = codec.decode(codec.pack([stored]), ModalitySpec("image", (3, 64, 64)), {"codec": "jpeg"},
                       SimpleNamespace(image=cfg, audio=AUDIO), codec.Augment(), None)
    want = image_features(load_image(src), cfg)
    err = np.abs(got - want) * np.asarray(cfg.std, dtype=np.float32)[:, None, None]  # back to [0, 1]
    assert err.mean() <= 0.02 and err.max() <= 0.25, (err.mean(), err.max())


def test_uint8_images_and_pcm16_audio_read_back_exactly_as_the_float32_features(tmp_path):
    img = _photo(np.random.default_rng(3), 24, 20)
    ms = ModalitySpec("image", (6, 16, 16))  # two frames
    stored = np.concatenate([codec.encode_uint8(img, IMAGE), codec.encode_uint8(img.rotate(90), IMAGE)])
    assert stored.dtype == np.uint8 and stored.shape == (6, 16, 16)
    got = codec.decode(stored, ms, {"codec": "uint8"}, _feats(), codec.Augment(), None)
    want = np.concatenate([image_features(img, IMAGE), image_features(img.rotate(90), IMAGE)])
    np.testing.assert_array_equal(got, want)
    # A PCM-16 source (as WAV files are) at the target rate is stored exactly.
    ints = np.random.default_rng(4).integers(-20000, 20000, 1500).astype(np.int16)
    wave = ints.astype(np.float32) / 32768
    assert codec.encode_pcm16(wave) == ints.astype("<i2").tobytes()
    padded = np.zeros(int(AUDIO.seconds * AUDIO.sample_rate), np.float32)
    padded[:1500] = wave
    got = codec.decode(codec.encode_pcm16(wave), ModalitySpec("audio", (1,)), {"codec": "pcm16"},
                       _feats(), codec.Augment(), None)
    np.testing.assert_array_equal(got, audio_features(padded, AUDIO))
    # A float waveform is within half a 16-bit step.
    x = np.random.default_rng(5).uniform(-1, 1, 1000).astype(np.float32)
    assert np.abs(codec.decode_pcm16(codec.encode_pcm16(x)) - x).max() <= 0.5 / 32768 + 1e-9


def test_the_manifest_records_each_encoding_and_the_data_version_changes_with_it(tmp_path):
    from mmray.data.sources import get_source

    spec = DatasetSpec("toy", {"a": ModalitySpec("audio", (1, 626, 129)), "v": ModalitySpec("image", (3, 224, 224)),
                               "t": ModalitySpec("text", (8,), 100)}, 2)

    def version(*overrides):
        data = data_config("synthetic", tmp_path, tmp_path, *overrides)
        params = _params(data, spec)
        return params["encodings"], _version(get_source("synthetic").name, tmp_path, params, {"files": "x"})

    encs, v = version("data.image.size=224")
    assert encs == {"a": {"codec": "pcm16", "sample_rate": 8000, "store_seconds": 0.5},
                    "v": {"codec": "jpeg", "quality": 90, "store_size": 256}, "t": {"codec": "raw"}}
    assert version("data.image.size=32")[0]["v"] == {"codec": "uint8"}  # auto: small images
    # auto audio: the waveform when it is smaller than the float32 features, else the features.
    assert AudioFeatures(sample_rate=16000, seconds=5.0).stored_as((1, 626, 129)) == "pcm16"
    assert AudioFeatures(sample_rate=8000, seconds=0.5).stored_as((1, 30, 32)) == "float32"
    others = {version("data.image.size=224", o)[1] for o in (
        "data.image.encoding=float32", "data.image.quality=80", "data.image.store_size=300",
        "data.audio.encoding=float16", "data.audio.store_seconds=2.0")}
    assert v not in others and len(others) == 5
    assert version("data.image.size=224", "data.augment.flip=true")[1] == v  # read-time only


def test_shards_without_encodings_read_as_before(tmp_path):
    manifest = {"version": "old", "spec": DatasetSpec("toy", {"x": ModalitySpec("vector", (3,))}, 2).to_dict(),
                "params": {}}
    cols = {"id": np.array(["a", "b"], dtype=object), "label": np.array([0, 1]),
            "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    out = ingest.Decoder(manifest, CROP)(cols, train=True)
    np.testing.assert_array_equal(out["x"], cols["x"])


def test_augmenting_shards_that_hold_float32_features_is_refused_naming_the_encoding():
    manifest = {"version": "f32", "spec": DatasetSpec("toy", {"v": ModalitySpec("image", (3, 8, 8))}, 2).to_dict(),
                "params": {"encodings": {"v": {"codec": "float32"}}}}
    with pytest.raises(ValueError, match=r"image_train=random_resized_crop needs images stored as jpeg or "
                                         r"uint8; the shards at version f32 store 'v' as float32"):
        ingest.Decoder(manifest, CROP)
    with pytest.raises(ValueError, match="audio_crop=random needs audio stored as pcm16"):
        ingest.Decoder({**manifest, "spec": DatasetSpec("toy", {"a": ModalitySpec("audio", (1, 4, 4))}, 2).to_dict(),
                        "params": {"encodings": {"a": {"codec": "float16"}}}}, codec.Augment(audio_crop="random"))


# -- augmentation ----------------------------------------------------------------------------

def _by_id(reader, epoch) -> dict[str, dict]:
    return {sid: {m: cols[m][i] for m in ("image", "audio")}
            for cols in reader.columns(epoch) for i, sid in enumerate(cols["id"])}


def test_crops_differ_across_epochs_and_seeds_and_repeat_exactly_for_the_same_ones(tmp_path):
    version, manifest = _shards(tmp_path)
    aug = codec.Augment(image_train="random_resized_crop", flip=True, audio_crop="random")
    e0, e1 = _by_id(_reader(version, manifest, aug), 0), _by_id(_reader(version, manifest, aug), 1)
    other_seed = _by_id(_reader(version, manifest, aug, seed=1), 0)
    ids = sorted(e0)
    assert len(ids) == CLASSES * PER_CLASS
    same_epoch = [np.array_equal(e0[i]["image"], e1[i]["image"]) for i in ids]
    same_seed = [np.array_equal(e0[i]["image"], other_seed[i]["image"]) for i in ids]
    assert sum(same_epoch) <= 2 and sum(same_seed) <= 2  # a draw may rarely repeat, not often
    # The stored clips are longer (0.4 s) than the window (0.25 s): random windows move.
    assert sum(np.array_equal(e0[i]["audio"], e1[i]["audio"]) for i in ids) <= 10
    # Resumed: a fresh reader, another batch size, the streamed rows, another worker count:
    # the same sample in the same epoch gets the same crop.
    again = _by_id(_reader(version, manifest, aug, cache=False, batch_size=7, threads=2), 1)
    for i in ids:
        np.testing.assert_array_equal(again[i]["image"], e1[i]["image"])
        np.testing.assert_array_equal(again[i]["audio"], e1[i]["audio"])
    halves = [_by_id(_reader(version, manifest, aug, rank=r, world=2), 1) for r in (0, 1)]
    for part in halves:
        for i, x in part.items():
            np.testing.assert_array_equal(x["image"], e1[i]["image"])


def test_eval_reads_are_deterministic_and_never_augmented(tmp_path):
    version, manifest = _shards(tmp_path)

    def eval_read(aug):
        rows = ingest.TableRows(ingest.read_table(version, "train"))
        reader = ingest.SplitReader(rows, ingest.Decoder(manifest, aug), "val", batch_size=50, seed=0)
        return np.concatenate([c["image"] for c in reader.columns(epoch=3)])

    plain = eval_read(None)
    np.testing.assert_array_equal(eval_read(CROP), plain)
    np.testing.assert_array_equal(eval_read(CROP), plain)
    train = np.concatenate([c["image"] for c in _reader(version, manifest, CROP, shuffle=False).columns(0)])
    assert not np.array_equal(train, plain)


def test_random_resized_crop_draws_boxes_within_the_scale_and_ratio_bounds():
    rng = np.random.default_rng(0)
    aug = codec.Augment(image_train="random_resized_crop", crop_scale=[0.25, 0.5], crop_ratio=[0.5, 2.0])
    for _ in range(200):
        left, top, right, bottom = codec.crop_box(200, 100, aug, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        assert 0.24 <= w * h / 20000 <= 0.51 and 0.49 <= w / h <= 2.05


# -- row order -------------------------------------------------------------------------------

def test_each_epoch_is_a_new_permutation_whose_batches_mix_the_class_sorted_rows(tmp_path):
    """Bound, for batches of 32 from 4 balanced classes of 500 rows stored class by class: each
    batch within total variation 0.45 of the global class histogram, 0.2 on average. Simulated
    (1,000 seeds), a uniform permutation gives at most 0.41 and 0.15 on average; the stored order
    0.75 throughout; a 256-row local shuffle buffer (the ingest before) a max of 0.75 and a mean
    of 0.55."""
    per_class = 500
    version, manifest = _shards(tmp_path, image_codec="uint8", rows_per_file=256, per_class=per_class)
    reader = _reader(version, manifest)

    def epoch(e, r=reader):
        return [(list(c["id"]), c["label"]) for c in r.columns(e)]

    def tv(labels):
        hist = np.bincount(labels, minlength=CLASSES) / len(labels)
        return 0.5 * np.abs(hist - 1 / CLASSES).sum()

    e0, e1 = epoch(0), epoch(1)
    for batches in (e0, e1):
        ids = [i for b, _ in batches for i in b]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == CLASSES * per_class
        full = [tv(labels) for _, labels in batches if len(labels) == 32]
        assert max(full) <= 0.45 and np.mean(full) <= 0.2, (max(full), np.mean(full))
    assert [b for b, _ in e0] != [b for b, _ in e1]
    # Resumed from a checkpoint: a new reader, the streamed rows, the same order.
    assert [b for b, _ in epoch(1, _reader(version, manifest, cache=False))] == [b for b, _ in e1]
    # The shards' order when shuffling is off.
    off = [i for b, _ in epoch(0, _reader(version, manifest, shuffle=False)) for i in b]
    assert off == sorted(off)


def test_workers_take_every_wth_row_so_their_batches_make_one_global_batch(tmp_path):
    version, manifest = _shards(tmp_path)
    single = [list(c["id"]) for c in _reader(version, manifest, batch_size=64).columns(2)]
    parts = [[list(c["id"]) for c in _reader(version, manifest, batch_size=32, rank=r, world=2).columns(2)]
             for r in (0, 1)]
    assert len(parts[0]) == len(parts[1])
    for step, global_batch in enumerate(single):
        assert sorted(parts[0][step] + parts[1][step]) == sorted(global_batch)
    # Val and test: every row once, in file order, in contiguous parts.
    rows = ingest.TableRows(ingest.read_table(version, "train"))
    val = [ingest.epoch_indices(rows.n, "val", 0, 0, r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(val), np.arange(rows.n))


def test_streamed_and_cached_reads_give_the_same_batches(tmp_path):
    version, manifest = _shards(tmp_path, image_codec="uint8", rows_per_file=48, row_group=5)
    streamed = ingest.ParquetRows(version, "train")
    assert streamed.n == CLASSES * PER_CLASS and len(streamed.groups) > 40
    for cached_batch, streamed_batch in zip(_reader(version, manifest, CROP).batches(4),
                                            _reader(version, manifest, CROP, cache=False, threads=2).batches(4)):
        assert cached_batch["id"] == streamed_batch["id"]
        for m in ("image", "audio"):
            assert cached_batch["inputs"][m].equal(streamed_batch["inputs"][m])
        assert cached_batch["label"].equal(streamed_batch["label"])


def test_auto_caches_a_split_up_to_an_eighth_of_the_object_store():
    gib = 2**30
    assert ingest.choose_cache("auto", gib, 8 * gib) and not ingest.choose_cache("auto", gib + 1, 8 * gib)
    assert ingest.choose_cache("cache", 100 * gib, gib) and not ingest.choose_cache("stream", 1, gib)
