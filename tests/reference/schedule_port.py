"""The weight-decay and learning-rate groups of `set_schedule`, the same in the MAP reference
(`vilt/modules/vilt_utils.py`) and the REP reference (`clip/modules/clip_utils.py`): parameters
grouped by name into decayed / not decayed and backbone / classifier head."""

from __future__ import annotations

from torch import nn

NO_DECAY = ["bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]
HEAD_NAMES = ["vqa_classifier", "mmimdb_classifier", "food101_classifier", "hatememes_classifier",
              "nlvr2_classifier"]


def set_schedule_groups(module: nn.Module, lr: float, wd: float, lr_mult: float = 1.0) -> list[dict]:
    named = list(module.named_parameters())

    def decays(n):
        return not any(nd in n for nd in NO_DECAY)

    def head(n):
        return any(bb in n for bb in HEAD_NAMES)

    return [
        {"params": [p for n, p in named if decays(n) and not head(n)], "weight_decay": wd, "lr": lr},
        {"params": [p for n, p in named if not decays(n) and not head(n)], "weight_decay": 0.0, "lr": lr},
        {"params": [p for n, p in named if decays(n) and head(n)], "weight_decay": wd, "lr": lr * lr_mult},
        {"params": [p for n, p in named if not decays(n) and head(n)], "weight_decay": 0.0,
         "lr": lr * lr_mult},
    ]
