"""Reprogramming (METHODS.md §8): InfoNCE, zero-shot logits, the frozen tower, what trains, runs."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.methods.reprogram import (
    ModalityStem,
    ReprogrammingAttention,
    class_text_embeddings,
    encode_tokens,
    info_nce,
    zero_shot_logits,
)
from mmray.train.experiment import load_experiment
from mmray.train.metrics import MetricAccumulator

SPEC = DatasetSpec("av", {"audio": ModalitySpec("audio", (1, 30, 32)),
                          "image": ModalitySpec("image", (3, 16, 16))}, num_classes=3,
                   class_names=("dog", "rooster", "chirping_birds"))
AUDIO_ONLY = DatasetSpec("esc", {"audio": SPEC.modalities["audio"]}, 3, class_names=SPEC.class_names)
RGBD = DatasetSpec("rgbd", {"image": ModalitySpec("image", (3, 32, 32)),
                            "depth": ModalitySpec("depth", (1, 32, 32)),
                            "audio": SPEC.modalities["audio"]}, 3, class_names=("a", "b", "c"))
CPU = StepContext(device=torch.device("cpu"))


_BUILT: dict = {}


def method(spec: DatasetSpec = SPEC, **options):
    """A fresh copy of the method built once per (spec, options): building encodes every class
    prompt with CLIP's text tower, the slow part of these tests."""
    key = (repr(spec), repr(sorted(options.items())))
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = build_method(spec, ModelConfig(), MethodConfig("reprogram", options=options))
    return copy.deepcopy(_BUILT[key])


def batch(spec: DatasetSpec = SPEC, n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {m: torch.randn(n, *s.shape, generator=g) for m, s in spec.modalities.items()},
            "present": {m: torch.ones(n, dtype=torch.bool) for m in spec.modalities},
            "label": torch.arange(n) % spec.num_classes, "id": [f"s{i}" for i in range(n)]}


# -- formulas ---------------------------------------------------------------------------------


