"""MAP (METHODS.md §6): prompt sets per missing case, where they go, the tower features they give
computed by hand from open_clip's blocks, what trains and by how much, the classifier on
[image; text] with the missing feature zeroed (or not, as the reference), presets, pinned losses,
small checkpoints. The step-by-step comparison with the reference code is
tests/reference/test_ref_map.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import build_method
from mmray.methods.map import initial_prompts, prompt_insertions
from mmray.modules.prompts import COMPLETE, MISSING_IMAGE, MISSING_TEXT

from helpers import CLIP_PATCHES, CPU, SPEC_IT, block_inputs, checked_method_config, clip_batch


def make_map(spec: DatasetSpec = SPEC_IT, preset: str = "", **options):
    cfg = checked_method_config("map", preset=preset, options=options)
    torch.manual_seed(0)
    return build_method(spec, ModelConfig(), cfg)


def test_initial_prompts_mark_each_case_as_the_reference_does():
    p = initial_prompts(depth=2, length=4, width=3)
    assert p.shape == (3, 2, 4, 3)
    ones = {c: [r for r in range(4) if torch.all(p[c, :, r] == 1)] for c in range(3)}
    assert ones == {COMPLETE: [0], MISSING_IMAGE: [1], MISSING_TEXT: [2]}
    assert p.abs().sum() == 3 * 2 * 3  # everything else is zero
    assert initial_prompts(1, 2, 3)[MISSING_TEXT].abs().sum() == 0  # too short for its row


def test_prompt_insertions_pick_each_samples_set():
    prompts = torch.randn(3, 2, 4, 5)
    case = torch.tensor([MISSING_IMAGE, COMPLETE, MISSING_TEXT, MISSING_IMAGE])
    for replace in (False, True):
        ins = prompt_insertions(prompts, case, replace)
        assert sorted(ins) == [0, 1]
        for k in (0, 1):
            for i, c in enumerate(case.tolist()):
                assert torch.equal(ins[k].tokens[i], prompts[c, k])
        assert ins[0].drop == 0 and ins[1].drop == (4 if replace else 0)


@pytest.mark.parametrize("role", ["image", "text"])
def test_each_sample_gets_its_case_prompts_in_front_of_each_prompted_layer(role):
    method = make_map(length=3)
    with torch.no_grad():  # distinct values, so a wrong choice cannot pass
        method.prompts[role].copy_(torch.randn_like(method.prompts[role]))
    b = clip_batch()
    seen = block_inputs(method, role, b)
    cases = [COMPLETE, MISSING_TEXT, MISSING_IMAGE]
    for k in (0, 1):
        for i, c in enumerate(cases):
            assert torch.equal(seen[k][i, :3], method.prompts[role][c, k])
    n = CLIP_PATCHES if role == "image" else 32
    assert [s.shape[1] for s in seen] == [3 + n, 6 + n]  # MAP's prompts accumulate
    replaced = make_map(length=3, replace=True)
    assert [s.shape[1] for s in block_inputs(replaced, role, b)] == [3 + n, 3 + n]
    shallow = make_map(length=3, depth=1)
    assert shallow.prompts[role].shape[1] == 1
    assert [s.shape[1] for s in block_inputs(shallow, role, b)] == [3 + n, 3 + n]


def by_hand(method, b: dict, depth: int) -> dict[str, torch.Tensor]:
    """Each tower's feature from open_clip's own modules: the case's prompts of layer k put in
    front of everything before block k (k < depth), pooled at the first token after all prompts."""
    case = torch.tensor([COMPLETE, MISSING_TEXT, MISSING_IMAGE])
    v, t = method.tower("image").visual, method.tower("text")
    feats = {}
    for role in ("image", "text"):
        p = method.prompts[role][case]
        if role == "image":
            x = v._embeds(b["inputs"]["image"])
        else:
            x = t.token_embedding(b["inputs"]["text"]) + t.positional_embedding
        for k, block in enumerate(method.tower(role).resblocks()):
            if k < depth:
                x = torch.cat([p[:, k], x], dim=1)
            n = x.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1) if role == "text" else None
            x = block(x, attn_mask=mask)
        x = x[:, depth * p.shape[2]:]
        if role == "image":
            feats[role] = v.ln_post(x[:, 0]) @ v.proj
        else:
            eot = b["inputs"]["text"].argmax(-1)
            feats[role] = t.ln_final(x)[torch.arange(3), eot] @ t.text_projection
    return feats


@pytest.mark.parametrize("depth", [6, 1])
def test_prompted_features_equal_a_hand_computation_at_each_depth(depth):
    method = make_map(length=3, depth=depth, zero_missing=False)
    assert method.prompts["image"].shape == (3, min(depth, 2), 3, 32)  # 6 asked: the tiny CLIP has 2
    with torch.no_grad():
        for p in method.prompts.values():
            p.copy_(torch.randn_like(p))
    method.eval()
    b = clip_batch()
    with torch.no_grad():
        out = method(b)
        feats = by_hand(method, b, min(depth, 2))
    w, bias = method.head.fc.weight, method.head.fc.bias
    torch.testing.assert_close(out.per_modality["image"], F.linear(feats["image"], w[:, :32]) + bias / 2)
    torch.testing.assert_close(out.per_modality["text"], F.linear(feats["text"], w[:, 32:]) + bias / 2)
    torch.testing.assert_close(out.logits, F.linear(torch.cat([feats["image"], feats["text"]], 1), w, bias))


def test_a_step_trains_prompts_and_head_by_adamw_and_leaves_the_backbone_frozen():
    method = make_map()
    method.train()
    assert not any(m.training for t in method.encoders.values() for m in t.modules())  # eval
    assert method.head.training
    lr, wd = 1e-2, 0.05
    opt = torch.optim.AdamW(method.param_groups(wd), lr=lr)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"prompts.image", "prompts.text", "head.fc.weight", "head.fc.bias"}
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    b = clip_batch()
    with torch.no_grad():
        expected_loss = F.cross_entropy(method(b).logits, b["label"])
    logs = method.train_step(b, opt, CPU)
    torch.testing.assert_close(logs["loss"], expected_loss)
    for n, p in method.named_parameters():
        if n in trainable:  # AdamW's first step: decay, then lr · g / (|g| + eps)
            g = p.grad
            torch.testing.assert_close(p, before[n] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8), msg=n)
        else:
            assert p.grad is None and torch.equal(before[n], p), n
    norms = {r: torch.linalg.vector_norm(method.prompts[r].grad) for r in ("image", "text")}
    torch.testing.assert_close(logs["grad/image"], norms["image"])
    torch.testing.assert_close(logs["grad/text"], norms["text"])
    # a tower's prompts for the case that misses its modality feed a zeroed feature: no gradient
    # (without zeroing, as the reference, they train)
    dead = {("image", MISSING_IMAGE), ("text", MISSING_TEXT)}
    for r in ("image", "text"):
        for c in range(3):
            assert (method.prompts[r].grad[c].abs().sum() == 0) == ((r, c) in dead), (r, c)


def test_presets_resolve_to_the_reference_options():
    ref = make_map(preset="reference").options
    assert (ref.zero_missing, ref.head_init_std, ref.reference_decay_groups) == (False, 0.02, True)
    assert (ref.length, ref.depth, ref.replace) == (16, 6, False)
    assert make_map(preset="paper").options == make_map().options
    assert make_map(preset="reference", zero_missing=True).options.zero_missing  # given wins


def test_reference_head_init_and_decay_groups():
    method = make_map(preset="reference")
    assert torch.all(method.head.fc.bias == 0)
    assert 0.015 < float(method.head.fc.weight.detach().std()) < 0.025  # N(0, 0.02), 192 draws
    groups = method.param_groups(0.02)
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    names = {id(p): n for n, p in method.named_parameters()}
    assert [sorted(names[id(p)] for p in g["params"]) for g in groups] == [
        ["head.fc.weight", "prompts.image", "prompts.text"], ["head.fc.bias"]]
    assert make_map().param_groups(0.02)[0]["weight_decay"] == 0.02  # default: one group
    assert len(make_map().param_groups(0.02)) == 1


# Three AdamW steps of the reference preset on clip_batch() (seed 0): pinned, so that a change to
# a formula, an initialisation or the step moves them.
PINNED_REFERENCE = [1.1208711862564087, 0.8774886727333069, 0.6443742513656616]


def test_reference_preset_losses_are_pinned():
    method = make_map(preset="reference")
    opt = torch.optim.AdamW(method.param_groups(0.02), lr=1e-2)
    method.train()
    losses = [float(method.train_step(clip_batch(seed=s), opt, CPU)["loss"]) for s in range(3)]
    assert losses == pytest.approx(PINNED_REFERENCE, abs=1e-5)


def test_the_missing_feature_is_zeroed_before_the_classifier():
    method = make_map()
    method.eval()
    out = method(clip_batch())
    half_bias = method.head.fc.bias / 2
    torch.testing.assert_close(out.per_modality["text"][1], half_bias)  # text missing
    torch.testing.assert_close(out.per_modality["image"][2], half_bias)  # image missing
    assert not torch.allclose(out.per_modality["text"][0], half_bias)
    torch.testing.assert_close(out.logits, out.per_modality["image"] + out.per_modality["text"])
    kept = make_map(zero_missing=False)  # the reference: the dummy input's feature goes on
    kept.eval()
    with torch.no_grad():
        feats = by_hand(kept, clip_batch(), 2)
        out = kept(clip_batch())
    w, bias = kept.head.fc.weight, kept.head.fc.bias
    torch.testing.assert_close(out.per_modality["text"][1], feats["text"][1] @ w[:, 32:].T + bias / 2)
    torch.testing.assert_close(out.per_modality["image"][2], feats["image"][2] @ w[:, :32].T + bias / 2)


def test_checkpoints_hold_prompts_and_head_not_clip():
    method = make_map()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train_step(clip_batch(), opt, CPU)
    state = method.state_dict()
    assert set(state) == {"prompts.image", "prompts.text", "head.fc.weight", "head.fc.bias"}
    other = make_map()
    other.load_state_dict(state)  # strict: the frozen CLIP comes from the freshly built model
    method.eval(), other.eval()
    torch.testing.assert_close(other(clip_batch()).logits, method(clip_batch()).logits, rtol=0, atol=0)


def test_inputs_clip_cannot_take_are_named():
    small = DatasetSpec("it", {**SPEC_IT.modalities, "image": ModalitySpec("image", (3, 16, 16))}, 3)
    with pytest.raises(ValueError, match=r"takes \(3, 32, 32\): set data.image.size=32"):
        make_map(small)
    hashed = DatasetSpec("it", {**SPEC_IT.modalities, "text": ModalitySpec("text", (8,), 1024)}, 3)
    with pytest.raises(ValueError, match="data.text.tokenizer=open_clip data.text.max_tokens=32"):
        make_map(hashed)
    audio = DatasetSpec("av", {"audio": ModalitySpec("audio", (1, 8, 8)),
                               "image": SPEC_IT.modalities["image"]}, 3)
    with pytest.raises(ValueError, match=r"map needs one modality of each kind \['image', 'text'\]"):
        make_map(audio)
