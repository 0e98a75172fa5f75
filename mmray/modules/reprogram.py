"""Attention-based reprogramming into a frozen open_clip image tower (METHODS.md §8).

    stem:          x (1, H, W) → Conv2d(1 → D, k, stride s) → tokens (N, D) [→ LayerNorm]
                   → [CLS; tokens] + positional embedding → LayerNorm          (trainable)
    reprogramming: S learned queries Q (1 × S × D) attend over the N + 1 stem tokens,
                   MultiheadAttention(D, heads, dropout) → S tokens           (trainable)
    frozen tail:   CLIP's image transformer → ln_post → CLS slot → proj        (frozen)

S = 1 + (H/p)(W/p) is the number of token slots of the CLIP tower (CLS + patches): the S outputs
take the place of CLIP's embedded image tokens and go straight into its transformer (CLIP's own
class/position embeddings and ln_pre are not used). `SeparateTower` is the baseline: a trainable
copy of the tail, fed the stem's tokens directly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ModalityStem(nn.Module):
    """Patches of a (C, H, W) tensor as tokens: conv (no bias) → [LayerNorm] → CLS + position
    embedding → LayerNorm. Audio uses a strided kernel and the LayerNorm after the conv (the
    reference's AudioTokenizer); depth uses kernel = stride = the patch size, without it."""

    def __init__(self, in_shape: tuple[int, ...], width: int, kernel: int, stride: int,
                 token_norm: bool, what: str = "input"):
        super().__init__()
        c, h, w = in_shape
        if h < kernel or w < kernel:
            raise ValueError(f"{what}: a {h}×{w} input is smaller than the stem's {kernel}×{kernel} "
                             "kernel; use larger inputs or a smaller kernel")
        self.conv = nn.Conv2d(c, width, kernel, stride, bias=False)
        self.norm = nn.LayerNorm(width) if token_norm else nn.Identity()
        self.grid = ((h - kernel) // stride + 1, (w - kernel) // stride + 1)
        self.num_tokens = 1 + self.grid[0] * self.grid[1]
        scale = width ** -0.5  # CLIP's initialisation of its class and position embeddings
        self.cls = nn.Parameter(scale * torch.randn(width))
        self.pos = nn.Parameter(scale * torch.randn(self.num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.conv(x).flatten(2).transpose(1, 2))  # (B, N, D)
        cls = self.cls.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, tokens], dim=1) + self.pos.to(tokens.dtype))


class ReprogrammingAttention(nn.Module):
    """S learned queries attend over a stem's tokens: out = MHA(Q, X, X), (B, S, D)."""

    def __init__(self, slots: int, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"{heads} heads do not divide the CLIP width {width}")
        self.query = nn.Parameter(torch.randn(1, slots, width))  # the reference's unit-variance init
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # A copy per sample, not an expand view: a view of a parameter made under no_grad
        # breaks torch's module tracker (used when FLOPs are counted). B·S·D values: cheap.
        query = self.query.to(tokens.dtype).repeat(tokens.shape[0], 1, 1)
        out, _ = self.attn(query, tokens, tokens, need_weights=False)
        return out


class ReprogramPath(nn.Module):
    """The trainable part for one modality: stem, then reprogramming into S CLIP token slots."""

    def __init__(self, stem: ModalityStem, reprogram: ReprogrammingAttention):
        super().__init__()
        self.stem = stem
        self.reprogram = reprogram

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reprogram(self.stem(x))


def encode_tokens(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """An image tower from its transformer on: transformer → ln_post → CLS slot → proj.

    `tower` has open_clip VisionTransformer's `transformer`, `ln_post` and `proj`. LayerNorm acts
    per token, so normalising the CLS slot alone equals ln_post followed by taking the slot.
    """
    x = tower.transformer(tokens)
    x = tower.ln_post(x[:, 0])
    return x @ tower.proj if tower.proj is not None else x


class SeparateTower(nn.Module):
    """A trainable image-tower tail (transformer, ln_post, proj) of its own: the baseline of one
    encoder per modality. Copies `visual`'s weights (or a freshly initialised tower's)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.transformer = copy.deepcopy(visual.transformer)
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone()) if visual.proj is not None else None
        self.requires_grad_(True)


class SeparatePath(nn.Module):
    """Stem tokens straight into a trainable tower: the separately trained encoder."""

    def __init__(self, stem: ModalityStem, tower: SeparateTower):
        super().__init__()
        self.stem = stem
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode_tokens(self.tower, self.stem(x))


@torch.no_grad()
def class_text_embeddings(clip: nn.Module, tokenizer, class_names: list[str] | tuple[str, ...],
                          templates: list[str]) -> torch.Tensor:
    """(C, E) zero-shot class embeddings: t_c = normalise(mean_k normalise(text(template_k(c))));
    underscores in class names become spaces (`chirping_birds` → "chirping birds")."""
    device = clip.logit_scale.device
    texts = [t.format(name.replace("_", " ")) for name in class_names for t in templates]
    emb = F.normalize(clip.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
    return F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)
