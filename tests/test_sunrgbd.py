"""SUN RGB-D style source and the depth featurizer: 16-bit PNGs, bit rotation, disparity, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmray.data.features import DepthFeatures, depth_features, load_depth
from mmray.data.ingest import read_split
from mmray.data.preprocess import preprocess
from mmray.data.reader import spec_of
from mmray.data.sources import get_source
from mmray.train.experiment import load_experiment

from helpers import data_config, featurize

SCENES = ("bedroom", "kitchen", "living_room")


def _rotl3(mm: np.ndarray) -> np.ndarray:
    """SUN RGB-D's storage: millimetres rotated left by 3 bits in 16 bits."""
    v = mm.astype(np.uint32)
    return (((v << 3) | (v >> 13)) & 0xFFFF).astype(np.uint16)


def _write_sample(root: Path, rel: str, scene: str | None, depth_mm: np.ndarray | None = None,
                  rgb: bool = True) -> Path:
    """One sample folder as SUN RGB-D ships it: image/<name>.jpg, depth/<name>.png, scene.txt."""
    folder = root / rel
    name = folder.name
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "depth").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(rel))
    if rgb:
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(
            folder / "image" / f"{name}.jpg", quality=95)
    if depth_mm is None:
        depth_mm = rng.integers(0, 6000, (12, 16)).astype(np.uint16)
    Image.fromarray(_rotl3(depth_mm)).save(folder / "depth" / f"{name}.png")
    if scene is not None:
        (folder / "scene.txt").write_text(scene)  # as shipped: no trailing newline
    return folder


def _dataset(root: Path, per_scene: int = 4) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {"train": [], "test": []}
    k = 0
    for scene in SCENES:
        for i in range(per_scene):
            rel = f"kv1/NYUdata/NYU{k:04d}"
            _write_sample(root, rel, scene)
            lists["test" if i == 0 else "train"].append(rel)
            k += 1
    # The toolbox's absolute paths work too (read from after the last "SUNRGBD/").
    (root / "train.txt").write_text("".join(f"/n/fs/sun3d/data/SUNRGBD/{r}\n" for r in lists["train"]))
    (root / "test.txt").write_text("".join(f"{r}\n" for r in lists["test"]))
    return lists


def _data(root: Path, tmp_path: Path, *extra: str):
    return data_config("sunrgbd", root, tmp_path, "data.image.size=8", "data.depth.size=8",
                       "data.depth.rotate_bits=3", *extra)


# -- the depth featurizer ---------------------------------------------------------------------


def test_depth_png_rotation_is_undone(tmp_path):
    mm = np.array([[0, 500, 1234], [8000, 65535 >> 3, 7]], dtype=np.uint16)
    Image.fromarray(_rotl3(mm)).save(tmp_path / "d.png")
    np.testing.assert_array_equal(load_depth(tmp_path / "d.png", rotate_bits=3), mm.astype(np.float32))
    Image.fromarray(mm).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_depth(tmp_path / "plain.png"), mm.astype(np.float32))


def test_disparity_formula_by_hand():
    cfg = DepthFeatures(size=2, min_depth=0.5, max_depth=8.0, mean=0.25, std=0.5)
    mm = np.array([[0.0, 250.0], [2000.0, 20000.0]], dtype=np.float32)
    # 0: no reading -> 0; 0.25 m -> clamped to 0.5 m -> 1; 2 m -> 0.25; 20 m -> 8 m -> 0.0625.
    expected = np.array([[0.0, (1 - 0.25) / 0.5], [(0.25 - 0.25) / 0.5, (0.0625 - 0.25) / 0.5]])
    np.testing.assert_allclose(depth_features(mm, cfg)[0], expected, rtol=1e-6)
    assert depth_features(mm, cfg).shape == (1, 2, 2)


def test_resize_is_nearest_so_holes_do_not_blend():
    mm = np.zeros((4, 4), np.float32)
    mm[:, 2:] = 1000.0  # left half: no reading; right half: 1 m
    out = depth_features(mm, DepthFeatures(size=8, min_depth=0.5))[0]
    assert set(np.unique(out)) == {0.0, 0.5}


def test_a_non_depth_png_is_named(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=f"depth file {tmp_path / 'rgb.png'}: expected a single-channel 16-bit"):
        load_depth(tmp_path / "rgb.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read depth file {tmp_path / 'broken.png'}"):
        load_depth(tmp_path / "broken.png")


def test_depth_config_errors_name_the_key():
    with pytest.raises(ValueError, match="data.depth.min_depth: 9.0 must be below max_depth"):
        load_experiment(None, ["data.depth.min_depth=9", "data.depth.max_depth=8"])


