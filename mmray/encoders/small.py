"""Small encoders for CPU runs and tests: a 3-stage CNN, a bag of token embeddings, an MLP."""

from __future__ import annotations

import torch
from torch import nn


def _stage(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv stages (w, 2w, 4w channels) -> global average pool -> linear; for spectrograms and images."""

    def __init__(self, in_channels: int, width: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            _stage(in_channels, width, pool=True),
            _stage(width, 2 * width, pool=True),
            _stage(2 * width, 4 * width, pool=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.proj = nn.Linear(4 * width, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


class TokenBagEncoder(nn.Module):
    """Mean of token embeddings over non-padding positions (id 0 pads) -> MLP."""

    def __init__(self, vocab_size: int, embed_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(embed_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(tokens) * mask).sum(1)
        return self.mlp(summed / mask.sum(1).clamp(min=1.0))


class VectorMLP(nn.Module):
    """Two-layer MLP over precomputed feature vectors (e.g. word2vec or VGG features)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
