"""What the CLIP prompting methods MAP and REP share (METHODS.md §6).

Both towers of open_clip's CLIP (model.open_clip_model, weights from model.clip_weights) frozen and
kept in eval mode; learned tokens inserted into them (`mmray.modules.prompts`), chosen per sample
by its missing case, which the batch's `present` masks give; a linear classifier on
[image feature; text feature] (`method.fusion=concat`; `sum` also works), with the missing
modality's feature zeroed before it, as REP's reference code does (MAP's `zero_missing: false`
keeps it). A subclass says what to insert (`insertions`) and which of its parameters serve which
tower (`tower_parameters`).

Two options of a subclass's Config are read here, for what both reference codebases do alike
(their `objectives.init_weights` and `set_schedule`): `head_init_std` (N(0, std) head weights and
a zero bias; 0 keeps PyTorch's default) and `reference_decay_groups` (weight decay spares what the
reference's parameter-name filter spares; `no_decay` says which parameters that is).

The frozen CLIP weights are left out of the method's state_dict (checkpoints carry the prompts and
the head only) and taken from the freshly built model when a checkpoint is loaded.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.encoders.pretrained import build_clip, keep_frozen_out_of_state_dict
from mmray.methods.base import Batch, Method, MethodConfig, Output
from mmray.modules.fusion import LateFusion
from mmray.modules.prompts import ClipTower, Insertion, TextTower, VisionTower, missing_case

ROLES = ("image", "text")


class ClipPrompting(Method):
    """Frozen CLIP towers + per-sample prompts + a linear head; subclasses define the prompts."""

    modalities_supported: ClassVar[tuple[int, ...]] = (2,)
    modality_kinds: ClassVar[tuple[str, ...]] = ROLES
    clip_backbone: ClassVar[bool] = True

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        # [image feature; text feature], in that order whatever the dataset's modality order
        self.head = LateFusion({self.role_modality[r]: self.tower(r).out_dim for r in ROLES},
                               spec.num_classes, method_cfg.fusion)
        if self.options.head_init_std > 0:
            with torch.no_grad():
                for name, p in self.head.named_parameters():
                    if name.endswith("bias"):
                        p.zero_()
                    else:
                        p.normal_(0.0, self.options.head_init_std)

    # -- the backbone ---------------------------------------------------------------------------
    def build_encoders(self, spec: DatasetSpec, model_cfg: ModelConfig) -> nn.ModuleDict:
        # role ("image" / "text") -> the dataset's modality of that kind
        self.role_modality = {s.kind: m for m, s in spec.modalities.items()}
        clip = build_clip(model_cfg.open_clip_model, model_cfg.clip_weights, freeze=True)
        towers: dict[str, ClipTower] = {"image": VisionTower(clip.visual), "text": TextTower(clip)}
        _check_inputs(spec, self.role_modality, towers, model_cfg.open_clip_model)
        for tower in towers.values():
            keep_frozen_out_of_state_dict(tower)
        return nn.ModuleDict({self.role_modality[r]: t for r, t in towers.items()})

    def tower(self, role: str) -> ClipTower:
        return self.encoders[self.role_modality[role]]

    def depth(self, wanted: int) -> int:
        """Prompted layers: `wanted`, capped at the shallower tower's depth."""
        return min(wanted, *(self.tower(r).layers for r in ROLES))

    # -- what subclasses define -----------------------------------------------------------------
    def insertions(self, case: torch.Tensor, x0: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, dict[int, Insertion]], dict[str, torch.Tensor]]:
        """Per role, the tokens to insert at each layer, given each sample's missing case and the
        towers' layer-0 inputs; plus any extra tensors the training step uses (REP's buffers)."""
        raise NotImplementedError

    def tower_parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable parameters that act on tower `role` (for the per-tower gradient norm)."""
        raise NotImplementedError

    def zero_missing(self) -> bool:
        """Whether the missing modality's feature is zeroed before the head."""
        return True

    def no_decay(self) -> list[nn.Parameter]:
        """What `reference_decay_groups` spares from weight decay: every bias (the references'
        filter spares names containing "bias"); a subclass adds what else its reference spares."""
        return [p for m in self.modules() for n, p in m.named_parameters(recurse=False)
                if n.endswith("bias")]

    def param_groups(self, weight_decay: float) -> list[dict]:
        if not self.options.reference_decay_groups:
            return super().param_groups(weight_decay)
        spared = {id(p) for p in self.no_decay()}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in spared], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) in spared], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # -- forward --------------------------------------------------------------------------------
    def forward_with_extras(self, batch: Batch) -> tuple[Output, dict[str, torch.Tensor]]:
        img, txt = self.role_modality["image"], self.role_modality["text"]
        case = missing_case(batch["present"][img], batch["present"][txt], batch.get("id"))
        raw = {r: batch["inputs"][self.role_modality[r]] for r in ROLES}
        x0 = {r: self.tower(r).embed(raw[r]) for r in ROLES}
        inserts, extras = self.insertions(case, x0)
        feats = {}
        for r in ROLES:
            m = self.role_modality[r]
            h = self.tower(r).encode(x0[r], raw[r], inserts[r])
            if self.zero_missing():  # the missing one is zeroed
                h = h * batch["present"][m].to(h.dtype).unsqueeze(1)
            feats[m] = h
        fused, per_mod = self.head(feats)
        return Output(fused, per_mod), extras

    def forward(self, batch: Batch) -> Output:
        return self.forward_with_extras(batch)[0]

    def grad_norms(self) -> dict[str, torch.Tensor]:
        """{"grad/<m>": norm of the gradients of what acts on modality m's tower} (the frozen
        tower itself has none)."""
        norms = {}
        for r in ROLES:
            params = self.tower_parameters(r)
            grads = [p.grad.detach().float() for p in params if p.grad is not None]
            device = params[0].device if params else next(self.head.parameters()).device
            norms[f"grad/{self.role_modality[r]}"] = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads else torch.zeros((), device=device))
        return norms


def _check_inputs(spec: DatasetSpec, role_modality: dict[str, str], towers: dict[str, ClipTower],
                  model_name: str) -> None:
    """The shards must hold what CLIP takes: its image size, its context length of BPE ids."""
    img = spec.modalities[role_modality["image"]]
    want = (3, *towers["image"].image_size)
    if tuple(img.shape) != want:
        raise ValueError(f"modality {role_modality['image']!r} has shape {tuple(img.shape)}; "
                         f"open_clip model {model_name!r} takes {want}: set data.image.size={want[1]} "
                         "(data.frames=1), with CLIP's data.image.mean/std")
    txt = spec.modalities[role_modality["text"]]
    text_tower = towers["text"]
    if tuple(txt.shape) != (text_tower.context_length,) or txt.vocab_size != text_tower.vocab_size:
        raise ValueError(f"modality {role_modality['text']!r} has {txt.shape[0]} tokens of a "
                         f"{txt.vocab_size}-word vocabulary; open_clip model {model_name!r} takes "
                         f"{text_tower.context_length} of its {text_tower.vocab_size}: set "
                         f"data.text.tokenizer=open_clip data.text.max_tokens="
                         f"{text_tower.context_length} data.text.open_clip_model={model_name}")
