"""CLIP's towers with learned tokens inserted between their blocks: the forward that MAP and REP
(METHODS.md §6) share, and the missing case each sample's prompts are chosen by.

open_clip's `encode_image` / `encode_text` run a whole transformer in one call; prompting needs
the residual stream between blocks. `VisionTower` and `TextTower` split a tower into
embed → blocks (with insertions) → pool, reusing open_clip's own pieces (`_embeds`, `_pool`,
`text_global_pool`), so that with nothing inserted they compute exactly what open_clip computes
(a test pins that).

An `Insertion` at layer k puts tokens (B, P, D) in front of the residual stream right before block
k, after dropping its `drop` leading tokens (the previous layer's prompt outputs, when prompts
replace rather than accumulate). Inserted tokens never reach the pooling: the vision tower pools
its class token, which sits right after them; the text tower pools the end-of-text position of
the text tokens. In the text tower the causal mask spans prefix and text, so every text token
attends to every inserted token and an inserted token only to those before it (as the REP
reference code does); the positional embedding is added to the text tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The missing case of an image-text sample, as the MAP and REP reference code number them.
COMPLETE, MISSING_TEXT, MISSING_IMAGE = 0, 1, 2
MISSING_CASES = ("complete", "missing_text", "missing_image")


def missing_case(image_present: torch.Tensor, text_present: torch.Tensor,
                 ids: list[str] | None = None) -> torch.Tensor:
    """(B,) long: 0 both present, 1 text missing, 2 image missing. A sample missing both has no
    case (the missing tables never make one): an error naming the first few."""
    both = ~image_present & ~text_present
    if bool(both.any()):  # a host sync, one per batch
        idx = torch.nonzero(both).flatten()[:5].tolist()
        names = [ids[i] for i in idx] if ids is not None else idx
        raise ValueError(f"sample(s) {names} miss both the image and the text; prompts exist "
                         f"for the cases {MISSING_CASES} only")
    case = torch.full_like(image_present, COMPLETE, dtype=torch.long)
    case[~text_present] = MISSING_TEXT
    case[~image_present] = MISSING_IMAGE
    return case


@dataclass
class Insertion:
    """Tokens placed in front of the residual stream before one block."""

    tokens: torch.Tensor  # (B, P, D)
    drop: int = 0  # leading tokens removed first (the prompts being replaced)


def apply_insertion(x: torch.Tensor, ins: Insertion) -> torch.Tensor:
    return torch.cat([ins.tokens.to(x.dtype), x[:, ins.drop:]], dim=1)


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """Additive (n, n) mask, −inf above the diagonal: open_clip's `build_causal_mask`."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


class ClipTower(nn.Module):
    """embed → blocks with insertions → pool. Subclasses say how to embed and pool.

    The tower is frozen (the caller's choice, see `freeze` in mmray.encoders.pretrained) and then
    stays in eval mode whatever `train()` asks: no dropout, no patch dropout.
    """

    width: int
    layers: int
    out_dim: int
    causal: bool = False

    def __init__(self, frozen: bool = True):
        super().__init__()
        self.frozen = frozen

    def train(self, mode: bool = True) -> ClipTower:
        return super().train(mode and not self.frozen)

    def resblocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def batch_first(self) -> bool:
        raise NotImplementedError

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0, (B, L, width)."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Features (B, out_dim) from the last block's output with the prefix removed."""
        raise NotImplementedError

    def blocks(self, x: torch.Tensor, insertions: dict[int, Insertion] | None = None
               ) -> tuple[torch.Tensor, int]:
        """Run every block, inserting before block k what `insertions[k]` holds; returns the
        output and the number of inserted tokens still in front of it."""
        insertions = insertions or {}
        bad = sorted(k for k in insertions if not 0 <= k < self.layers)
        if bad:
            raise ValueError(f"insertions at layers {bad}; this tower has layers 0..{self.layers - 1}")
        prefix = 0
        for k, block in enumerate(self.resblocks()):
            if k in insertions:
                ins = insertions[k]
                if ins.drop > prefix:
                    raise ValueError(f"layer {k}: cannot drop {ins.drop} inserted tokens; "
                                     f"{prefix} are in front")
                x = apply_insertion(x, ins)
                prefix += ins.tokens.shape[1] - ins.drop
            mask = causal_mask(x.shape[1], x.device) if self.causal else None
            if self.batch_first():
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        return x, prefix

    def encode(self, x: torch.Tensor, raw: torch.Tensor,
               insertions: dict[int, Insertion] | None = None) -> torch.Tensor:
        """Features from the embedded stream `x` (from `embed(raw)`)."""
        x, prefix = self.blocks(x, insertions)
        return self.pool(x[:, prefix:], raw)

    def forward(self, raw: torch.Tensor,
                insertions: dict[int, Insertion] | None = None) -> torch.Tensor:
        return self.encode(self.embed(raw), raw, insertions)


class VisionTower(ClipTower):
    """open_clip's ViT image tower (`clip.visual`): patches + class token, ln_pre, blocks,
    ln_post on the class token, proj."""

    def __init__(self, visual: nn.Module, frozen: bool = True):
        from open_clip.transformer import VisionTransformer

        super().__init__(frozen)
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            pooled = " with attentional pooling" if isinstance(visual, VisionTransformer) else ""
            raise ValueError(f"prompting needs a ViT image tower pooling its class token; this "
                             f"model's is {type(visual).__name__}{pooled} (use a ViT-* open_clip "
                             "model)")
        self.visual = visual
        self.width = visual.class_embedding.shape[0]
        self.layers = len(visual.transformer.resblocks)
        self.out_dim = visual.output_dim
        self.image_size = tuple(visual.image_size)

    def resblocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def batch_first(self) -> bool:
        return self.visual.transformer.batch_first

    def class_token(self) -> torch.Tensor:
        """CLIP's learned class embedding (width,): REP's image buffers start from it."""
        return self.visual.class_embedding

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images)

    def pool(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TextTower(ClipTower):
    """open_clip's text tower of a `CLIP` model: token + positional embeddings, causal blocks,
    ln_final, the end-of-text token (highest id), text_projection."""

    causal = True

    def __init__(self, clip: nn.Module, frozen: bool = True):
        super().__init__(frozen)
        if not hasattr(clip, "token_embedding") or getattr(clip, "attn_mask", None) is None:
            raise ValueError(f"prompting needs open_clip's CLIP text tower with a causal mask; "
                             f"this model is {type(clip).__name__} (use a ViT-* CLIP model)")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.width = self.token_embedding.embedding_dim
        self.layers = len(self.transformer.resblocks)
        proj = self.text_projection
        self.out_dim = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        self.context_length = self.positional_embedding.shape[0]
        self.vocab_size = self.token_embedding.num_embeddings

    def resblocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def batch_first(self) -> bool:
        return self.transformer.batch_first

    def token(self, token_id: int) -> torch.Tensor:
        """The embedding of one token id (width,): REP's text buffers start from end-of-text."""
        return self.token_embedding.weight[token_id]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens).to(self.transformer.get_cast_dtype())
        return x + self.positional_embedding.to(x.dtype)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        x = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj
