"""Missing-modality tables (METHODS.md §6): sampling, storage, filling, every method, robustness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmray.data import missing
from mmray.data.features import TextFeatures, tokenize
from mmray.data.missing import MissingConfig, MissingSpec, sample
from mmray.data.reader import spec_of
from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, build_method

IDS = [f"s{i:04d}" for i in range(1000)]
IMAGE_TEXT = ["image", "text"]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7, 0.9])
def test_the_rate_is_met_and_both_never_removes_both(rate):
    present = sample(IDS, IMAGE_TEXT, MissingSpec(rate, "both", 0), "train")
    missing_any = ~present.all(1)
    assert missing_any.sum() == round(rate * len(IDS))
    assert present.any(1).all()  # no sample misses both
    # Half of the samples that miss something miss the image, half the text.
    assert abs(int((~present[:, 0]).sum()) - int((~present[:, 1]).sum())) <= 1


def test_a_modality_type_removes_only_that_modality():
    present = sample(IDS, IMAGE_TEXT, MissingSpec(0.6, "text", 3), "test")
    assert present[:, 0].all() and (~present[:, 1]).sum() == 600


def test_any_spreads_over_three_modalities():
    present = sample(IDS, ["audio", "image", "text"], MissingSpec(0.3, "any", 0), "train")
    assert sorted((~present).sum(0).tolist()) == [100, 100, 100] and present.sum(1).min() == 2


def test_tables_are_deterministic_nested_and_change_with_the_seed():
    spec = MissingSpec(0.5, "both", 7)
    a = sample(IDS, IMAGE_TEXT, spec, "train")
    shuffled = IDS[::-1]  # the listing order does not matter, only the ids
    assert np.array_equal(a, sample(shuffled, IMAGE_TEXT, spec, "train")[::-1])
    assert not np.array_equal(a, sample(IDS, IMAGE_TEXT, MissingSpec(0.5, "both", 8), "train"))
    assert not np.array_equal(a, sample(IDS, IMAGE_TEXT, spec, "test"))  # per split
    low = sample(IDS, IMAGE_TEXT, MissingSpec(0.3, "both", 7), "train")
    assert np.all(a[~low.all(1)] == low[~low.all(1)])  # missing at 0.3 -> missing alike at 0.5


def test_apply_fills_and_sets_the_masks(tmp_path):
    spec = DatasetSpec("t", {"image": ModalitySpec("image", (3, 2, 2)),
                             "text": ModalitySpec("text", (8,), vocab_size=49408),
                             "audio": ModalitySpec("audio", (1, 2, 3))}, 2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "present_image": [True, False, True],
                             "present_text": [False, True, True], "present_audio": [True, True, False]}),
                   path)
    text_cfg = TextFeatures(tokenizer="open_clip", max_tokens=8)
    fills = missing.fill_values({"params": {"text": dataclasses.asdict(text_cfg)}}, spec)
    table = missing.MissingTable(path, spec, fills)
    cols = {"id": np.array(["c", "a", "b"], dtype=object), "label": np.array([0, 1, 0]),
            "image": np.zeros((3, 3, 2, 2), np.float32), "text": np.full((3, 8), 5),
            "audio": np.full((3, 1, 2, 3), 2.0, np.float32)}
    out = table.apply(cols)
    assert out["present_image"].tolist() == [True, True, False]  # by id, not by position
    assert np.all(out["image"][2] == 1.0) and np.all(out["image"][:2] == 0.0)
    assert np.array_equal(out["text"][1], tokenize("", text_cfg)) and out["text"][1][0] == 49406
    assert np.all(out["audio"][0] == 0.0) and np.all(out["audio"][1:] == 2.0)
    assert np.all(cols["image"] == 0.0)  # the input columns are not modified
    with pytest.raises(KeyError, match="'zz' is not in the missing table"):
        table.apply({**cols, "id": np.array(["zz"], dtype=object)})


def test_types_are_checked_against_the_dataset():
    spec = DatasetSpec("d", {"audio": ModalitySpec("audio", (1, 4, 4)),
                             "image": ModalitySpec("image", (3, 4, 4))}, 2)
    missing.check(MissingConfig(type="image"), spec)
    with pytest.raises(ValueError, match=r"data.missing.type: 'text' is not accepted for dataset "
                                         r"'d'; accepted: both, any, audio, image"):
        missing.check(MissingConfig(type="text"), spec)
    with pytest.raises(ValueError, match=r"data.missing.eval_types\[1\]: 'depth'"):
        missing.check(MissingConfig(eval_types=["both", "depth"]), spec)


# Every method ignores what an absent modality's input holds ---------------------------------------

SPEC2 = DatasetSpec("two", {"audio": ModalitySpec("audio", (1, 12, 12)),
                            "image": ModalitySpec("image", (3, 12, 12))}, 3)
# Image-text at the tiny CLIP's sizes, for the methods built on CLIP's two towers (MAP, REP).
SPEC_IT = DatasetSpec("it", {"image": ModalitySpec("image", (3, 32, 32)),
                             "text": ModalitySpec("text", (32,), vocab_size=49408)}, 3)


def _input(spec: ModalitySpec, g: torch.Generator) -> torch.Tensor:
    if spec.kind == "text":
        return torch.randint(1, 49407, (6, *spec.shape), generator=g)
    return torch.randn(6, *spec.shape, generator=g)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("which", [0, 1])
def test_every_method_ignores_an_absent_modality(name, which):
    spec = next(s for s in (SPEC2, SPEC_IT) if not METHODS[name].unsupported(s))
    absent = list(spec.modalities)[which]
    torch.manual_seed(0)
    method = build_method(spec, ModelConfig(width=4, feature_dim=8), MethodConfig(name)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {m: _input(s, g) for m, s in spec.modalities.items()}
    present = {m: torch.ones(6, dtype=torch.bool) for m in inputs}
    present[absent][::2] = False  # samples 0, 2, 4 miss it
    batch = {"inputs": inputs, "present": present, "label": torch.zeros(6, dtype=torch.long),
             "id": [str(i) for i in range(6)]}
    changed = {m: x.clone() for m, x in inputs.items()}
    changed[absent] = _input(spec.modalities[absent], g)  # other content where it is absent
    with torch.no_grad():
        a, b = (_outputs(method.predict({**batch, "inputs": x})) for x in (inputs, changed))
    torch.testing.assert_close(a[::2], b[::2])  # absent: its input does not matter
    if absent in method.modalities:  # a modality the method reads (M2PT reads one)
        assert not torch.allclose(a[1::2], b[1::2])  # present: it does


def _outputs(out) -> torch.Tensor:
    """Fused and per-modality logits side by side (B, C · (1 + M))."""
    return torch.cat([out.logits, *(out.per_modality[m] for m in sorted(out.per_modality))], 1)


def test_runs_store_the_tables_share_them_and_log_robustness(tiny_data):
    from mmray.train.loop import run_local

    cfg, prepared = tiny_data
    miss = MissingConfig(train_rate=0.5, test_rate=0.3, type="both", seed=5,
                         eval_rates=[0.0, 0.3, 0.9], eval_types=["both", "audio"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, missing=miss),
                              train=dataclasses.replace(cfg.train, epochs=1))
    last = run_local(cfg, prepared.version_dir)[-1]
    folder = prepared.version_dir / "missing"
    stored = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.parquet")}
    assert {"train-both-0.5-seed5.parquet", "val-both-0.3-seed5.parquet", "test-both-0.3-seed5.parquet",
            "test-both-0-seed5.parquet", "test-both-0.9-seed5.parquet",
            "test-audio-0.9-seed5.parquet"} <= set(stored)
    for tag in ("both_0", "both_0.3", "both_0.9", "audio_0", "audio_0.3", "audio_0.9"):
        assert 0.0 <= last[f"test_miss_{tag}/acc"] <= 1.0, tag
    assert last["test_miss_both_0.3/acc"] == last["test/acc"]  # the same table, the same model
    assert last["test_miss_both_0/acc"] == last["test_miss_audio_0/acc"]  # nothing missing
    table = missing.MissingTable(folder / "train-both-0.5-seed5.parquet", spec_of(prepared.manifest), {})
    assert (~table.present.all(1)).mean() == pytest.approx(0.5, abs=0.02)

    other = dataclasses.replace(cfg, method=MethodConfig("ogm_ge"))
    run_local(other, prepared.version_dir)
    for p in folder.glob("*.parquet"):  # another method reads the same stored tables, unchanged
        assert (p.stat().st_mtime_ns, p.read_bytes()) == stored[p.name]
