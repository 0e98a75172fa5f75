"""M2PT: Multimodal Pathway with cross-modal re-parameterization (METHODS.md §7).

Zhang, Ding, Gong, Ge, Shan, Yue. "Multimodal Pathway: Improve Transformers with Irrelevant Data
from Other Modalities", CVPR 2024. Reference code: https://github.com/AILab-CVC/M2PT
(`multimodal_pathway.py`: `CrossModalReparamLinear`, `reparameterize_aux_into_target_model`;
fine-tuning per modality in `Image/main_finetune.py`, `Audio/main_finetune_as_pathway.py`, ...).

A classifier of one target modality: a timm ViT built for it (its patch embedding is the
tokenizer, its head the task head) whose chosen linear layers in every block i also use block i
of an auxiliary ViT of the same shape, trained on another modality:

    y = x (W + λ·W_aux)ᵀ + b        (`CrossModalLinear`)

λ is one scalar per layer (initialised to `scale_init`, 0 in the paper), trained and exempt from
weight decay; W_aux is trained too unless `train_aux: false`. Only the auxiliary's weights are
used, never its data: the two modalities' samples are unrelated. The loss is CE on the target's
logits. After training `final_module()` merges W ← W + λ·W_aux into plain `nn.Linear` layers, so
the model the final test evaluation measures is exactly the target architecture at the target's
cost (the paper's "no inference cost"). Every epoch logs `m2pt/merge_max_abs_diff`, the largest
|merged − pathway| logit on the epoch's last training batch (eval mode), and the mean λ of each
layer type (`m2pt/lambda/<layer>`).

Modalities: only the target is read (`target`, by default the dataset's first image modality; a
spectrogram is a 1-channel image through timm's `in_chans`). Every other modality of the dataset
is ignored, and the method reports logits for the target alone. A sample whose target modality is
missing is classified from its fill value.

Weights: the target loads a timm state dict strictly into
`timm.create_model(timm_name, **model_kwargs, img_size=<data>, in_chans=<data>)` (num_classes:
model_kwargs' or the dataset's); a head of another class count is then replaced by a new one for
the dataset. The auxiliary loads strictly into the same architecture with `aux_kwargs` on top
(its own in_chans, img_size or num_classes: only its blocks are used). So the released ViT-B/16
checkpoints (MAE, AudioMAE, Point-MAE as M2PT's model zoo ships them for `vit_base_patch16_224`)
drop in, and `pipelines/m2pt_aux.py` makes a real auxiliary for the synthetic dataset.

Presets (`method.preset`); the reference is https://github.com/AILab-CVC/M2PT read at commit
57cd821941cffdbc84cee9c30e645384278719c3, its image fine-tuning (`Image/main_finetune.py` with
the command of `Image/README.md` and `Image/ft_pathway.sh`; the audio and video scripts
re-parameterize the same way and fine-tune with layer decay too, the point-cloud one follows
Point-MAE's recipe):
- `paper` ({}): the Config defaults, the paper's re-parameterization: all four sub-layers,
  λ initialised to 0, trained and exempt from weight decay, W_aux trained; mmray's own choices
  where the paper says nothing (no stochastic depth, no label smoothing, every other parameter
  decayed, one learning rate for every layer).
- `reference`: what the reference fine-tuning runs, as far as it is the method's:
  - `layers`, `scale_init: 0.0`, `train_aux: true`: `multimodal_pathway.py`'s
    `CrossModalReparamLinear` (λ `cross_modal_scale = nn.Parameter(torch.zeros(1))`, a 1-element
    vector rather than mmray's 0-d tensor: the same values), re-parameterizing `attn.qkv`,
    `attn.proj`, `mlp.fc1`, `mlp.fc2` of every block; `is_aux_trainable` is never passed, so W_aux
    always trains. λ has no option for its initial value there: always 0.
  - `decay_exempt: mae`: `Image/util/lr_decay.py` `param_groups_lrd` exempts every 1-D
    parameter (`p.ndim == 1`: biases, norms and so λ) and the model's `no_weight_decay()`
    (`pos_embed`, `cls_token`); everything else, W_aux included, is decayed.
  - `layer_decay: 0.65`: the same function's layer-wise lr decay, `--layer_decay 0.65` in
    `Image/README.md` / `Image/ft_pathway.sh` (the script's own default is 0.75). Block i
    (its λ and W_aux too) trains at lr·0.65^(depth−i), the tokenizer (`patch_embed`,
    `cls_token`, `pos_embed`) at lr·0.65^(depth+1), the final norm and head at lr.
  - `drop_path: 0.1`: `--drop_path 0.1`, timm's stochastic depth of the target.
  - `label_smoothing: 0.1`: `--smoothing 0.1` (`LabelSmoothingCrossEntropy`, when mixup is off).
  - `head_init_std: 2e-5`: `trunc_normal_(model.head.weight, std=2e-5)` after loading the
    target's checkpoint; a head the checkpoint lacks or has for another class count keeps the
    bias of timm's init, 0 (a head that matches keeps the checkpoint's bias).
  What the reference also runs and mmray sets elsewhere or not at all: AdamW with weight decay
  0.05 (`train.optimizer: adamw`, `train.weight_decay: 0.05`); lr = 5e-4·batch/256 with 5
  warm-up epochs and a per-iteration half-cosine to 1e-6 (mmray's schedules step per epoch);
  MAE's global average pooling with `fc_norm` (timm's `model_kwargs: {global_pool: avg}`, which
  the weights file decides; the reference loads MAE's pretraining checkpoint non-strictly and
  starts `fc_norm` and the head fresh, mmray loads strictly); mixup 0.8 / cutmix 1.0 with soft
  targets, RandAugment and random erasing (not implemented: with mixup on, the reference's loss
  is a soft-target CE, not the label-smoothed CE above); gradient accumulation over 4 batches;
  fp16 autocast with a loss scaler (mmray: bf16 on CUDA).

Where mmray differs from the reference implementation under every preset:
- There is a merge step (`merge`), and the final test split is evaluated on
  the merged model; the reference has no merge function and evaluates the pathway model.
- Block counts and every paired shape are checked, with errors naming the layer; the reference
  zips the blocks (a depth mismatch silently pairs fewer) and asserts shapes without names.
- The target loads strictly (a 224-px checkpoint needs 224-px data); the reference loads it
  non-strictly, interpolates the position embedding and drops a mismatched head.
- W_aux is a copy held by the target layer; the reference shares the auxiliary model's tensor
  (the same values: nothing else of the auxiliary runs or trains).
- Without `aux_weights` (or with `aux_random: true`, the ablation's control) the auxiliary is
  randomly initialised.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import bounds, path_field
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.encoders.pretrained import load_local_weights, timm_model_known
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext

# timm ViT sub-layers of each block that M2PT re-parameterizes.
DEFAULT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LayerName = Literal["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
# Set from the data (the target modality's tensor), never by model_kwargs.
DATA_KWARGS = ("img_size", "in_chans")
PROBE_SAMPLES = 8  # samples of the last training batch kept to measure the merge


@dataclass
class Config:
    # The modality classified (an image, a spectrogram or a depth map: any (C, H, W) tensor).
    # Empty: the dataset's first image modality. Other modalities are not read.
    target: str = ""
    # timm ViT name of target and auxiliary; "mmray_vit_tiny" is a 2-block ViT for tests and CPU
    # runs (mmray.encoders.tiny_vit), vit_base_patch16_224 the paper's ViT-B/16.
    timm_name: str = "mmray_vit_tiny"
    # More timm kwargs of the target, describing its weights file (patch_size, embed_dim, depth,
    # num_heads, num_classes, global_pool, ...); img_size and in_chans come from the data.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Local timm state dict of the target; empty: trained from scratch.
    target_weights: str = path_field()
    # Local timm state dict of the auxiliary; empty: random (tests and smoke runs only).
    aux_weights: str = path_field()
    # Ignore aux_weights and use a randomly initialised auxiliary: the control for whether the
    # trained weights matter, rather than the extra parameters.
    aux_random: bool = False
    # The modality the auxiliary was trained on (a label for tracking: audio, point, video, ...).
    aux_modality: str = ""
    # timm kwargs of the auxiliary where they differ from the target's (e.g. in_chans: 1,
    # img_size: [1024, 128], num_classes: 527); only its blocks are used and must match.
    aux_kwargs: dict[str, Any] = field(default_factory=dict)
    # Linear sub-layers of every block that get the pathway (the paper's best: all four).
    layers: list[LayerName] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    # Initial λ of every layer (0 in the paper: training starts from the target's outputs).
    scale_init: float = 0.0
    # Train W_aux along with the target (paper); false freezes it.
    train_aux: bool = True
    # Parameters without weight decay. scale: λ only (the paper). mae: every parameter of at most
    # one dimension (biases, norms, λ) and the ViT's `no_weight_decay()` (pos_embed, cls_token),
    # as the reference's MAE fine-tuning groups them.
    decay_exempt: Literal["scale", "mae"] = "scale"
    # Layer-wise lr decay d (BEiT/MAE): block i trains at lr·d^(depth−i), the tokenizer at
    # lr·d^(depth+1), final norm and head at lr (the optimizer group's `lr_scale`). 1: none.
    layer_decay: float = field(default=1.0, metadata=bounds(0.0, 1.0, lo_open=True))
    # Stochastic depth of the target's blocks (timm's drop_path_rate, linear over depth).
    drop_path: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # Label smoothing of the cross-entropy on single-label data.
    label_smoothing: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # > 0: the target's head weight is redrawn from N(0, std²) (truncated at ±2, timm's
    # trunc_normal_) after the weights load, and a new head's bias is 0; 0: timm's or the file's.
    head_init_std: float = field(default=0.0, metadata=bounds(0.0))

    def validate(self, path: str, errors: list[str]) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            errors.append(f"{path}.layers: {self.layers} must name each of "
                          f"{list(DEFAULT_LAYERS)} at most once, and at least one")
        for key in DATA_KWARGS:
            if key in self.model_kwargs:
                errors.append(f"{path}.model_kwargs.{key}: set from the target modality's tensor "
                              "shape; change the data instead (e.g. data.image.size)")
        if self.drop_path and "drop_path_rate" in self.model_kwargs:
            errors.append(f"{path}.model_kwargs.drop_path_rate: given with {path}.drop_path; "
                          "set only drop_path")


# ---------------------------------------------------------------------------------------------
# Cross-modal re-parameterization: y = x (W + λ·W_aux)ᵀ + b, and the merge that folds it away.
# Layers are found by module path on each block (`blocks.<i>.attn.qkv`, ...), never by searching
# parameter names; every shape is checked and a mismatch names the layer.
# ---------------------------------------------------------------------------------------------


def pathway_weight(weight: torch.Tensor, aux_weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W + λ·W_aux."""
    return weight + scale * aux_weight


