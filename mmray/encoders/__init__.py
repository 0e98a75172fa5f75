"""Encoder factory: one encoder per modality, chosen by the modality's kind and the model config.

Every encoder maps a batch of one modality to features (B, feature_dim) and exposes `out_dim`.
"""

from __future__ import annotations

from torch import nn

from mmray.config import ModelConfig
from mmray.data.spec import ModalitySpec
from mmray.encoders.pretrained import OpenClipText, TimmEncoder
from mmray.encoders.small import SmallCNN, TokenBagEncoder, VectorMLP


def build_encoder(spec: ModalitySpec, cfg: ModelConfig, modality: str = "") -> nn.Module:
    """The encoder for one modality; fails naming the kind and family it cannot serve."""
    weights = cfg.weights.get(modality, "")
    if spec.kind == "text" and cfg.text_encoder == "open_clip":
        return OpenClipText(cfg.open_clip_model, cfg.feature_dim, weights)
    if cfg.encoder == "timm" and spec.kind in ("audio", "image", "depth"):
        return TimmEncoder(cfg.timm_name, spec.shape[0], cfg.feature_dim, weights)
    if weights:
        raise ValueError(f"model.weights.{modality}: the small encoders take no pretrained weights")
    if cfg.encoder in ("small", "timm"):
        if spec.kind in ("audio", "image", "depth"):
            return SmallCNN(spec.shape[0], cfg.width, cfg.feature_dim, cfg.dropout)
        if spec.kind == "text":
            return TokenBagEncoder(spec.vocab_size, cfg.width * 4, cfg.feature_dim, cfg.dropout)
        if spec.kind == "vector":
            return VectorMLP(spec.shape[0], cfg.width * 4, cfg.feature_dim, cfg.dropout)
    raise ValueError(f"model.encoder={cfg.encoder!r} has no encoder for modality kind {spec.kind!r}")
