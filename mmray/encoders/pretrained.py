"""Encoders built by timm and open_clip, with weights only from local files the user names.

Nothing is downloaded: architectures are built with `pretrained=False` and a checkpoint path
given in `model.weights.<modality>` is loaded strictly (a mismatch is an error naming the file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_local_weights(module: nn.Module, path: str, what: str) -> None:
    """Load a state dict from a local file into `module`, strictly; errors name the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: weights file {p} not found (weights load only from local "
                                "files; nothing is downloaded)")
    state = torch.load(p, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what}: {p} does not match the architecture: {e}") from None


class TimmEncoder(nn.Module):
    """A timm CNN (ResNet18 by default) over spectrograms (1 channel) or RGB frames.

    Frames stacked on the channel axis (3·F channels) are run through the network one frame at a
    time and their features averaged over F, as the OGM-GE/MLA references pool frames over time.
    """

    def __init__(self, name: str, in_channels: int, out_dim: int, weights: str = ""):
        import timm

        super().__init__()
        self.frames = in_channels // 3 if in_channels % 3 == 0 and in_channels > 3 else 1
        chans = 3 if self.frames > 1 else in_channels
        self.body = timm.create_model(name, pretrained=False, num_classes=0, in_chans=chans)
        if weights:
            load_local_weights(self.body, weights, f"timm {name}")
        self.proj = nn.Linear(self.body.num_features, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames > 1:
            b, c, h, w = x.shape
            feats = self.body(x.reshape(b * self.frames, c // self.frames, h, w))
            return self.proj(feats.view(b, self.frames, -1).mean(1))
        return self.proj(self.body(x))


# A tiny text tower for tests and CPU runs; real runs name an open_clip config such as ViT-B-16.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> None:
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS.setdefault("mmray-tiny", TINY_CLIP)


def build_clip(model_name: str, weights: str = "", freeze: bool = False) -> nn.Module:
    """An open_clip CLIP model (both towers) built locally; weights only from the local file
    `weights`, loaded strictly. With `freeze` every parameter stops training and the model is
    put in eval mode (a frozen backbone: no dropout, and the caller keeps it in eval).

    Without weights the model is randomly initialised: right for tests and the tiny demo
    config ("mmray-tiny"), meaningless as a frozen backbone for real data.
    """
    import logging

    import open_clip

    register_tiny_clip()
    known = open_clip.list_models()
    if model_name not in known:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: mmray-tiny and "
                         f"{len(known) - 1} open_clip configs such as ViT-B-16, ViT-L-14, ViT-H-14")
    # open_clip logs a warning for every model built without its hub weights: expected here.
    log = logging.getLogger()
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        clip = open_clip.create_model(model_name, pretrained=None)
    finally:
        log.setLevel(level)
    if weights:
        load_local_weights(clip, weights, f"open_clip {model_name}")
    if freeze:
        clip.requires_grad_(False)
        clip.eval()
    return clip


class OpenClipText(nn.Module):
    """open_clip's text tower over open_clip token ids (see `data.text.tokenizer`)."""

    def __init__(self, model_name: str, out_dim: int, weights: str = "", freeze: bool = False):
        super().__init__()
        clip = build_clip(model_name, weights, freeze)
        # Keep only what encode_text uses; the image tower is not needed here.
        self.clip = clip
        self.clip.visual = None
        self.proj = nn.Linear(clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor)
                              else clip.text_projection.out_features, out_dim)
        self.out_dim = out_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.clip.encode_text(tokens))
