"""REP: replay-enhanced prompting for missing modalities, on frozen CLIP towers (METHODS.md §6).

Zhu, Liu, Ba, Xue, Zhang, "Buffer replay enhances the robustness of multimodal learning under
missing-modality" (REplay Prompting, arXiv 2511.23070). Reference code, as released with the
"REP: Replay-Enhance Prompting" README: https://github.com/AnonymousUser2313/REP (the paper names
github.com/ZhyHNU/REP): `clip/modules/clip_dynamic_memory.py` (`MultiModalMemoryLearner`,
`ResidualDynamicNet`) and `clip/modules/vision_transformer_memory.py` (the insertion in
`ResidualAttentionBlock`).

Each tower receives a buffer of private, shared and dynamic tokens in front of its tokens:
- private (per tower and missing case: the tower's modality present or missing), initialised from
  CLIP's end-of-text embedding (text) or class embedding (image) + 0.2 · unit noise;
- shared (per missing case: complete / image only / text only), random unit vectors + 0.2 · noise,
  projected into each tower by a Net;
- dynamic: missing-case-specific learnable queries cross-attending (one head) over the tower's
  layer-0 tokens.
Feature aggregation and replay: m⁰_t = Net⁰_t(LN⁰_t[p_img; p_txt]) for tower t, and for k ≥ 1
    mᵏ_t = α · Netᵏ_t(LNᵏ_t[mᵏ⁻¹_img; mᵏ⁻¹_txt]) + (1 − α) · mᵏ⁻¹_t,  α learnable (init 0.5),
Net = fc(→256) → LayerNorm → GELU → Dropout(0.1) → fc, plus a linear skip. Layer 0 gets
[m⁰_t; shared_t; dynamic_t] in front; layers k = 1..depth−1 replace the private part with mᵏ_t
(the shared and dynamic tokens flow on through the blocks). Optional: λ · a separation term
between private and shared tokens. Only the buffers, their networks and the linear classifier on
[image feature; text feature] train; the missing modality's feature is zeroed before it.

Presets (reference code read: AnonymousUser2313/REP at commit
895632be9bcb8028177604946ab1336f3a2f1bf2; the port of its training step is
tests/reference/test_ref_rep.py):
- `reference`: learn_queries=false, learn_dynamic_attention=false, tune_output_layers=false,
  head_init_std=0.02, reference_decay_groups=true: what `run.py` trains for Food-101 and MM-IMDb.
  - learn_queries=false: the dynamic queries (`memories_dynamic_complete/_image/_text` in
    `ResidualAttentionBlock.__init__`, `clip/modules/vision_transformer_memory.py`) are plain
    tensors drawn N(0, 0.02) at start-up: never trained nor saved (mmray keeps them as buffers,
    so a checkpoint restores them).
  - learn_dynamic_attention=false, tune_output_layers=false: `CustomCLIP.__init__`
    (`clip/modules/clip_dynamic_memory.py`) freezes every parameter of both towers for Food-101
    and MM-IMDb, the dynamic tokens' cross-attention (`attn_memory`, inside block 0) included;
    the name filter of `CLIPransformerSS.__init__` that follows only freezes, so ln_post, the
    image projection, ln_final and `attn_memory` stay frozen. The attention keeps its random
    initialisation: the dynamic tokens are a fixed random function of the layer-0 tokens.
  - head_init_std=0.02: the classifier starts N(0, 0.02) with zero bias (`init_weights`,
    `clip/modules/objectives.py`).
  - reference_decay_groups=true: `set_schedule` (`clip/modules/clip_utils.py`) spares from weight
    decay the names containing "bias" or "norm.weight": every bias and each Net's inner
    LayerNorm weight, but not the per-layer LayerNorms before the Nets (`layernorm_text.0.weight`
    matches neither), nor α, nor the buffers.
  The reference's other code path, Hateful Memes: `CustomCLIP` first unfreezes both towers, then
  the name filter freezes all but ln_post, the image projection, ln_final and `attn_memory`, so
  `preset: reference` with tune_output_layers=true and learn_dynamic_attention=true.
- `paper`: {} (the defaults are mmray's reading of the paper, METHODS.md §6: learnable dynamic
  queries and attention, frozen CLIP; the separation term stays off, `separation_weight` 0, as
  no weight for it is taken from the paper here).

Where mmray differs from the reference implementation, under every preset:
- The towers are open_clip's CLIP (the reference: OpenAI's `clip` code with ViT-B/16, fp16
  autocast); the blocks, the insertion and the pooling (class token after the buffers; the
  end-of-text token with the buffers dropped) compute the same. The text tower's causal mask
  spans buffers and text in both.
- The separation term is in the paper, not in the reference code. mmray's reading of it: the mean
  squared cosine similarity between each sample's layer-0 private and shared tokens in each tower,
  i.e. the MSE of P̂Ŝᵀ to 0 (orthogonality), weighted by `separation_weight` (0, off, by default).
- The reference's `dynamic_common_token_net` is built but never called (its forward receives no
  features): left out.
- Widths come from the model (the reference hard-codes 512 / 768 / 512); the shared width is
  `shared_dim` (0: the text tower's, 512 for ViT-B/16 as in the reference). The three buffer
  lengths are separate settings (the reference splits one length, 36, in thirds); a length may be
  0 to ablate that kind of token.
- The buffers are computed for the whole batch at once (the reference loops over samples), and the
  depth is capped at the shallower tower's (the reference computes buffers for all
  `memory_depth` layers; those past the last block get no gradient).
- A sample missing both modalities has no buffers: an error naming it (the reference's missing
  tables never make one, nor do mmray's).
- The optimizer (AdamW betas (0.9, 0.98) from `transformers`, which decays after the Adam step;
  per-step warm-up and linear decay; fp16 autocast) is the run's `train:` config, not the method's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import Batch, MethodConfig, StepContext
from mmray.methods.clip_prompting import ROLES, ClipPrompting
from mmray.modules.prompts import MISSING_CASES, MISSING_IMAGE, MISSING_TEXT, Insertion


@dataclass
class Config:
    # Tokens of each kind in a tower's buffer (12 each, 36 in all, in the paper): private (per
    # tower and missing case, replayed across depth), shared (per missing case, projected into
    # each tower), dynamic (queries cross-attending over layer-0 tokens). 0 leaves a kind out.
    private_length: int = field(default=12, metadata=bounds(0, 4096))
    shared_length: int = field(default=12, metadata=bounds(0, 4096))
    dynamic_length: int = field(default=12, metadata=bounds(0, 4096))
    # Layers 0..depth-1 receive the replayed private buffers (6 in the paper); capped at the
    # shallower tower's depth.
    depth: int = field(default=6, metadata=bounds(1, 1000))
    # Hidden width and dropout of every Net (fc → LayerNorm → GELU → Dropout → fc, + skip).
    hidden: int = field(default=256, metadata=bounds(1, 65536))
    dropout: float = field(default=0.1, metadata=bounds(0.0, 1.0))
    # Initial α of the replay mᵏ = α·Netᵏ(LN[mᵏ⁻¹_img; mᵏ⁻¹_txt]) + (1 − α)·mᵏ⁻¹; learnable.
    alpha_init: float = 0.5
    # Width of the shared buffers before their projection; 0: the text tower's width.
    shared_dim: int = field(default=0, metadata=bounds(0, 65536))
    # Scale of the noise added to the buffers' initial values (0.2 in the reference).
    init_noise: float = field(default=0.2, metadata=bounds(0.0, None))
    # Train the dynamic queries; false: fixed random queries, as the reference's plain tensors.
    learn_queries: bool = True
    # Train the dynamic tokens' cross-attention; false: it keeps its random initialisation, as in
    # the reference's Food-101 / MM-IMDb runs (frozen with the towers).
    learn_dynamic_attention: bool = True
    # Also train CLIP's ln_post, image projection and ln_final, as the reference's Hateful Memes
    # runs do.
    tune_output_layers: bool = False
    # λ of the separation term mean((P̂Ŝᵀ)²) between private and shared layer-0 tokens (the
    # paper's; not in the reference code); 0 = off.
    separation_weight: float = field(default=0.0, metadata=bounds(0.0, None))
    # Std of the classifier's N(0, std) initial weights, bias zero (0.02 in the reference); 0:
    # PyTorch's default initialisation.
    head_init_std: float = field(default=0.0, metadata=bounds(0.0, None))
    # Weight decay spares every bias and each Net's inner LayerNorm weight, as the reference's
    # optimizer does; false: it decays everything that trains.
    reference_decay_groups: bool = False


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def replay(previous: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """mᵏ = α · new + (1 − α) · mᵏ⁻¹."""
    return alpha * new + (1 - alpha) * previous


def separation_loss(private: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """mean over samples and token pairs of cos(p_i, s_j)²: the MSE of P̂Ŝᵀ to 0.
    private (B, P, D), shared (B, S, D); 0 when either is empty."""
    if private.shape[1] == 0 or shared.shape[1] == 0:
        return private.new_zeros(())
    cos = F.normalize(private.float(), dim=-1) @ F.normalize(shared.float(), dim=-1).transpose(1, 2)
    return cos.pow(2).mean()


def token_init(token: torch.Tensor, n: int, noise: float) -> torch.Tensor:
    """n copies of `token` (D,), each + noise · a random unit vector: the private buffers'
    start (CLIP's end-of-text embedding for text, its class embedding for images)."""
    unit = F.normalize(torch.randn(n, token.shape[0]), dim=-1)
    return token.detach().float().expand(n, -1) + noise * unit


def shared_init(n: int, width: int, noise: float) -> torch.Tensor:
    """n random unit vectors + noise · N(0, 1): the shared buffers' start, as in the reference."""
    return F.normalize(torch.randn(n, width), dim=-1) + noise * torch.randn(n, width)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class ResidualNet(nn.Module):
    """Net: fc(→hidden) → LayerNorm → GELU → Dropout → fc(→out), plus a skip, linear when the
    widths differ and the identity when they match (as in the reference)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, d_out))
        self.skip = nn.Linear(d_in, d_out) if d_in != d_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class TowerBuffers(nn.Module):
    """What belongs to one tower t: its private buffers, replay networks and norms, the shared
    buffers' projection into it, and its dynamic queries with their cross-attention."""

    def __init__(self, width: int, both: int, shared_dim: int, start: torch.Tensor, depth: int,
                 o: Config):
        super().__init__()
        # [present, missing] × private_length × width
        self.private = nn.Parameter(torch.stack([token_init(start, o.private_length, o.init_noise)
                                                 for _ in range(2)]))
        self.norms = nn.ModuleList([nn.LayerNorm(both) for _ in range(depth)])
        self.nets = nn.ModuleList([ResidualNet(both, width, o.hidden, o.dropout)
                                   for _ in range(depth)])
        self.shared_proj = ResidualNet(shared_dim, width, o.hidden, o.dropout)
        queries = torch.randn(len(MISSING_CASES), o.dynamic_length, width) * 0.02  # as the reference
        if o.learn_queries:
            self.queries = nn.Parameter(queries)
        else:
            self.register_buffer("queries", queries)
        self.attn = nn.MultiheadAttention(width, 1, batch_first=True) if o.dynamic_length else None
        if self.attn is not None and not o.learn_dynamic_attention:
            self.attn.requires_grad_(False)

    def step(self, k: int, both: torch.Tensor) -> torch.Tensor:
        """Netᵏ_t(LNᵏ_t[m_img; m_txt])."""
        return self.nets[k](self.norms[k](both))

    def dynamic(self, case: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Each sample's case queries attending over its layer-0 tokens: (B, dynamic, width)."""
        q = self.queries[case].to(x0.dtype)
        if self.attn is None:
            return q
        return self.attn(q, x0, x0, need_weights=False)[0]


class ReplayBuffers(nn.Module):
    """The buffers of both towers, the shared buffers and α; `forward` gives each tower's
    insertions and the layer-0 private and shared tokens (for the separation term)."""

    def __init__(self, widths: dict[str, int], starts: dict[str, torch.Tensor], depth: int,
                 o: Config):
        super().__init__()
        both = widths["image"] + widths["text"]
        shared_dim = o.shared_dim or widths["text"]
        self.depth, self.private_length = depth, o.private_length
        # [complete, image only (text missing), text only (image missing)] × shared_length × dim
        self.shared = nn.Parameter(torch.stack([shared_init(o.shared_length, shared_dim, o.init_noise)
                                                for _ in MISSING_CASES]))
        self.alpha = nn.Parameter(torch.tensor(float(o.alpha_init)))
        self.towers = nn.ModuleDict({r: TowerBuffers(widths[r], both, shared_dim, starts[r], depth, o)
                                     for r in ROLES})

    def private_chain(self, case: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """[{role: mᵏ_role (B, private, width)} for k < depth]: the replay across depth."""
        missing = {"image": (case == MISSING_IMAGE).long(), "text": (case == MISSING_TEXT).long()}
        p = {r: self.towers[r].private[missing[r]] for r in ROLES}
        both = torch.cat([p["image"], p["text"]], dim=-1)
        chain = [{r: self.towers[r].step(0, both) for r in ROLES}]
        for k in range(1, self.depth):
            prev = chain[-1]
            both = torch.cat([prev["image"], prev["text"]], dim=-1)
            chain.append({r: replay(prev[r], self.towers[r].step(k, both), self.alpha) for r in ROLES})
        return chain

    def forward(self, case: torch.Tensor, x0: dict[str, torch.Tensor]):
        chain = self.private_chain(case)
        shared = self.shared[case]  # (B, shared, shared_dim)
        inserts, layer0 = {}, {}
        for r in ROLES:
            t = self.towers[r]
            s = t.shared_proj(shared)
            first = torch.cat([chain[0][r], s, t.dynamic(case, x0[r]).to(s.dtype)], dim=1)
            inserts[r] = {0: Insertion(first)}
            for k in range(1, self.depth):
                inserts[r][k] = Insertion(chain[k][r], drop=self.private_length)
            layer0[r] = (chain[0][r], s)
        return inserts, layer0


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class REP(ClipPrompting):
    name = "rep"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # Food-101 / MM-IMDb; Hateful Memes: + tune_output_layers, learn_dynamic_attention
        "reference": {"learn_queries": False, "learn_dynamic_attention": False,
                      "tune_output_layers": False, "head_init_std": 0.02,
                      "reference_decay_groups": True},
        "paper": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        o = self.options
        image, text = self.tower("image"), self.tower("text")
        # The text buffers start from end-of-text, the highest id (49407 in CLIP's BPE).
        starts = {"image": image.class_token(), "text": text.token(text.vocab_size - 1)}
        self.replay_buffers = ReplayBuffers({"image": image.width, "text": text.width}, starts,
                                     self.depth(o.depth), o)
        if o.tune_output_layers:
            for part in (image.visual.ln_post, text.ln_final):
                part.requires_grad_(True)
            image.visual.proj.requires_grad_(True)

    def insertions(self, case: torch.Tensor, x0: dict[str, torch.Tensor]):
        inserts, layer0 = self.replay_buffers(case, x0)
        sep = torch.stack([separation_loss(*layer0[r]) for r in ROLES]).mean()
        return inserts, {"separation": sep}

    def no_decay(self) -> list[nn.Parameter]:
        """Every bias, and the LayerNorm weight inside each Net (the reference's filter matches
        its name, `layernorm.weight`)."""
        nets = [m for m in self.replay_buffers.modules() if isinstance(m, ResidualNet)]
        return super().no_decay() + [net.body[1].weight for net in nets]

    def tower_parameters(self, role: str) -> list[nn.Parameter]:
        own = list(self.replay_buffers.towers[role].parameters())
        return own + [p for p in self.tower(role).parameters() if p.requires_grad]

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            out, extras = self.forward_with_extras(batch)
        task = self.criterion(out.logits, batch["label"])
        sep = extras["separation"]
        loss = task + self.options.separation_weight * sep if self.options.separation_weight else task
        return self.backward_and_step(loss, optimizer, ctx, {"loss/task": task, "rep/separation": sep})

    def epoch_metrics(self) -> dict[str, float]:
        return {"rep/alpha": float(self.replay_buffers.alpha.detach())}