# -- the source -------------------------------------------------------------------------------


def test_labels_paths_and_splits(tmp_path):
    root = tmp_path / "SUNRGBD"
    lists = _dataset(root)
    data = _data(root, tmp_path, "data.sunrgbd.val=0.34")
    items = get_source("sunrgbd").items(data)
    by_id = {it.id: it for it in items}
    assert len(items) == 12
    for rel in lists["test"]:
        it = by_id[rel.replace("/", "__")]
        assert it.split == "test"
        name = Path(rel).name
        assert it.files == {"image": str(root.resolve() / rel / "image" / f"{name}.jpg"),
                            "depth": str(root.resolve() / rel / "depth" / f"{name}.png")}
    # round(0.34 * 3) of each class's 3 train samples
    assert sorted(it.label for it in items if it.split == "val") == [0, 1, 2]
    for it in items:
        assert SCENES[it.label] == (root / it.id.replace("__", "/") / "scene.txt").read_text()
    spec = get_source("sunrgbd").spec(data)
    assert spec.class_names == SCENES
    assert spec.modalities["depth"].kind == "depth" and spec.modalities["depth"].shape == (1, 8, 8)
    assert spec.modalities["image"].shape == (3, 8, 8)


def test_class_list_keeps_those_scenes_in_that_order_and_val_list_is_used(tmp_path):
    root = tmp_path / "SUNRGBD"
    lists = _dataset(root)
    data = _data(root, tmp_path, "data.sunrgbd.classes=[living_room, bedroom]")
    items = get_source("sunrgbd").items(data)
    assert {(it.label, SCENES.index("living_room" if it.label == 0 else "bedroom"))
            for it in items} == {(0, 2), (1, 0)}
    assert len(items) == 8  # kitchen left out
    assert get_source("sunrgbd").spec(data).class_names == ("living_room", "bedroom")
    (root / "val.txt").write_text(lists["train"][0] + "\n")
    (root / "train.txt").write_text("".join(f"{r}\n" for r in lists["train"][1:]))
    splits = {it.id: it.split for it in get_source("sunrgbd").items(_data(root, tmp_path))}
    assert [k for k, s in splits.items() if s == "val"] == [lists["train"][0].replace("/", "__")]


