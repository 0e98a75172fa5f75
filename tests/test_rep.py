"""REP (METHODS.md §6): the replay formula and separation term by hand, buffers per missing case,
where they are inserted and how long they are, initialisation, what trains and what stays frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, build_method
from mmray.methods.rep import ResidualNet, replay, separation_loss
from mmray.modules.prompts import COMPLETE, MISSING_IMAGE, MISSING_TEXT

from helpers import CLIP_PATCHES, CPU, SPEC_IT, block_inputs, clip_batch

CASES = torch.tensor([COMPLETE, MISSING_TEXT, MISSING_IMAGE])  # the cases of clip_batch()


def make_rep(**options):
    torch.manual_seed(0)
    return build_method(SPEC_IT, ModelConfig(), MethodConfig("rep", "concat", options))


def test_replay_and_separation_by_hand():
    prev, new = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    torch.testing.assert_close(replay(prev, new, torch.tensor(0.25)), torch.tensor([[1.5, 1.0]]))
    p = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1 sample, 2 private, 2)
    s = torch.tensor([[[3.0, 4.0]]])  # one shared token: cos = 0.6 and 0.8
    torch.testing.assert_close(separation_loss(p, s), torch.tensor((0.36 + 0.64) / 2))
    orthogonal = torch.tensor([[[0.0, 5.0]]])
    torch.testing.assert_close(separation_loss(p[:, :1], orthogonal), torch.tensor(0.0))
    assert separation_loss(p[:, :0], s) == 0


def test_net_is_fc_layernorm_gelu_dropout_fc_plus_a_linear_skip():
    torch.manual_seed(0)
    net = ResidualNet(4, 3, hidden=5, dropout=0.1).eval()
    x = torch.randn(2, 4)
    fc1, ln, fc2, skip = net.body[0], net.body[1], net.body[4], net.skip
    expected = fc2(F.gelu(F.layer_norm(fc1(x), (5,), ln.weight, ln.bias))) + skip(x)
    torch.testing.assert_close(net(x), expected)
    assert isinstance(ResidualNet(3, 3, 5, 0.1).skip, torch.nn.Identity)  # same widths


def test_private_buffers_per_case_and_their_replay_across_depth():
    method = make_rep(private_length=3, shared_length=2, dynamic_length=4)
    method.eval()
    rb = method.replay_buffers
    with torch.no_grad():
        rb.alpha.fill_(0.3)
    chain = rb.private_chain(CASES)
    img, txt = rb.towers["image"], rb.towers["text"]
    # the image tower's private buffer: [present, missing]; likewise the text's
    p_img = img.private[[0, 0, 1]]  # complete, text missing (image present), image missing
    p_txt = txt.private[[0, 1, 0]]
    both = torch.cat([p_img, p_txt], -1)
    m0 = {"image": img.nets[0](img.norms[0](both)), "text": txt.nets[0](txt.norms[0](both))}
    both1 = torch.cat([m0["image"], m0["text"]], -1)
    m1 = {"image": 0.3 * img.nets[1](img.norms[1](both1)) + 0.7 * m0["image"],
          "text": 0.3 * txt.nets[1](txt.norms[1](both1)) + 0.7 * m0["text"]}
    assert len(chain) == 2
    for r in ("image", "text"):
        torch.testing.assert_close(chain[0][r], m0[r])
        torch.testing.assert_close(chain[1][r], m1[r])


def test_buffers_are_inserted_at_the_configured_layers_and_lengths():
    method = make_rep(private_length=3, shared_length=2, dynamic_length=4)
    rb = method.replay_buffers
    b = clip_batch()
    for role, n in (("image", CLIP_PATCHES), ("text", 32)):
        seen = block_inputs(method, role, b)
        with torch.no_grad():
            chain = rb.private_chain(CASES)
            shared = rb.towers[role].shared_proj(rb.shared[CASES])
        assert [s.shape[1] for s in seen] == [9 + n, 9 + n]  # 3 + 2 + 4 in front, private replaced
        torch.testing.assert_close(seen[0][:, :3], chain[0][role])
        torch.testing.assert_close(seen[0][:, 3:5], shared)
        torch.testing.assert_close(seen[1][:, :3], chain[1][role])  # replayed at layer 1
    one = make_rep(private_length=3, shared_length=2, dynamic_length=4, depth=1)
    seen = block_inputs(one, "image", b)
    assert [s.shape[1] for s in seen] == [9 + CLIP_PATCHES] * 2
    assert len(one.replay_buffers.private_chain(CASES)) == 1


def test_shared_buffers_and_dynamic_queries_follow_the_case():
    method = make_rep(private_length=1, shared_length=2, dynamic_length=2)
    method.eval()
    rb = method.replay_buffers
    with torch.no_grad():
        x0 = method.tower("image").embed(clip_batch()["inputs"]["image"])
        x0_text = method.tower("text").embed(clip_batch()["inputs"]["text"])
        inserts, layer0 = rb(CASES, {"image": x0, "text": x0_text})
        t = rb.towers["image"]
        for i, c in enumerate(CASES.tolist()):
            torch.testing.assert_close(layer0["image"][1][i], t.shared_proj(rb.shared[c]))
            q = t.queries[c].unsqueeze(0)
            dyn = t.attn(q, x0[i:i + 1], x0[i:i + 1], need_weights=False)[0][0]
            torch.testing.assert_close(inserts["image"][0].tokens[i, 3:], dyn)


def test_initial_buffers_start_from_clip_tokens_plus_noise():
    method = make_rep(init_noise=0.2)
    image, text = method.tower("image"), method.tower("text")
    rb = method.replay_buffers
    for private, start in ((rb.towers["image"].private, image.class_token()),
                           (rb.towers["text"].private, text.token(49407))):
        assert private.shape == (2, 12, 32)
        dist = (private - start).norm(dim=-1)
        torch.testing.assert_close(dist, torch.full_like(dist, 0.2))
    assert rb.shared.shape == (3, 12, 32) and rb.alpha.item() == 0.5


def test_alpha_queries_and_buffers_train_while_clip_stays_frozen():
    method = make_rep(separation_weight=0.5)
    method.train()
    assert not any(m.training for t in method.encoders.values() for m in t.modules())
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    logs = method.train_step(clip_batch(), opt, CPU)
    torch.testing.assert_close(logs["loss"], logs["loss/task"] + 0.5 * logs["rep/separation"])
    rb = method.replay_buffers
    assert rb.alpha.item() != 0.5
    for n in ("replay_buffers.alpha", "replay_buffers.towers.image.queries",
              "replay_buffers.towers.text.queries", "replay_buffers.shared",
              "replay_buffers.towers.image.private", "head.fc.weight"):
        assert not torch.equal(before[n], dict(method.named_parameters())[n]), n
    for n, p in method.encoders.named_parameters():
        assert not p.requires_grad and p.grad is None and torch.equal(before[f"encoders.{n}"], p), n
    assert not any(k.startswith("encoders.") for k in method.state_dict())


def test_reference_behaviour_flags():
    method = make_rep(learn_queries=False, tune_output_layers=True)
    names = {n for n, p in method.named_parameters() if p.requires_grad}
    assert not any("queries" in n for n in names)
    assert "replay_buffers.towers.image.queries" in method.state_dict()  # fixed, but saved
    tuned = {n for n in names if n.startswith("encoders.")}
    assert tuned == {"encoders.image.visual.proj", "encoders.image.visual.ln_post.weight",
                     "encoders.image.visual.ln_post.bias", "encoders.text.ln_final.weight",
                     "encoders.text.ln_final.bias"}
    assert tuned <= set(method.state_dict())  # trained, so checkpointed
    before = method.replay_buffers.towers["image"].queries.clone()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train_step(clip_batch(), opt, CPU)
    assert torch.equal(before, method.replay_buffers.towers["image"].queries)


@pytest.mark.parametrize("lengths", [(0, 2, 2), (2, 0, 0)])
def test_a_kind_of_token_can_be_left_out(lengths):
    p, s, d = lengths
    method = make_rep(private_length=p, shared_length=s, dynamic_length=d)
    seen = block_inputs(method, "text", clip_batch())
    assert [x.shape[1] for x in seen] == [p + s + d + 32] * 2
    opt = torch.optim.AdamW([q for q in method.parameters() if q.requires_grad], lr=1e-2)
    assert torch.isfinite(method.train_step(clip_batch(), opt, CPU)["loss"])
