"""Reprogramming multimodality: audio and depth reprogrammed into a frozen CLIP image encoder
(METHODS.md §8).

Seed: "Reprogramming Multimodality" (attention-based reprogramming of other modalities into the
image domain of a frozen open_clip ViT, inspired by ImageBind). Reference code: its
`OpenCLIP_reprogrammed` model (`Reprogramming_attention`, `AudioTokenizer`, `VisisualTokenizer`)
with the notebooks `audio_train_n_test.ipynb` / `depth_train_n_test.ipynb`.

For every audio or depth modality m a trainable stem turns the input into tokens and the
attention reprogramming layer's S learned queries read them into S token slots of the frozen
CLIP image transformer (`ReprogramPath`), whose ln_post, CLS slot and proj give the
embedding e_m. Training pulls e_m onto a frozen anchor with the symmetric InfoNCE

    s = ê ∙ âᵀ / τ_m,   L_m = ½ [ mean_i −log Σ_{j∈P(i)} softmax_j(s_i·) + (the same over s's columns) ]

(ê, â L2-normalised, fixed temperature τ_m: 0.05 audio, 1.0 depth in the reference), L = Σ_m L_m.
The anchor (`anchor`): `image`, the frozen CLIP embedding of the sample's paired image (P(i) =
{i}, as in the reference); `text`, the CLIP text embedding of the sample's class prompt, for
datasets with no paired image such as ESC-50 (P(i) = the batch's samples of i's class, which
share i's anchor); `auto` picks image when the dataset has an image modality. Evaluation is
zero-shot: z_m = ê_m ∙ T_kᵀ / τ_m against the class embeddings T_k (CLIP text embeddings of the
class names in the kind's prompt templates, averaged); the fused logits average z_m over the
present modalities. The paired image's own CLIP zero-shot logits are reported as that modality's
logits (`acc_<image>`): what the frozen anchor knows, a ceiling for the reprogrammed modality.
Only the stems and the reprogramming layers train; CLIP stays frozen and in eval mode.
`encoder: separate` is the baseline the seed compares against: a trainable copy of the image
tower per modality fed the stem tokens directly (ImageBind-style separate encoders), with the
same loss and evaluation. Each run logs its trainable parameters and the measured FLOPs per
sample of each modality's encoder (`reprogram/*`); `bench/reprogram_cost.py` compares the two.

With several Ray Train workers, each gathers every worker's embeddings and anchors
(`StepContext.gather_with_grad`), so the InfoNCE negatives are the global batch's, as in one
process.

Where mmray differs from the reference implementation:
- Only `anchor: image` is the reference's objective (audio or depth against the paired image).
  ESC-50 has no paired image (the reference lists AudioSet, whose clips come with video frames,
  for training audio, and ESC-50 for evaluating it). mmray's text anchor instead pulls each clip
  onto CLIP's embedding of its class prompt: it trains on the labels, so ESC-50 accuracy after
  it is supervised accuracy through CLIP's text space, not zero-shot transfer, and its
  evaluation uses the very embeddings it was trained towards.
- The temperature is fixed (METHODS.md); the reference model also holds an unused learnable
  logit scale. The image diagnostic uses CLIP's own logit scale.
- Stem sizes follow the CLIP model: kernel = its patch size (14 for ViT-H-14, as the reference),
  audio stride round(kernel·10/14) (10 for 14), unless given. Audio arrives as (1, frames, bins),
  the reference's (1, bins, frames) transposed: a square kernel sees the same patches.
- The anchor images come from the dataset's image featurizer (data.image.mean/std; set them to
  CLIP's for real CLIP weights) and are resized bilinearly to CLIP's input size if they differ.
- The reference's text-source path, video and IMU tokenizers, and the "mid logit" side output
  are not implemented. Samples whose modality (or anchor image) is missing are left out of that
  modality's loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds, path_field
from mmray.cost import count_params, flops_per_sample
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.encoders.pretrained import build_clip, keep_frozen_out_of_state_dict
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext

KINDS = ("audio", "depth")  # modality kinds that get a stem
TEMPERATURE = {"audio": 0.05, "depth": 1.0}  # the reference's
TEMPLATES = {
    "audio": ["a sound of {}.", "the sound of {}.", "a recording of {}."],
    "depth": ["a depth photo of a {}.", "a photo of a {}.", "a photo of the {}."],
    "image": ["a photo of a {}.", "a photo of the {}.", "an image of a {}."],
}


@dataclass
class Config:
    # open_clip model of the frozen encoder (the reference: ViT-H-14); "mmray-tiny" is a 2-layer
    # one for tests and CPU runs.
    clip_model: str = "mmray-tiny"
    # Local open_clip state dict of that model; empty: random weights (tests only).
    clip_weights: str = path_field()
    # Modalities given a stem (of kind audio or depth); empty: every audio and depth modality.
    modalities: list[str] = field(default_factory=list)
    # reprogram: stem → reprogramming layer → frozen CLIP tower; separate: stem → a trainable
    # copy of the tower per modality (the baseline of separately trained encoders).
    encoder: Literal["reprogram", "separate"] = "reprogram"
    # Initial weights of a separate tower: CLIP's image tower, or a fresh random one.
    separate_init: Literal["clip", "random"] = "clip"
    # Contrastive anchor: image (the paired image's frozen CLIP embedding), text (the CLIP text
    # embedding of the sample's class prompt), auto (image if the dataset has an image modality).
    anchor: Literal["auto", "image", "text"] = "auto"
    # The paired image modality; empty: the dataset's first image modality (if any).
    image_modality: str = ""
    # Fixed InfoNCE and zero-shot temperature per modality kind; kinds not given keep these.
    temperature: dict[str, float] = field(default_factory=lambda: dict(TEMPERATURE))
    # Reprogramming attention: heads (must divide CLIP's width) and dropout.
    heads: int = field(default=8, metadata=bounds(1))
    dropout: float = field(default=0.3, metadata=bounds(0.0, 1.0))
    # Audio stem kernel and stride; 0: CLIP's patch size, and round(kernel · 10 / 14).
    audio_kernel: int = field(default=0, metadata=bounds(0))
    audio_stride: int = field(default=0, metadata=bounds(0))
    # Depth stem patch (kernel = stride); 0: CLIP's patch size.
    depth_patch: int = field(default=0, metadata=bounds(0))
    # Prompt templates per kind ("{}" is the class name), averaged into class embeddings;
    # "image" serves the paired image's own zero-shot logits. Kinds not given keep these.
    templates: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in TEMPLATES.items()})

    def validate(self, path: str, errors: list[str]) -> None:
        self.temperature = {**TEMPERATURE, **self.temperature}
        self.templates = {**TEMPLATES, **self.templates}
        for key, value in self.temperature.items():
            if key not in KINDS:
                errors.append(f"{path}.temperature.{key}: not a modality kind; accepted: {list(KINDS)}")
            elif not value > 0:
                errors.append(f"{path}.temperature.{key}: {value} must be positive")
        for key, templates in self.templates.items():
            if key not in TEMPLATES:
                errors.append(f"{path}.templates.{key}: not a kind; accepted: {list(TEMPLATES)}")
            elif not templates or any("{}" not in t for t in templates):
                errors.append(f"{path}.templates.{key}: needs a list of templates each with {{}} "
                              "for the class name")


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------


def info_nce(x: torch.Tensor, y: torch.Tensor, temperature: float,
             positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised rows x_i, y_j: s = x yᵀ / τ,
    L = ½ [mean_i −log Σ_{j∈P_i} softmax(s_i·)_j + mean_j −log Σ_{i∈P_j} softmax(s_·j)_i],
    P (B, B, bool) the positives, the identity (x_i pairs with y_i) by default."""
    s = x.float() @ y.float().T / temperature
    if positives is None:
        positives = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)

    def one_way(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(s, 1) - torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1)).mean()

    return (one_way(s, positives) + one_way(s.T, positives.T)) / 2


