"""Encoders built by timm and open_clip, with weights only from local files the user names.

Nothing is downloaded: architectures are built with `pretrained=False` and a checkpoint path
given in `model.weights.<modality>` is loaded strictly (a mismatch is an error naming the file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def keep_frozen_out_of_state_dict(module: nn.Module) -> None:
    """Leave `module`'s frozen parameters (requires_grad False) and its buffers (BatchNorm
    statistics, which a frozen module in eval mode never updates) out of its state_dict, and take
    them from the module itself when a state dict without them is loaded.

    A frozen pretrained backbone is rebuilt from its local weights file every time the model is
    built, so a checkpoint need not carry it: for CLIP ViT-B/16 that is 600 MB per checkpoint.
    Trainable parameters inside it (e.g. REP's `tune_output_layers`) are kept.
    """

    # The hooks read the module they are called on (not a closure over `module`), so a deep
    # copy of the model drops and fills its own tensors.
    def frozen(mod: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        fixed = {prefix + n: p for n, p in mod.named_parameters() if not p.requires_grad}
        for name, m in mod.named_modules():  # persistent buffers only: what state_dict holds
            for b, t in m.named_buffers(recurse=False):
                if b not in m._non_persistent_buffers_set:
                    fixed[f"{prefix}{name}.{b}" if name else prefix + b] = t
        return fixed

    def drop(mod, state_dict, prefix, local_metadata) -> None:
        for key in frozen(mod, prefix):
            state_dict.pop(key, None)

    def fill(mod, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for key, t in frozen(mod, prefix).items():
            state_dict.setdefault(key, t.detach())

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(fill)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode, kept out of checkpoints; the owner keeps it in eval (`train`)."""
    module.requires_grad_(False)
    module.eval()
    keep_frozen_out_of_state_dict(module)
    return module


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

    def __init__(self, name: str, in_channels: int, out_dim: int | None, weights: str = "",
                 frozen: bool = False):
        import timm

        super().__init__()
        self.frames = in_channels // 3 if in_channels % 3 == 0 and in_channels > 3 else 1
        chans = 3 if self.frames > 1 else in_channels
        self.body = timm.create_model(name, pretrained=False, num_classes=0, in_chans=chans)
        if weights:
            load_local_weights(self.body, weights, f"timm {name}")
        self.frozen = frozen
        if frozen:
            freeze(self.body)
        # out_dim None: the backbone's own features, no projection (model.project_features).
        self.proj = nn.Linear(self.body.num_features, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or self.body.num_features

    def train(self, mode: bool = True) -> TimmEncoder:
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps BatchNorm statistics and no dropout
            self.body.eval()
        return self

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


def timm_model_known(name: str) -> bool:
    """Whether timm can build `name` here (its own models and mmray's tiny test ones)."""
    import timm

    from mmray.encoders.tiny_vit import register_tiny_vit

    register_tiny_vit()
    return timm.is_model(name)


def clip_input_sizes(model_name: str) -> tuple[int, int] | None:
    """(image size, context length) of an open_clip model config; None for an unknown name."""
    import open_clip

    register_tiny_clip()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        return None
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size), int(cfg.get("text_cfg", {}).get("context_length", 77))


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


def _clip_embed_dim(clip: nn.Module) -> int:
    proj = clip.text_projection
    return proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features


class OpenClipText(nn.Module):
    """open_clip's text tower over open_clip token ids (see `data.text.tokenizer`), projected to
    `out_dim` (None: CLIP's own text embedding)."""

    def __init__(self, model_name: str, out_dim: int | None, weights: str = "",
                 frozen: bool = False):
        super().__init__()
        clip = build_clip(model_name, weights)
        # Keep only what encode_text uses; the image tower is not needed here.
        clip.visual = None
        self.clip = freeze(clip) if frozen else clip
        self.frozen = frozen
        dim = _clip_embed_dim(clip)
        self.proj = nn.Linear(dim, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or dim

    def train(self, mode: bool = True) -> OpenClipText:
        super().train(mode)
        if self.frozen:
            self.clip.eval()
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.clip.encode_text(tokens))


class OpenClipImage(nn.Module):
    """open_clip's image tower over images at its input size (data.image.size with CLIP's
    mean/std), projected to `out_dim` (None: CLIP's own image embedding)."""

    def __init__(self, model_name: str, out_dim: int | None, weights: str = "",
                 frozen: bool = False):
        super().__init__()
        clip = build_clip(model_name, weights)
        self.visual = freeze(clip.visual) if frozen else clip.visual  # the text tower is dropped
        self.frozen = frozen
        dim = _clip_embed_dim(clip)
        self.proj = nn.Linear(dim, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or dim

    def train(self, mode: bool = True) -> OpenClipImage:
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.visual(images))