def test_info_nce_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # s = x yᵀ / 0.5 = [[2, 1.2], [0, 1.6]]
    rows = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(
        math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    cols = -math.log(math.exp(2) / (math.exp(2) + math.exp(0))) - math.log(
        math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = (rows / 2 + cols / 2) / 2
    assert info_nce(x, y, 0.5).item() == pytest.approx(expected, rel=1e-6)
    s = x @ y.T / 0.5
    torch.testing.assert_close(info_nce(x, y, 0.5), (F.cross_entropy(s, torch.arange(2))
                                                     + F.cross_entropy(s.T, torch.arange(2))) / 2)
    # Every pair positive: nothing to contrast, the loss is 0.
    assert info_nce(x, y, 0.5, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-7)


def test_info_nce_with_shared_anchors_counts_same_class_samples_as_positives():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(3, 4), dim=-1)
    y = F.normalize(torch.randn(3, 4), dim=-1)
    label = torch.tensor([0, 0, 1])
    pos = label[:, None] == label[None, :]
    s = (x @ y.T / 0.1).tolist()

    def side(m, p):  # −log Σ_{j∈P_i} exp(s_ij) / Σ_j exp(s_ij), averaged over i
        return sum(-math.log(sum(math.exp(v) for v, q in zip(r, pr) if q) / sum(math.exp(v) for v in r))
                   for r, pr in zip(m, p)) / len(m)

    st = [list(c) for c in zip(*s)]
    expected = (side(s, pos.tolist()) + side(st, pos.T.tolist())) / 2
    assert info_nce(x, y, 0.1, pos).item() == pytest.approx(expected, rel=1e-5)


def test_zero_shot_logits_by_hand():
    classes = torch.eye(3, 4)
    emb = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    torch.testing.assert_close(zero_shot_logits(emb, classes, 0.5), torch.tensor([[1.2, 1.6, 0.0]]))


# -- the modules ------------------------------------------------------------------------------


def test_encode_tokens_is_clips_own_tower_tail():
    from mmray.encoders.pretrained import build_clip

    torch.manual_seed(0)
    visual = build_clip("mmray-tiny", freeze=True).visual
    image = torch.randn(2, 3, 32, 32)
    # CLIP's own embedded tokens through the tail give CLIP's image embedding.
    torch.testing.assert_close(encode_tokens(visual, visual._embeds(image)), visual(image))


def test_stem_and_reprogramming_shapes():
    stem = ModalityStem((1, 30, 32), width=16, kernel=8, stride=6, token_norm=True)
    tokens = stem(torch.randn(2, 1, 30, 32))
    assert stem.grid == (4, 5) and tokens.shape == (2, 1 + 20, 16)
    out = ReprogrammingAttention(slots=17, width=16, heads=4, dropout=0.0)(tokens)
    assert out.shape == (2, 17, 16)
    with pytest.raises(ValueError, match="audio: a 6×32 input is smaller than the stem's 8×8 kernel"):
        ModalityStem((1, 6, 32), 16, 8, 6, True, what="audio")


def test_class_embeddings_average_normalised_template_embeddings():
    import open_clip

    m = method()
    torch.manual_seed(1)
    from mmray.encoders.pretrained import build_clip

    clip = build_clip("mmray-tiny", freeze=True)
    tok = open_clip.get_tokenizer("mmray-tiny")
    templates = ["a sound of {}.", "the {} again."]
    got = class_text_embeddings(clip, tok, ["chirping_birds", "dog"], templates)
    by_hand = []
    for name in ("chirping birds", "dog"):  # underscores become spaces
        e = F.normalize(clip.encode_text(tok([t.format(name) for t in templates])), dim=-1)
        by_hand.append(F.normalize(e.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(by_hand))
    assert m.text_audio.shape == (3, 32) and m.text_image.shape == (3, 32)
    assert "text_audio" not in m.state_dict()  # rebuilt from the frozen weights, not checkpointed


# -- the method -------------------------------------------------------------------------------


def test_zero_shot_accuracy_against_known_text_embeddings(monkeypatch):
    m = method(RGBD, temperature={"audio": 0.05, "depth": 0.5})
    m.eval()
    known = torch.eye(3, 32)  # class c's text embedding: the c-th basis vector
    m.text_audio.copy_(known)
    m.text_depth.copy_(known)
    emb = {"audio": torch.stack([known[0] + 0.1 * known[1], known[2], known[1], known[0]]),
           "depth": torch.stack([known[1], known[2], known[0], known[0]])}
    monkeypatch.setattr(m, "embed", lambda mod, x: emb[mod])
    b = batch(RGBD, n=4)
    b["label"] = torch.tensor([0, 2, 0, 1])
    b["present"]["depth"] = torch.tensor([True, True, False, True])
    out = m.predict(b)
    audio = F.normalize(emb["audio"], dim=-1) @ known.T / 0.05
    depth = emb["depth"] @ known.T / 0.5 * b["present"]["depth"][:, None]  # absent: zeroed
    torch.testing.assert_close(out.per_modality["audio"], audio)
    torch.testing.assert_close(out.per_modality["depth"], depth)
    # Fused: the mean over the modalities present (sample 2 has no depth).
    expected = (audio + depth * b["present"]["depth"][:, None]) / torch.tensor([2.0, 2, 1, 2])[:, None]
    torch.testing.assert_close(out.logits, expected)
    acc = MetricAccumulator(RGBD, m.modalities)
    acc.update(out, b["label"], torch.zeros(()))
    metrics = acc.compute("test")
    assert metrics["test/acc_audio"] == 2 / 4  # predicted [0, 2, 1, 0] vs [0, 2, 0, 1]
    assert metrics["test/acc_depth"] == 2 / 4  # predicted [1, 2, 0, 0]
    assert metrics["test/acc"] == float((expected.argmax(1) == b["label"]).float().mean())
    assert set(out.per_modality) == {"audio", "depth", "image"}  # the image: CLIP's own zero-shot


def test_only_stems_and_reprogramming_train_and_clip_stays_frozen():
    m = method()
    clip_before = {k: v.detach().clone() for k, v in m.visual.named_parameters()}
    assert len(clip_before) > 10
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in m.encoders.parameters()}
    assert {type(c).__name__ for c in m.encoders["audio"].children()} == {"ModalityStem",
                                                                          "ReprogrammingAttention"}
    opt = torch.optim.AdamW(m.param_groups(0.2), lr=1e-2)
    m.train()
    assert not m.visual.training and m.encoders.training
    logs = m.train_step(batch(), opt, CPU)
    assert torch.isfinite(logs["loss"]) and logs["grad/audio"] > 0
    for name, p in m.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), name
    for k, v in m.visual.named_parameters():
        assert torch.equal(v, clip_before[k]), k
    # Frozen CLIP is rebuilt from its weights file, never checkpointed; the rest round-trips.
    state = m.state_dict()
    assert state and not any(k.startswith("visual.") for k in state)
    fresh = method()
    fresh.load_state_dict(state)
    for (k, a), b in zip(m.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_separate_baseline_trains_its_own_towers_with_the_same_loss():
    rep, sep = method(), method(encoder="separate")
    assert sep.cost["reprogram/trainable_params"] > rep.cost["reprogram/trainable_params"]
    clip_before = {k: v.detach().clone() for k, v in sep.visual.named_parameters()}
    opt = torch.optim.AdamW(sep.param_groups(0.2), lr=1e-2)
    tower = sep.encoders["audio"].tower
    before = tower.transformer.resblocks[0].mlp.c_fc.weight.detach().clone()
    sep.train()
    sep.train_step(batch(), opt, CPU)
    assert not torch.equal(before, tower.transformer.resblocks[0].mlp.c_fc.weight)
    assert all(torch.equal(v, clip_before[k]) for k, v in sep.visual.named_parameters())
    # Initialised from CLIP's tower (separate_init: clip), trained apart from it.
    torch.testing.assert_close(before, sep.visual.transformer.resblocks[0].mlp.c_fc.weight)


def test_anchor_choice_and_the_text_anchor_loss():
    assert method().anchor == "image"
    esc = method(AUDIO_ONLY)
    assert esc.anchor == "text" and esc.modalities == ["audio"]
    b = batch(AUDIO_ONLY, n=4)
    b["label"] = torch.tensor([2, 0, 2, 1])
    esc.eval()  # no dropout, so the hand computation sees the same embeddings
    got = esc.modality_loss(b, "audio", None)
    e = F.normalize(esc.embed("audio", b["inputs"]["audio"]), dim=-1)
    anchors = esc.text_audio[b["label"]]
    positives = b["label"][:, None] == b["label"][None, :]
    torch.testing.assert_close(got, info_nce(e, anchors, 0.05, positives))
    with pytest.raises(ValueError, match="anchor=image: dataset 'esc' has no image modality"):
        method(AUDIO_ONLY, anchor="image")


def test_sizes_follow_the_clip_model_and_bad_settings_are_named():
    m = method()
    stem = m.encoders["audio"].stem
    assert stem.conv.kernel_size == (8, 8) and stem.conv.stride == (6, 6)  # mmray-tiny: patch 8
    assert m.encoders["audio"].reprogram.query.shape == (1, 17, 32)  # S = 1 + (32/8)²
    depth = method(RGBD, depth_patch=4).encoders["depth"].stem
    assert depth.conv.kernel_size == (4, 4) and depth.num_tokens == 1 + 64
    with pytest.raises(ValueError, match="reprogramming needs an audio or depth modality"):
        method(DatasetSpec("it", {"image": SPEC.modalities["image"]}, 3))
    with pytest.raises(ValueError, match="multi-label"):
        method(dataclasses.replace(SPEC, multilabel=True))
    with pytest.raises(ValueError, match="method.options.temperature.audio: 0.0 must be positive"):
        load_experiment(None, ["method.name=reprogram", "method.options={temperature: {audio: 0}}"])
    with pytest.raises(ValueError, match="method.options.templates.audio"):
        load_experiment(None, ["method.name=reprogram", "method.options={templates: {audio: [x]}}"])
    with pytest.raises(ValueError, match="method.options.temperature.text: not a modality kind"):
        load_experiment(None, ["method.name=reprogram", "method.options={temperature: {text: 1}}"])
    # A kind not given keeps its default.
    opts = load_experiment(None, ["method.name=reprogram", "method.options.temperature={audio: 0.1}"]).method.options
    assert opts["temperature"] == {"audio": 0.1, "depth": 1.0} and "{}" in opts["templates"]["depth"][0]


def test_trains_end_to_end_reprogrammed_and_separate(tiny_data):
    from pathlib import Path

    from mmray.train.loop import run_local

    cfg, prepared = tiny_data
    configs = Path(__file__).resolve().parents[1] / "configs"
    results = {}
    for encoder in ("reprogram", "separate"):  # the method's own config, as it ships
        method = load_experiment(configs / "methods/reprogram.yaml", [f"method.options.encoder={encoder}"]).method
        run = dataclasses.replace(cfg, method=method)
        history = run_local(run, prepared.version_dir)
        last = history[-1]
        assert math.isfinite(last["train/loss"]) and {"test/acc", "val/acc_audio",
                                                      "val/acc_image"} <= set(last)
        results[encoder] = last
    assert (results["reprogram"]["reprogram/trainable_params"]
            < results["separate"]["reprogram/trainable_params"])