class CrossModalLinear(nn.Module):
    """y = x (W + λ·W_aux)ᵀ + b; W, b taken over from `target`, W_aux copied from `aux`."""

    def __init__(self, target: nn.Linear, aux: nn.Linear, scale_init: float = 0.0,
                 train_aux: bool = True):
        super().__init__()
        self.in_features, self.out_features = target.in_features, target.out_features
        self.weight = target.weight
        self.bias = target.bias  # None registers no bias, as in nn.Linear
        self.aux_weight = nn.Parameter(aux.weight.detach().clone().to(target.weight),
                                       requires_grad=train_aux)
        # λ: a 0-d parameter, so an optimizer group can hold it apart (no weight decay).
        self.scale = nn.Parameter(torch.tensor(float(scale_init), dtype=target.weight.dtype,
                                               device=target.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, pathway_weight(self.weight, self.aux_weight, self.scale), self.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain layer with W ← W + λ·W_aux (computed as in `forward`, so outputs match)."""
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(pathway_weight(w, self.aux_weight, self.scale))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.requires_grad_(w.requires_grad)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, train_aux={self.aux_weight.requires_grad}")


def _linear(block: nn.Module, name: str, path: str, which: str) -> nn.Linear:
    try:
        layer = block.get_submodule(name)
    except AttributeError:
        linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"{path}: the {which} model has no such layer; a block's linear layers "
                         f"are {linears}") from None
    if type(layer) is not nn.Linear:
        raise ValueError(f"{path}: the {which} model's layer is a {type(layer).__name__}, not a "
                         "plain nn.Linear (already re-parameterized?)")
    return layer


def reparameterize(target: nn.Module, aux: nn.Module, layers: tuple[str, ...] | list[str] = DEFAULT_LAYERS,
                   scale_init: float = 0.0, train_aux: bool = True,
                   blocks: str = "blocks") -> list[CrossModalLinear]:
    """Replace `layers` of every block of `target` (in place) with `CrossModalLinear` using the
    same block of `aux`; returns the new layers. `aux` is only read.

    Block i of the target is paired with block i of the auxiliary; both must have the same
    number of blocks and every paired weight the same shape.
    """
    t_blocks, a_blocks = target.get_submodule(blocks), aux.get_submodule(blocks)
    if len(t_blocks) != len(a_blocks):
        raise ValueError(f"{blocks}: the target has {len(t_blocks)} blocks and the auxiliary "
                         f"{len(a_blocks)}; M2PT pairs block i with block i, so they must match")
    new = []
    for i, (t_block, a_block) in enumerate(zip(t_blocks, a_blocks)):
        for name in layers:
            path = f"{blocks}.{i}.{name}"
            t_lin, a_lin = _linear(t_block, name, path, "target"), _linear(a_block, name, path, "auxiliary")
            if t_lin.weight.shape != a_lin.weight.shape:
                raise ValueError(f"{path}: target weight {tuple(t_lin.weight.shape)} vs auxiliary "
                                 f"{tuple(a_lin.weight.shape)}; the auxiliary must have the "
                                 "target's shape")
            layer = CrossModalLinear(t_lin, a_lin, scale_init, train_aux)
            parent, _, leaf = name.rpartition(".")
            setattr(t_block.get_submodule(parent) if parent else t_block, leaf, layer)
            new.append(layer)
    return new


def cross_modal_layers(model: nn.Module) -> list[CrossModalLinear]:
    return [m for m in model.modules() if isinstance(m, CrossModalLinear)]


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every `CrossModalLinear` folded into a plain `nn.Linear` (W ← W + λ·W_aux).

    Returns a copy unless `inplace`; the result has the state-dict keys of the architecture the
    target was built as (e.g. `timm.create_model(name, **kwargs)`), so it loads there strictly.
    """
    out = model if inplace else copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, CrossModalLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, module.merged())
    return out


# ---------------------------------------------------------------------------------------------
# Building the timm models
# ---------------------------------------------------------------------------------------------


def as_timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """YAML lists become tuples (timm reads img_size=[H, W] as a tuple)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_vit(name: str, kwargs: dict[str, Any], weights: str, what: str) -> nn.Module:
    """timm.create_model(name, **kwargs) with no hub access, then `weights` loaded strictly."""
    import timm

    from mmray.encoders.tiny_vit import register_tiny_vit

    register_tiny_vit()
    if not timm.is_model(name):
        raise ValueError(f"method.options.timm_name: unknown timm model {name!r}; e.g. "
                         "vit_base_patch16_224, or mmray_vit_tiny for tests")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"{what}: timm cannot build {name} with {kwargs}: {e}") from None
    if not hasattr(model, "blocks"):
        raise ValueError(f"{what}: {name} has no transformer `blocks`; M2PT needs a timm ViT")
    if weights:
        load_local_weights(model, weights, f"{what} ({name} with {kwargs})")
    return model


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class M2PT(Method):
    """A target ViT whose blocks also run through an auxiliary ViT's weights, merged after training."""

    name = "m2pt"
    Config = Config
    # What each sets and where it comes from: the module docstring.
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {"layers": list(DEFAULT_LAYERS), "scale_init": 0.0, "train_aux": True,
                      "decay_exempt": "mae", "layer_decay": 0.65, "drop_path": 0.1,
                      "label_smoothing": 0.1, "head_init_std": 2e-5},
        "paper": {},
    }
    modalities_supported = (1, 2, 3)

    @classmethod
    def preflight(cls, options: dict[str, Any]) -> list[str]:
        name = options.get("timm_name", Config.timm_name)
        if timm_model_known(name):
            return []
        return [f"method.options.timm_name: unknown timm model {name!r}; e.g. "
                "vit_base_patch16_224, or mmray_vit_tiny for tests"]

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        self.modalities = [self.target]  # the metrics and gradient norms follow what is read
        self._probe: torch.Tensor | None = None
        self.merge_max_abs_diff: float | None = None

    def _choose_target(self, spec: DatasetSpec) -> str:
        target = self.options.target or next(
            (m for m, s in spec.modalities.items() if s.kind == "image"), "")
        if not target:
            raise ValueError(f"method.options.target: dataset {spec.name!r} has no image modality "
                             f"({list(spec.modalities)}); name the modality to classify")
        if target not in spec.modalities or len(spec.modalities[target].shape) != 3:
            raise ValueError(f"method.options.target: {target!r} is not a modality of dataset "
                             f"{spec.name!r} stored as a (C, H, W) tensor; choose one of "
                             f"{[m for m, s in spec.modalities.items() if len(s.shape) == 3]}")
        return target

    def build_encoders(self, spec: DatasetSpec, model_cfg: ModelConfig) -> nn.ModuleDict:
        o = self.options
        self.target = self._choose_target(spec)
        c, h, w = spec.modalities[self.target].shape
        arch = {**as_timm_kwargs(o.model_kwargs), "img_size": (h, w), "in_chans": c}
        arch.setdefault("num_classes", spec.num_classes)
        # Stochastic depth only shapes training: not part of what loads the merged state dict.
        train_arch = {**arch, "drop_path_rate": o.drop_path} if o.drop_path else arch
        model = build_vit(o.timm_name, train_arch, o.target_weights, "method.options.target_weights")
        new_head = model.num_classes != spec.num_classes
        if new_head:  # e.g. an ImageNet head: a new task head
            model.reset_classifier(spec.num_classes)
        if o.head_init_std > 0:
            with torch.no_grad():
                nn.init.trunc_normal_(model.head.weight, std=o.head_init_std)
                if new_head:  # timm's init of a head's bias (nn.Linear's is uniform)
                    model.head.bias.zero_()
        aux = build_vit(o.timm_name, {**arch, **as_timm_kwargs(o.aux_kwargs)},
                        "" if o.aux_random else o.aux_weights, "method.options.aux_weights")
        reparameterize(model, aux, tuple(o.layers), o.scale_init, o.train_aux)
        # What `timm.create_model(timm_name, **timm_kwargs)` needs to load the merged state dict.
        self.timm_kwargs = {**arch, "num_classes": spec.num_classes}
        return nn.ModuleDict({self.target: model})

    # -- forward ------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Output:
        vit = self.encoders[self.target]
        # timm's forward, split before the head to zero an absent target's pooled features.
        pooled = vit.forward_head(vit.forward_features(batch["inputs"][self.target]), pre_logits=True)
        present = batch["present"][self.target].to(pooled.dtype).unsqueeze(1)
        logits = vit.head(pooled * present)
        return Output(logits, {self.target: logits})

    def criterion(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.options.label_smoothing and not self.spec.multilabel:
            # At least float32 (autocast's bf16 logits are upcast; float64 stays float64).
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return F.cross_entropy(logits, label, label_smoothing=self.options.label_smoothing)
        return super().criterion(logits, label)

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        self._probe = batch["inputs"][self.target][:PROBE_SAMPLES].detach()
        return super().train_step(batch, optimizer, ctx)

    # -- merge --------------------------------------------------------------------------------
    def merged_model(self) -> nn.Module:
        """A plain timm model (a copy) with W ← W + λ·W_aux; loads into
        `timm.create_model(options.timm_name, **self.timm_kwargs)` strictly."""
        return merge(self.encoders[self.target])

    @torch.no_grad()
    def merge_difference(self, x: torch.Tensor, merged: nn.Module | None = None) -> float:
        """max |merged(x) − pathway(x)| over logits, both in eval mode (float32, no autocast)."""
        pathway = self.encoders[self.target]
        merged = merged if merged is not None else merge(pathway)
        was_training = pathway.training
        pathway.eval()
        merged.eval()
        try:
            return float((merged(x).float() - pathway(x).float()).abs().max())
        finally:
            pathway.train(was_training)

    def final_module(self) -> Method:
        """A copy of this method whose target ViT is merged: what the test split measures."""
        deployable = copy.deepcopy(self)
        merged = merge(deployable.encoders[self.target], inplace=True)
        if self._probe is not None:
            self.merge_max_abs_diff = self.merge_difference(self._probe, merged)
        return deployable

    # -- optimisation hooks -------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Groups by (layer, decayed or not), parameters chosen by module: every λ (each
        CrossModalLinear's `scale`) is exempt from weight decay, and with `decay_exempt: mae` so
        are all parameters of at most one dimension and the ViT's `no_weight_decay()` tokens.
        With `layer_decay` < 1 each group carries its `lr_scale` (the loop sets lr·lr_scale):
        layer 0 the tokenizer, i + 1 block i, depth + 1 the rest (final norm, head)."""
        o, vit = self.options, self.encoders[self.target]
        exempt = {id(layer.scale) for layer in cross_modal_layers(self)}
        if o.decay_exempt == "mae":
            exempt |= {id(p) for p in self.parameters() if p.ndim <= 1}
            exempt |= {id(getattr(vit, n)) for n in vit.no_weight_decay()
                       if isinstance(getattr(vit, n, None), nn.Parameter)}
        depth = len(vit.blocks)
        layer_of = {id(p): 0 for p in vit.patch_embed.parameters()}
        layer_of |= {id(getattr(vit, n)): 0 for n in ("cls_token", "pos_embed")
                     if isinstance(getattr(vit, n, None), nn.Parameter)}
        for i, block in enumerate(vit.blocks):
            layer_of |= {id(p): i + 1 for p in block.parameters()}
        groups: dict[tuple[int, bool], dict] = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            layer = layer_of.get(id(p), depth + 1) if o.layer_decay != 1.0 else 0
            no_decay = id(p) in exempt
            if (layer, no_decay) not in groups:
                group = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay}
                if o.layer_decay != 1.0:
                    group["lr_scale"] = o.layer_decay ** (depth + 1 - layer)
                groups[layer, no_decay] = group
            groups[layer, no_decay]["params"].append(p)
        return list(groups.values())

    def epoch_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        model = self.encoders[self.target]
        for name in self.options.layers:
            scales = [model.blocks[i].get_submodule(name).scale.detach().float()
                      for i in range(len(model.blocks))]
            out[f"m2pt/lambda/{name}"] = float(torch.stack(scales).mean())
        if self._probe is not None:
            out["m2pt/merge_max_abs_diff"] = self.merge_difference(self._probe)
        return out
