"""REP with `preset: reference` against a port of the reference's training step
(tests/reference/rep_port.py: AnonymousUser2313/REP at 895632be9bcb8028177604946ab1336f3a2f1bf2,
clip/modules/clip_dynamic_memory.py, clip/modules/vision_transformer_memory.py,
clip/modules/clip_utils.py, clip/modules/objectives.py).

Both start from the same weights (the port's are copied from mmray's: buffers, Nets, LayerNorms,
α, the dynamic queries and attention, the classifier; both run the same frozen tiny CLIP towers),
train on the same batches with AdamW (lr 1e-2, weight decay 2e-2 in the groups each one builds:
mmray's `param_groups`, the port's `set_schedule` name filter, betas (0.9, 0.98)) for three steps
in float64, and must agree after every step on the loss (to 1e-5) and on every parameter (to
1e-9: both compute in float64, the cross-entropy in float32). The Nets' dropout (0.1) draws one
mask per Net and sample, injected into both (the reference calls each Net once per sample, mmray
once per batch). Both of the reference's code paths: Food-101 / MM-IMDb (the preset)
and Hateful Memes (the preset with tune_output_layers and learn_dynamic_attention).
"""

from __future__ import annotations

import types
import zlib

import pytest
import torch
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import build_method

from helpers import CPU, SPEC_IT, checked_method_config, clip_missing_batches, missing_type_codes
from rep_port import REPReference
from schedule_port import set_schedule_groups

LR, WD, STEPS = 1e-2, 2e-2, 3
ROLES = ("image", "text")


def make_rep(**options):
    cfg = checked_method_config("rep", preset="reference", options=options)
    torch.manual_seed(0)
    return build_method(SPEC_IT, ModelConfig(), cfg).double()


