"""MAP with `preset: reference` against a port of the reference's training step on CLIP's towers
(tests/reference/map_port.py: YiLunLee/missing_aware_prompts at
9aa538159f4623de1936d25daee880ec47c062be, vilt/modules/vilt_missing_aware_prompt_module.py,
vilt/modules/vision_transformer_prompts.py, vilt/modules/objectives.py, vilt/modules/vilt_utils.py).

The prompts start equal by each side's own initialisation (not copied); the classifier's random
N(0, 0.02) start is copied from mmray's. Both run the same frozen tiny CLIP towers, train on the
same batches with AdamW (lr 1e-2, weight decay 2e-2 in the groups each one builds: mmray's
`param_groups`, the port's `set_schedule` name filter, betas (0.9, 0.98)) for three steps in
float64, and must agree after every step on the loss (to 1e-5) and on every parameter (to
1e-9: both compute in float64, the cross-entropy in float32).
"""

from __future__ import annotations

import types

import torch

from mmray.encoders import ModelConfig
from mmray.methods import build_method
from mmray.modules.prompts import COMPLETE, MISSING_IMAGE, MISSING_TEXT

from helpers import CPU, SPEC_IT, checked_method_config, clip_missing_batches, missing_type_codes
from map_port import MAPReference
from schedule_port import set_schedule_groups

LR, WD, STEPS = 1e-2, 2e-2, 3
ROLES = ("image", "text")


def make_map(**options):
    cfg = checked_method_config("map", preset="reference", options=options)
    torch.manual_seed(0)
    return build_method(SPEC_IT, ModelConfig(), cfg).double()


def port_for(method) -> MAPReference:
    image, text = method.tower("image"), method.tower("text")
    clip = types.SimpleNamespace(visual=image.visual, token_embedding=text.token_embedding,
                                 positional_embedding=text.positional_embedding,
                                 transformer=text.transformer, ln_final=text.ln_final,
                                 text_projection=text.text_projection)
    torch.manual_seed(1)
    return MAPReference(clip, SPEC_IT.num_classes).double()


def pairs(port: MAPReference, method) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out = [("classifier.weight", port.food101_classifier.weight, method.head.fc.weight),
           ("classifier.bias", port.food101_classifier.bias, method.head.fc.bias)]
    for r in ROLES:
        tower, ours = getattr(port, f"{r}_prompts"), method.prompts[r]
        out += [(f"{r}.complete_prompt", tower.complete_prompt, ours[COMPLETE]),
                (f"{r}.missing_text_prompt", tower.missing_text_prompt, ours[MISSING_TEXT]),
                (f"{r}.missing_img_prompt", tower.missing_img_prompt, ours[MISSING_IMAGE])]
    return out


def test_map_reference_preset_steps_like_the_reference_code():
    method = make_map()
    port = port_for(method)
    for name, ref, ours in pairs(port, method):
        if "prompt" in name:  # the reference's initialisation, each side its own
            torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=0, msg=name)
    with torch.no_grad():
        port.food101_classifier.weight.copy_(method.head.fc.weight)
    assert torch.all(method.head.fc.bias == 0)  # init_weights

    # what trains: prompts and the classifier, in both
    ours_trained = {id(p) for p in method.parameters() if p.requires_grad}
    assert ours_trained == {id(ours._base if ours._base is not None else ours)
                            for _, _, ours in pairs(port, method)}
    port_trained = {id(p) for p in port.parameters() if p.requires_grad}
    assert port_trained == {id(ref) for _, ref, _ in pairs(port, method)}

    opt_ours = torch.optim.AdamW(method.param_groups(WD), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    opt_ref = torch.optim.AdamW(set_schedule_groups(port, LR, WD), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    for b in clip_missing_batches()[:STEPS]:
        method.train(), port.train()
        logs = method.train_step(b, opt_ours, CPU)
        loss = port.training_step(b["inputs"]["image"], b["inputs"]["text"], missing_type_codes(b), b["label"])
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()
        torch.testing.assert_close(logs["loss"].double(), loss.detach().double(), rtol=0, atol=1e-5)
        for name, ref, ours in pairs(port, method):
            torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-9, msg=name)