def zero_shot_logits(emb: torch.Tensor, class_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = normalise(e) ∙ Tᵀ / τ against L2-normalised class embeddings T (C, E)."""
    return F.normalize(emb.float(), dim=-1) @ class_emb.float().T / temperature


# ---------------------------------------------------------------------------------------------
# Modules
#
#     stem:          x (1, H, W) → Conv2d(1 → D, k, stride s) → tokens (N, D) [→ LayerNorm]
#                    → [CLS; tokens] + positional embedding → LayerNorm          (trainable)
#     reprogramming: S learned queries Q (1 × S × D) attend over the N + 1 stem tokens,
#                    MultiheadAttention(D, heads, dropout) → S tokens           (trainable)
#     frozen tail:   CLIP's image transformer → ln_post → CLS slot → proj        (frozen)
#
# S = 1 + (H/p)(W/p) is the number of token slots of the CLIP tower (CLS + patches): the S outputs
# take the place of CLIP's embedded image tokens and go straight into its transformer (CLIP's own
# class/position embeddings and ln_pre are not used). `SeparateTower` is the baseline: a trainable
# copy of the tail, fed the stem's tokens directly.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class Reprogram(Method):
    """Trainable stems reprogrammed into a frozen CLIP image tower (or separate towers), trained
    contrastively onto CLIP embeddings, evaluated zero-shot against class prompts."""

    name = "reprogram"
    Config = Config
    modalities_supported = (1, 2, 3)

    @classmethod
    def unsupported(cls, spec: DatasetSpec) -> str:
        if reason := super().unsupported(spec):
            return reason
        if spec.multilabel:
            return f"zero-shot classification is single-label; dataset {spec.name!r} is multi-label"
        if not any(s.kind in KINDS and len(s.shape) == 3 for s in spec.modalities.values()):
            return (f"reprogramming needs an audio or depth modality; dataset {spec.name!r} has "
                    f"{ {m: s.kind for m, s in spec.modalities.items()} }")
        return ""

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        # Metrics and per-modality logits: the stems' modalities and the paired image's.
        self.modalities = [*self.sources, *([self.image] if self.image else [])]
        self.cost = self._measure_costs()

    # -- building -----------------------------------------------------------------------------
    def _choose_modalities(self, spec: DatasetSpec) -> None:
        o = self.options
        self.sources = list(o.modalities) or [m for m, s in spec.modalities.items() if s.kind in KINDS]
        bad = [m for m in self.sources if m not in spec.modalities
               or spec.modalities[m].kind not in KINDS or len(spec.modalities[m].shape) != 3]
        if not self.sources or bad:
            raise ValueError(f"method.options.modalities: {bad or 'none'} — reprogramming needs "
                             f"audio or depth modalities; dataset {spec.name!r} has "
                             f"{ {m: s.kind for m, s in spec.modalities.items()} }")
        images = [m for m, s in spec.modalities.items() if s.kind == "image"]
        self.image = o.image_modality or (images[0] if images else "")
        if self.image and self.image not in images:
            raise ValueError(f"method.options.image_modality: {self.image!r} is not an image "
                             f"modality of dataset {spec.name!r}; its images are {images}")
        self.anchor = ("image" if self.image else "text") if o.anchor == "auto" else o.anchor
        if self.anchor == "image" and not self.image:
            raise ValueError(f"method.options.anchor=image: dataset {spec.name!r} has no image "
                             "modality to pair with; use anchor: text (or auto)")

    def build_encoders(self, spec: DatasetSpec, model_cfg: ModelConfig) -> nn.ModuleDict:
        import open_clip

        o = self.options
        self._choose_modalities(spec)
        clip = build_clip(o.clip_model, o.clip_weights, freeze=True)
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise ValueError(f"method.options.clip_model={o.clip_model!r}: reprogramming needs a "
                             "ViT image tower with CLS pooling (no attentional pooler)")
        self.visual = visual  # frozen; CLIP's text tower is only needed for the class embeddings
        keep_frozen_out_of_state_dict(visual)  # rebuilt from clip_weights: not in checkpoints
        self.register_buffer("clip_logit_scale", clip.logit_scale.detach().exp().float(),
                             persistent=False)
        names = spec.class_names or tuple(f"class {k}" for k in range(spec.num_classes))
        tokenizer = open_clip.get_tokenizer(o.clip_model)
        kinds = {spec.modalities[m].kind for m in self.sources} | ({"image"} if self.image else set())
        for kind in sorted(kinds):  # derived from frozen weights: rebuilt, never checkpointed
            self.register_buffer(f"text_{kind}", class_text_embeddings(
                clip, tokenizer, names, {**TEMPLATES, **o.templates}[kind]), persistent=False)

        width = visual.transformer.width
        slots = visual.positional_embedding.shape[0]  # 1 + (H/p)(W/p)
        patch = visual.patch_size[0]
        paths = {}
        for m in self.sources:
            shape = spec.modalities[m].shape
            if spec.modalities[m].kind == "audio":
                kernel = o.audio_kernel or patch
                stride = o.audio_stride or max(1, round(kernel * 10 / 14))
                stem = ModalityStem(shape, width, kernel, stride, token_norm=True, what=m)
            else:
                p = o.depth_patch or patch
                stem = ModalityStem(shape, width, p, p, token_norm=False, what=m)
            if o.encoder == "reprogram":
                paths[m] = ReprogramPath(stem, ReprogrammingAttention(slots, width, o.heads, o.dropout))
            else:
                init = visual if o.separate_init == "clip" else build_clip(o.clip_model).visual
                paths[m] = SeparatePath(stem, SeparateTower(init))
        return nn.ModuleDict(paths)

    def _measure_costs(self) -> dict[str, float]:
        """Trainable parameters and FLOPs per sample of each modality's encoder (stem to
        embedding, frozen tail included), measured once on zeros shaped like the data."""
        cost = {"reprogram/trainable_params": float(count_params(self, trainable_only=True))}
        for m in self.sources:
            x = torch.zeros(2, *self.spec.modalities[m].shape, device=self.clip_logit_scale.device)
            cost[f"reprogram/flops_{m}"] = flops_per_sample(self, x, call=lambda x, m=m: self.embed(m, x))
        return cost

    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()  # frozen: no dropout, whatever the loop asks
        return self

    # -- forward ------------------------------------------------------------------------------
    def embed(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """e_m: the modality's CLIP-space embedding (B, E)."""
        if self.options.encoder == "reprogram":
            return encode_tokens(self.visual, self.encoders[m](x))
        return self.encoders[m](x)

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP embedding of the paired images, resized to CLIP's input if needed."""
        size = tuple(self.visual.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.visual(images)

    def temperature(self, m: str) -> float:
        return {**TEMPERATURE, **self.options.temperature}[self.spec.modalities[m].kind]

    def class_embeddings(self, kind: str) -> torch.Tensor:
        return getattr(self, f"text_{kind}")

    def forward(self, batch: Batch) -> Output:
        per_mod, weights = {}, []
        for m in self.sources:
            present = batch["present"][m].float()
            e = self.embed(m, batch["inputs"][m]) * present.unsqueeze(1)  # absent: zeroed
            kind = self.spec.modalities[m].kind
            per_mod[m] = zero_shot_logits(e, self.class_embeddings(kind), self.temperature(m))
            weights.append(present)
        w = torch.stack(weights, 1)  # (B, M): average over the modalities present
        fused = (torch.stack([per_mod[m] for m in self.sources], 1) * w.unsqueeze(-1)).sum(1)
        fused = fused / w.sum(1, keepdim=True).clamp(min=1.0)
        if self.image:
            present = batch["present"][self.image].float().unsqueeze(1)
            e = self.image_embedding(batch["inputs"][self.image]) * present
            per_mod[self.image] = zero_shot_logits(e, self.class_embeddings("image"),
                                                   1.0 / float(self.clip_logit_scale))
        return Output(fused, per_mod)

    # -- loss and step ------------------------------------------------------------------------
    def modality_loss(self, batch: Batch, m: str, anchor_image: torch.Tensor | None,
                      gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        """L_m over the samples where m (and, for the image anchor, the image) is present.
        `gather`: every worker's rows (`StepContext.gather_with_grad`), so that the negatives
        are the global batch's, as in one process."""
        keep = batch["present"][m]
        if self.anchor == "image":
            keep = keep & batch["present"][self.image]
        idx = keep.nonzero(as_tuple=True)[0]  # a host sync: the loss needs the kept rows
        e = gather(F.normalize(self.embed(m, batch["inputs"][m].index_select(0, idx)).float(), dim=-1))
        label = gather(batch["label"].index_select(0, idx))
        if self.anchor == "image":
            return info_nce(e, gather(F.normalize(anchor_image.index_select(0, idx).float(), dim=-1)),
                            self.temperature(m))
        anchors = self.class_embeddings(self.spec.modalities[m].kind)[label]
        return info_nce(e, anchors, self.temperature(m), label[:, None] == label[None, :])

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        with ctx.autocast():
            anchor = (self.image_embedding(batch["inputs"][self.image])
                      if self.anchor == "image" else None)
            parts = {f"loss/{m}": self.modality_loss(batch, m, anchor, ctx.gather_with_grad)
                     for m in self.sources}
        loss = torch.stack(list(parts.values())).sum()
        return self.backward_and_step(loss, optimizer, ctx, parts)

    def grad_norms(self) -> dict[str, torch.Tensor]:
        """{"grad/<m>": L2 norm of modality m's trainable encoder's gradients}."""
        norms = {}
        for m in self.sources:
            grads = [p.grad.detach().float() for p in self.encoders[m].parameters()
                     if p.grad is not None]
            norms[f"grad/{m}"] = (torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])) if grads else
                torch.zeros((), device=self.clip_logit_scale.device))
        return norms

    def epoch_metrics(self) -> dict[str, float]:
        return dict(self.cost)
