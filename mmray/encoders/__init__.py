"""Encoder factory: one encoder per modality, chosen by the modality's kind and the model config.

Every encoder maps a batch of one modality to features (B, feature_dim) and exposes `out_dim`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from mmray.config import bounds, path_field
from mmray.data.spec import ModalitySpec
from mmray.encoders.pretrained import OpenClipImage, OpenClipText, TimmEncoder
from mmray.encoders.small import SmallCNN, TokenBagEncoder, VectorMLP


@dataclass
class ModelConfig:
    # Audio and image encoders: "small" CNNs for CPU runs, or the timm model `timm_name`
    # (ResNet18 as in the OGM-GE/MLA reference setup); "open_clip": images through the image
    # tower of `open_clip_model` (audio has none).
    encoder: Literal["small", "timm", "open_clip"] = "small"
    timm_name: str = "resnet18"
    # Text encoder: a bag of token embeddings, or open_clip's text tower (open_clip tokens).
    text_encoder: Literal["bag", "open_clip"] = "bag"
    # An open_clip model config name (ViT-B-16, ...); "mmray-tiny" is a 2-layer one for tests.
    open_clip_model: str = "mmray-tiny"
    # Local weight files by modality (timm or open_clip state dicts); nothing is downloaded.
    weights: dict[str, str] = field(default_factory=dict, metadata={"path": True})
    # A local state dict of the whole open_clip model `open_clip_model` (both towers): what MAP
    # and REP load, and what open_clip encoders load when model.weights.<modality> is unset.
    clip_weights: str = path_field()
    # Freeze the pretrained timm / open_clip backbones: no gradients, always in eval mode, and
    # left out of checkpoints (rebuilt from their weights files). Projections and heads train.
    freeze_backbone: bool = False
    # false: timm / open_clip encoders output the backbone's own features (CLIP's embedding)
    # with no trainable projection to feature_dim; the classifier then sits right on them.
    project_features: bool = True
    # Width of every encoder's output feature h_m.
    feature_dim: int = field(default=64, metadata=bounds(1, 65536))
    # Base channel count of the small CNN encoders.
    width: int = field(default=16, metadata=bounds(1, 4096))
    dropout: float = field(default=0.0, metadata=bounds(0.0, 1.0))


def build_encoder(spec: ModalitySpec, cfg: ModelConfig, modality: str = "") -> nn.Module:
    """The encoder for one modality; fails naming the kind and family it cannot serve."""
    weights = cfg.weights.get(modality, "")
    out_dim = cfg.feature_dim if cfg.project_features else None  # None: the backbone's features
    frozen = cfg.freeze_backbone
    if spec.kind == "text" and cfg.text_encoder == "open_clip":
        return OpenClipText(cfg.open_clip_model, out_dim, weights or cfg.clip_weights, frozen)
    if spec.kind == "image" and cfg.encoder == "open_clip":
        if spec.shape[0] != 3:
            raise ValueError(f"model.encoder=open_clip takes RGB images; modality {modality!r} has "
                             f"shape {spec.shape} (data.frames must be 1)")
        return OpenClipImage(cfg.open_clip_model, out_dim, weights or cfg.clip_weights, frozen)
    if cfg.encoder == "open_clip" and spec.kind in ("audio", "depth", "vector"):
        raise ValueError(f"model.encoder=open_clip has no encoder for modality {modality!r} of "
                         f"kind {spec.kind!r}; open_clip serves image (and, with "
                         "model.text_encoder=open_clip, text) modalities")
    if cfg.encoder == "timm" and spec.kind in ("audio", "image", "depth"):
        return TimmEncoder(cfg.timm_name, spec.shape[0], out_dim, weights, frozen)
    if weights:
        raise ValueError(f"model.weights.{modality}: the small encoders take no pretrained weights")
    if spec.kind in ("audio", "image", "depth"):  # model.encoder=small
        return SmallCNN(spec.shape[0], cfg.width, cfg.feature_dim, cfg.dropout)
    if spec.kind == "text":  # model.text_encoder=bag, whatever model.encoder is
        return TokenBagEncoder(spec.vocab_size, cfg.width * 4, cfg.feature_dim, cfg.dropout)
    if spec.kind == "vector":
        return VectorMLP(spec.shape[0], cfg.width * 4, cfg.feature_dim, cfg.dropout)
    raise ValueError(f"model.encoder={cfg.encoder!r} has no encoder for modality kind {spec.kind!r}")