class DropoutDraws:
    """One dropout mask per Net (key) and sample per step, whichever way a Net is called: on the
    whole batch (B, P, H) or once per sample (P, H), in order of the samples."""

    def __init__(self, p: float):
        self.p, self.seed, self.batch = p, 0, 0
        self.masks: dict = {}
        self.calls: dict = {}

    def new_step(self, seed: int, batch: int) -> None:
        self.seed, self.batch, self.masks, self.calls = seed, batch, {}, {}

    def full(self, key, shape, dtype) -> torch.Tensor:
        if key not in self.masks:
            g = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(repr(key).encode()))
            keep = torch.rand((self.batch, *shape), generator=g) >= self.p
            self.masks[key] = keep.to(dtype) / (1 - self.p)
        return self.masks[key]

    def apply(self, key, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x * self.full(key, x.shape[1:], x.dtype)
        i = self.calls.get(key, 0)
        self.calls[key] = i + 1
        return x * self.full(key, x.shape, x.dtype)[i]


class InjectedDropout(nn.Module):
    def __init__(self, draws: DropoutDraws, key):
        super().__init__()
        self.draws, self.key = draws, key

    def forward(self, x):
        return self.draws.apply(self.key, x) if self.training else x


def port_for(method, hatememes: bool) -> REPReference:
    image, text = method.tower("image"), method.tower("text")
    clip = types.SimpleNamespace(visual=image.visual, token_embedding=text.token_embedding,
                                 positional_embedding=text.positional_embedding,
                                 transformer=text.transformer, ln_final=text.ln_final,
                                 text_projection=text.text_projection)
    torch.manual_seed(1)
    # memory_depth: the reference's 6, capped at the towers' 2 as mmray caps it (the reference
    # would also compute buffers for layers 2-5, which no block reads and no gradient reaches)
    depth = method.replay_buffers.depth
    return REPReference(clip, SPEC_IT.num_classes, memory_depth=depth, hatememes=hatememes).double()


def pairs(port: REPReference, method, hatememes: bool) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, the port's tensor, mmray's tensor) for everything that starts equal and trains."""
    ml, rb = port.model.memory_learner, method.replay_buffers
    towers = rb.towers
    out = [("text_memory_complete", ml.text_memory_complete, towers["text"].private[0]),
           ("text_memory_missing", ml.text_memory_missing, towers["text"].private[1]),
           ("visual_memory_complete", ml.visual_memory_complete, towers["image"].private[0]),
           ("visual_memory_missing", ml.visual_memory_missing, towers["image"].private[1]),
           ("common_memory_complete", ml.common_memory_complete, rb.shared[0]),
           ("common_memory_image", ml.common_memory_image, rb.shared[1]),  # text missing
           ("common_memory_text", ml.common_memory_text, rb.shared[2]),  # image missing
           ("residual_alpha", ml.residual_alpha, rb.alpha),
           ("classifier.weight", port.food101_classifier.weight, method.head.fc.weight),
           ("classifier.bias", port.food101_classifier.bias, method.head.fc.bias)]

    def net(name, ref, ours):
        mods = [("fc1", ref.fc1, ours.body[0]), ("layernorm", ref.layernorm, ours.body[1]),
                ("fc2", ref.fc2, ours.body[4])]
        if isinstance(ref.skip, nn.Linear):
            mods.append(("skip", ref.skip, ours.skip))
        return [(f"{name}.{m}.{w}", getattr(a, w), getattr(b, w)) for m, a, b in mods
                for w in ("weight", "bias")]

    encoders = {"image": port.model.image_encoder, "text": port.model.text_encoder}
    for r in ROLES:
        for k in range(len(towers[r].nets)):
            out += net(f"compound_memory_projections_{r}.{k}",
                       getattr(ml, f"compound_memory_projections_{r}")[k], towers[r].nets[k])
            ln_ref, ln = getattr(ml, f"layernorm_{r}")[k], towers[r].norms[k]
            out += [(f"layernorm_{r}.{k}.{w}", getattr(ln_ref, w), getattr(ln, w))
                    for w in ("weight", "bias")]
        out += net(f"common_memory_projection_{r}", getattr(ml, f"common_memory_projection_{r}"),
                   towers[r].shared_proj)
        attn_ref, attn = encoders[r].transformer.attn_memory, towers[r].attn
        out += [(f"{r}.attn_memory.{n}", p, dict(attn.named_parameters())[n])
                for n, p in attn_ref.named_parameters()]
    if hatememes:
        image, text = method.tower("image"), method.tower("text")
        v = port.model.image_encoder.visual
        out += [("ln_post.weight", v.ln_post.weight, image.visual.ln_post.weight),
                ("ln_post.bias", v.ln_post.bias, image.visual.ln_post.bias),
                ("proj", v.proj, image.visual.proj),
                ("ln_final.weight", port.model.text_encoder.ln_final.weight, text.ln_final.weight),
                ("ln_final.bias", port.model.text_encoder.ln_final.bias, text.ln_final.bias)]
    return out


def base(t: torch.Tensor) -> torch.Tensor:
    """The parameter a view (private[0], shared[1]) was taken from."""
    return t if t._base is None else t._base


def copy_initial_values(port: REPReference, method, hatememes: bool) -> None:
    with torch.no_grad():
        for _, ref, ours in pairs(port, method, hatememes):
            ref.copy_(ours)
    for r in ROLES:  # the reference's queries are plain tensors: (length, 1, width) each
        t, q = getattr(port.model, f"{r}_encoder").transformer, method.replay_buffers.towers[r].queries
        t.memories_dynamic_complete = q[0].detach().clone().unsqueeze(1)
        t.memories_dynamic_image = q[1].detach().clone().unsqueeze(1)  # text missing
        t.memories_dynamic_text = q[2].detach().clone().unsqueeze(1)  # image missing


def inject_dropout(port: REPReference, method, draws: DropoutDraws) -> None:
    ml, towers = port.model.memory_learner, method.replay_buffers.towers
    for r in ROLES:
        for k, ours in enumerate(towers[r].nets):
            ours.body[3] = InjectedDropout(draws, ("net", r, k))
        for k, ref in enumerate(getattr(ml, f"compound_memory_projections_{r}")):
            ref.dropout = InjectedDropout(draws, ("net", r, k))
        towers[r].shared_proj.body[3] = InjectedDropout(draws, ("shared", r))
        getattr(ml, f"common_memory_projection_{r}").dropout = InjectedDropout(draws, ("shared", r))


@pytest.mark.parametrize("hatememes", [False, True], ids=["food101-mmimdb", "hatememes"])
def test_rep_reference_preset_steps_like_the_reference_code(hatememes):
    extra = {"tune_output_layers": True, "learn_dynamic_attention": True} if hatememes else {}
    method = make_rep(**extra)
    port = port_for(method, hatememes)
    copy_initial_values(port, method, hatememes)
    draws = DropoutDraws(method.options.dropout)
    inject_dropout(port, method, draws)

    # what trains: the same parameters in both, and nothing else
    matched = pairs(port, method, hatememes)
    for name, ref, ours in matched:
        assert ref.requires_grad == ours.requires_grad, name
    ours_trained = {id(p) for p in method.parameters() if p.requires_grad}
    assert ours_trained == {id(base(ours)) for _, _, ours in matched if ours.requires_grad}
    port_trained = {id(p) for p in port.parameters() if p.requires_grad}
    assert port_trained == {id(ref) for _, ref, _ in matched if ref.requires_grad}
    attention = [ours for name, _, ours in matched if "attn_memory" in name]
    assert attention and all(p.requires_grad == hatememes for p in attention)
    assert not method.replay_buffers.towers["image"].queries.requires_grad

    opt_ours = torch.optim.AdamW(method.param_groups(WD), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    opt_ref = torch.optim.AdamW(set_schedule_groups(port, LR, WD), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    for step, b in enumerate(clip_missing_batches()[:STEPS]):
        method.train(), port.train()
        draws.new_step(step, len(b["label"]))
        logs = method.train_step(b, opt_ours, CPU)
        draws.new_step(step, len(b["label"]))
        loss = port.training_step(b["inputs"]["image"], b["inputs"]["text"], missing_type_codes(b), b["label"])
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()
        torch.testing.assert_close(logs["loss"].double(), loss.detach().double(), rtol=0, atol=1e-5)
        for name, ref, ours in pairs(port, method, hatememes):
            torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-9, msg=name)
