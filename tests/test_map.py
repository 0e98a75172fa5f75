"""MAP (METHODS.md §6): prompt sets per missing case, where they go, what trains and what stays
frozen, the classifier on [image; text] with the missing feature zeroed, small checkpoints."""

from __future__ import annotations

import pytest
import torch

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, build_method
from mmray.methods.map import initial_prompts, prompt_insertions
from mmray.modules.prompts import COMPLETE, MISSING_IMAGE, MISSING_TEXT

from helpers import CLIP_PATCHES, CPU, SPEC_IT, block_inputs, clip_batch


def make_map(spec: DatasetSpec = SPEC_IT, **options):
    torch.manual_seed(0)
    return build_method(spec, ModelConfig(), MethodConfig("map", "concat", options))


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


def test_depth_is_capped_at_the_towers_depth():
    assert make_map().prompts["image"].shape == (3, 2, 16, 32)  # 6 asked, the tiny CLIP has 2


def test_only_prompts_and_head_train_and_the_backbone_stays_frozen():
    method = make_map()
    method.train()
    assert not any(m.training for t in method.encoders.values() for m in t.modules())  # eval
    assert method.head.training
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"prompts.image", "prompts.text", "head.fc.weight", "head.fc.bias"}
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    logs = method.train_step(clip_batch(), opt, CPU)
    assert torch.isfinite(logs["loss"]) and logs["grad/image"] > 0 and logs["grad/text"] > 0
    for n, p in method.named_parameters():
        if n in trainable:
            assert not torch.equal(before[n], p), n
        else:
            assert p.grad is None and torch.equal(before[n], p), n


def test_the_missing_feature_is_zeroed_before_the_classifier():
    method = make_map()
    method.eval()
    out = method(clip_batch())
    half_bias = method.head.fc.bias / 2
    torch.testing.assert_close(out.per_modality["text"][1], half_bias)  # text missing
    torch.testing.assert_close(out.per_modality["image"][2], half_bias)  # image missing
    assert not torch.allclose(out.per_modality["text"][0], half_bias)
    torch.testing.assert_close(out.logits, out.per_modality["image"] + out.per_modality["text"])


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
