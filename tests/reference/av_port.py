"""The audio-visual model that the GeWu-Lab reference repositories share, as their ports use it:
`models/basic_model.py` `AVClassifier` and `models/fusion_modules.py` `ConcatFusion` (OGM-GE
@ 343dc1d, MMCosine @ 00ba0a9, PMR @ 3615e48; the same two classes in each), with MLA's
`ConcatFusion3` as the three-feature case of the same layer."""

from __future__ import annotations

import torch
from torch import nn


class ConcatFusion(nn.Module):
    """ConcatFusion / ConcatFusion3: returns the features and fc_out([x; y(; z)])."""

    def __init__(self, fc_out: nn.Linear):
        super().__init__()
        self.fc_out = fc_out

    def forward(self, *feats):
        return (*feats, self.fc_out(torch.cat(feats, dim=1)))


class AVClassifier(nn.Module):
    """AVClassifier: fusion_module first (in named_parameters() order), then audio_net and
    visual_net; a, v, out = fusion_module(audio_net(audio), visual_net(visual))."""

    def __init__(self, fusion_module, audio_net, visual_net):
        super().__init__()
        self.fusion_module, self.audio_net, self.visual_net = fusion_module, audio_net, visual_net

    def forward(self, audio, visual):
        return self.fusion_module(self.audio_net(audio), self.visual_net(visual))
