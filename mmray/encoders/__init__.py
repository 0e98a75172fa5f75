"""Encoder factory: one encoder per modality, chosen by the modality's kind and the model config.

Every encoder maps a batch of one modality to features (B, feature_dim) and exposes `out_dim`.
"""

from __future__ import annotations

from torch import nn

from mmray.config import ModelConfig
from mmray.data.spec import ModalitySpec
from mmray.encoders.pretrained import OpenClipImage, OpenClipText, TimmEncoder
from mmray.encoders.small import SmallCNN, TokenBagEncoder, VectorMLP


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
