"""CLIP towers with inserted tokens (mmray.modules.prompts): exact equivalence with open_clip when
nothing is inserted, where inserted tokens go, what they see, and what is pooled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmray.encoders.pretrained import build_clip
from mmray.modules.prompts import (
    COMPLETE,
    MISSING_IMAGE,
    MISSING_TEXT,
    Insertion,
    TextTower,
    VisionTower,
    missing_case,
)

EOT = 49407
PATCHES = 1 + (32 // 8) ** 2  # class token + 4 x 4 patches of the tiny CLIP


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip("mmray-tiny", freeze=True)


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(b: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(b, 32, dtype=torch.long)
    for i in range(b):
        n = 3 + i  # texts of different lengths: start, words, end-of-text, padding
        t[i, 0] = 49406
        t[i, 1:n] = torch.randint(1, 40000, (n - 1,), generator=g)
        t[i, n] = EOT
    return t


def block_io(tower, raw, insertions=None):
    """Each block's input and output, and the tower's features."""
    ins, outs = [], []

    def record(module, args, out) -> None:  # returns None: the output is left as it is
        ins.append(args[0])
        outs.append(out)

    hooks = [b.register_forward_hook(record) for b in tower.resblocks()]
    try:
        feats = tower(raw, insertions)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs, feats


def test_nothing_or_zero_length_inserted_reproduces_open_clip_exactly(clip):
    vision, text = VisionTower(clip.visual), TextTower(clip)
    x, t = images(), tokens()
    empty = {k: Insertion(torch.zeros(3, 0, 32)) for k in range(2)}
    for insertions in (None, empty):
        assert torch.equal(vision(x, insertions), clip.encode_image(x))
        assert torch.equal(text(t, insertions), clip.encode_text(t))


def test_tokens_go_in_front_of_the_block_and_accumulate_or_replace(clip):
    vision = VisionTower(clip.visual)
    a, b = torch.randn(3, 4, 32), torch.randn(3, 2, 32)
    ins, outs, _ = block_io(vision, images(), {0: Insertion(a), 1: Insertion(b)})
    assert ins[0].shape[1] == 4 + PATCHES and torch.equal(ins[0][:, :4], a)
    # accumulate: layer 1's tokens go in front of layer 0's (processed) tokens and the patches
    assert ins[1].shape[1] == 2 + 4 + PATCHES and torch.equal(ins[1][:, :2], b)
    assert torch.equal(ins[1][:, 2:], outs[0])
    # replace: layer 0's outputs at the prompt positions are dropped first
    ins, outs, _ = block_io(vision, images(), {0: Insertion(a), 1: Insertion(b, drop=4)})
    assert ins[1].shape[1] == 2 + PATCHES and torch.equal(ins[1][:, 2:], outs[0][:, 4:])


def test_pooling_skips_the_prefix(clip):
    vision, text = VisionTower(clip.visual), TextTower(clip)
    p = torch.randn(3, 5, 32)
    _, outs, feats = block_io(vision, images(), {0: Insertion(p)})
    v = clip.visual
    torch.testing.assert_close(feats, v.ln_post(outs[-1][:, 5]) @ v.proj)  # the class token
    t = tokens()
    _, outs, feats = block_io(text, t, {1: Insertion(p)})
    eot = outs[-1][torch.arange(3), 5 + t.argmax(1)]  # end-of-text of each text, after the prefix
    torch.testing.assert_close(feats, clip.ln_final(eot) @ clip.text_projection)


def test_text_tokens_see_every_prompt_and_prompts_only_earlier_ones(clip):
    text = TextTower(clip)
    t = tokens()
    p = torch.randn(3, 3, 32)
    _, outs, feats = block_io(text, t, {0: Insertion(p)})
    q = p.clone()
    q[:, 2] += 1.0  # change the last prompt only
    _, outs2, feats2 = block_io(text, t, {0: Insertion(q)})
    assert torch.equal(outs[0][:, :2], outs2[0][:, :2])  # earlier prompts do not see it
    assert not torch.allclose(feats, feats2)  # the text does (through its end-of-text token)
    _, outs3, _ = block_io(text, tokens(seed=1), {0: Insertion(p)})
    assert torch.equal(outs[0][:, :3], outs3[0][:, :3])  # prompts never see the text


def test_image_prompts_see_the_image(clip):
    vision = VisionTower(clip.visual)
    p = torch.randn(3, 3, 32)
    _, outs, _ = block_io(vision, images(), {0: Insertion(p)})
    _, outs2, _ = block_io(vision, images(seed=1), {0: Insertion(p)})
    assert not torch.allclose(outs[0][:, :3], outs2[0][:, :3])  # no causal mask in the ViT


def test_bad_insertions_and_towers_are_named(clip):
    vision = VisionTower(clip.visual)
    with pytest.raises(ValueError, match=r"insertions at layers \[2\]; this tower has layers 0..1"):
        vision(images(), {2: Insertion(torch.zeros(3, 1, 32))})
    with pytest.raises(ValueError, match="layer 1: cannot drop 2 inserted tokens; 1 are in front"):
        vision(images(), {0: Insertion(torch.zeros(3, 1, 32)), 1: Insertion(torch.zeros(3, 1, 32), 2)})
    with pytest.raises(ValueError, match="needs a ViT image tower.*Linear"):
        VisionTower(nn.Linear(2, 2))


def test_frozen_towers_stay_in_eval_mode(clip):
    vision = VisionTower(clip.visual)
    vision.train()
    assert not vision.training and not any(m.training for m in vision.modules())


def test_missing_case_from_present_masks():
    img = torch.tensor([True, True, False, True])
    txt = torch.tensor([True, False, True, True])
    assert missing_case(img, txt).tolist() == [COMPLETE, MISSING_TEXT, MISSING_IMAGE, COMPLETE]
    with pytest.raises(ValueError, match=r"sample\(s\) \['s2'\] miss both the image and the text"):
        missing_case(torch.tensor([True, True, False]), torch.tensor([True, True, False]),
                     ["s0", "s1", "s2"])