def test_listing_errors_name_the_file_line_or_folder(tmp_path):
    root = tmp_path / "SUNRGBD"
    lists = _dataset(root)
    with pytest.raises(ValueError, match="test.txt line 4: scene 'office' is not a scene of train.txt"):
        _write_sample(root, "kv2/extra", "office")
        (root / "test.txt").write_text("".join(f"{r}\n" for r in [*lists["test"], "kv2/extra"]))
        get_source("sunrgbd").items(_data(root, tmp_path))
    (root / "test.txt").write_text(f"{lists['train'][0]}\n")
    with pytest.raises(ValueError, match=r"test.txt line 1: kv1/NYUdata/NYU0001 is also listed in .*train.txt line 1"):
        get_source("sunrgbd").items(_data(root, tmp_path))
    (root / "test.txt").write_text("kv1/absent\n")
    with pytest.raises(FileNotFoundError, match="test.txt line 1: no sample folder"):
        get_source("sunrgbd").items(_data(root, tmp_path))
    _write_sample(root, "kv1/noscene", None)
    (root / "test.txt").write_text("kv1/noscene\n")
    with pytest.raises(ValueError, match="cannot read the scene label .*kv1/noscene/scene.txt"):
        get_source("sunrgbd").items(_data(root, tmp_path))
    (root / "kv1/noscene/scene.txt").write_text("living room\n")
    with pytest.raises(ValueError, match="expected one scene name such as `bedroom`, got 'living room'"):
        get_source("sunrgbd").items(_data(root, tmp_path))
    (root / "test.txt").write_text("../outside\n")
    with pytest.raises(ValueError, match="test.txt line 1: '../outside' is not a sample folder"):
        get_source("sunrgbd").items(_data(root, tmp_path))
    (root / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt; data.root must hold the split lists"):
        get_source("sunrgbd").items(_data(root, tmp_path))


def test_featurizer_gives_disparity_and_names_a_missing_depth_png(tmp_path):
    root = tmp_path / "SUNRGBD"
    mm = np.full((12, 16), 2000, np.uint16)
    mm[0, :] = 0
    _write_sample(root, "kv1/a", "bedroom", depth_mm=mm)
    nodepth = _write_sample(root, "kv1/b", "kitchen")
    (nodepth / "depth" / "b.png").unlink()
    (root / "train.txt").write_text("kv1/a\nkv1/b\n")
    (root / "test.txt").write_text("")
    data = _data(root, tmp_path, "data.sunrgbd.val=0")
    source = get_source("sunrgbd")
    items = source.items(data)
    assert items[1].files["depth"] == str(nodepth.resolve() / "depth" / "b.png")  # expected path
    out = featurize(source, data, items)
    expected = np.full((8, 8), 0.5 / 2.0, np.float32)  # min_depth / 2 m
    expected[0, :] = 0.0  # the row with no reading (nearest resize of 12 rows to 8 keeps row 0)
    np.testing.assert_allclose(out["depth"][0, 0], expected)
    assert out["error_file"][1] == items[1].files["depth"]
    assert f"cannot read depth file {items[1].files['depth']}" in out["error"][1]


def test_preprocess_shapes_match_spec(ray_local, tmp_path):
    root = tmp_path / "SUNRGBD"
    _dataset(root, per_scene=3)
    data = _data(root, tmp_path, "data.sunrgbd.val=0")
    prepared = preprocess(data)
    m = prepared.manifest
    assert m["rows"] == {"train": 6, "test": 3}
    assert m["params"]["modalities"] == {"image": "image", "depth": "depth"}
    assert m["params"]["depth"]["rotate_bits"] == 3
    spec = spec_of(m)
    assert spec == get_source("sunrgbd").spec(data)
    cols = read_split(prepared.version_dir, "test")
    assert cols["depth"].shape == (3, 1, 8, 8) and cols["image"].shape == (3, 3, 8, 8)
    assert np.all(cols["depth"] >= 0) and np.all(cols["depth"] <= 1)
    assert sorted(cols["label"]) == [0, 1, 2]
    # A scene label changed in scene.txt (same size, same files) is a new version.
    first = root / "kv1/NYUdata/NYU0000/scene.txt"
    first.write_text("kitchen")
    assert preprocess(data).version_dir != prepared.version_dir


def test_a_depth_modality_gets_an_encoder():
    import torch

    from mmray.data.spec import DatasetSpec, ModalitySpec
    from mmray.encoders import ModelConfig
    from mmray.methods import MethodConfig, build_method

    spec = DatasetSpec("rgbd", {"image": ModalitySpec("image", (3, 8, 8)),
                                "depth": ModalitySpec("depth", (1, 8, 8))}, 3)
    method = build_method(spec, ModelConfig(width=4, feature_dim=8), MethodConfig("normal"))
    out = method({"inputs": {"image": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)},
                  "present": {m: torch.ones(2, dtype=torch.bool) for m in spec.modalities}})
    assert out.per_modality["depth"].shape == (2, 3)


def test_fusion_level_dynmm_trains_on_rgb_depth_through_the_pipeline(ray_local, tmp_path):
    """DynMM's fusion level (METHODS.md §5) on an RGB-depth pair: SUN RGB-D files -> shards ->
    the training loop, with the gate's choices and their measured costs logged."""
    from mmray.methods import MethodConfig
    from mmray.train.experiment import load_experiment
    from mmray.train.loop import run_local

    root = tmp_path / "SUNRGBD"
    _dataset(root, per_scene=6)
    cfg = load_experiment(None, [
        "data.dataset=sunrgbd", f"data.root={root}", f"data.data_dir={tmp_path / 'shards'}",
        "data.image.size=16", "data.depth.size=16", "data.depth.rotate_bits=3", "data.parallelism=1",
        "data.sunrgbd.val=0.2", "model.width=4", "model.feature_dim=8", "train.epochs=3",
        "train.batch_size=4"])
    prepared = preprocess(cfg.data)
    spec = spec_of(prepared.manifest)
    assert {m: s.kind for m, s in spec.modalities.items()} == {"image": "image", "depth": "depth"}
    cfg = dataclasses.replace(cfg, method=MethodConfig("dynmm_fusion", options={
        "primary": "image", "epochs_hard": 2, "resource_weight": 0.5}))
    history = run_local(cfg, prepared.version_dir)
    last = history[-1]
    routes = [last[f"test/dynmm/route_k{k}"] for k in range(4)]
    assert sum(routes) == pytest.approx(1.0)
    costs = [last[f"dynmm/cost_k{k}"] for k in range(4)]
    assert costs == sorted(costs) and costs[0] < costs[-1]  # deeper fusion costs more
    assert last["test/dynmm/flops"] == pytest.approx(sum(r * c for r, c in zip(routes, costs)))
    assert history[0]["train/dynmm/temperature"] > history[-1]["train/dynmm/temperature"]
    assert 0.0 <= last["test/acc"] <= 1.0 and "val/acc_depth" in last
