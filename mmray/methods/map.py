"""MAP: missing-aware prompts on frozen CLIP towers (METHODS.md §6), the baseline REP compares to.

Lee, Tsai, Chiu, Lee, "Multimodal Prompting with Missing Modalities for Visual Recognition",
CVPR 2023. Reference code: https://github.com/YiLunLee/missing_aware_prompts
(`vilt/modules/vilt_missing_aware_prompt_module.py`, `vilt/modules/vision_transformer_prompts.py`).

Three prompt sets, one per missing case (complete, text missing, image missing); each holds, for
each of the first `depth` layers (0–5 in the paper) of each tower, `length` (16) learnable tokens.
A sample's set is chosen by its missing case, read from its `present` masks. Before each of those
layers the layer's prompts go in front of the tower's tokens: MAP's input-level prompts, which
accumulate (the last prompted layer sees depth·length prompt tokens in front). Only the prompts
and the linear classifier on [image feature; text feature] train; by default the missing
modality's feature is zeroed before the classifier.

Presets (reference code read: YiLunLee/missing_aware_prompts at commit
9aa538159f4623de1936d25daee880ec47c062be; on CLIP the port of its training step is
tests/reference/test_ref_map.py):
- `reference`: zero_missing=false, head_init_std=0.02, reference_decay_groups=true. These are the
  reference's training step where it does not depend on the backbone:
  - zero_missing=false: nothing is zeroed in the reference; the dummy inputs of a missing modality
    (all-ones image, empty text) go through the prompted stream and reach the classifier
    (`vilt/modules/vilt_missing_aware_prompt_module.py`, `infer`).
  - head_init_std=0.02: every Linear of the head starts N(0, 0.02) with zero bias
    (`vilt/modules/objectives.py`, `init_weights`).
  - reference_decay_groups=true: AdamW spares the parameters whose names contain "bias" or a
    LayerNorm name from weight decay; the prompts are decayed (`vilt/modules/vilt_utils.py`,
    `set_schedule`). On the CLIP head that spares its bias only.
  What the reference shares with the defaults: three prompt sets of 16 tokens for layers 0-5,
  prepended before each of those layers in front of everything, so they accumulate (the config's
  `prompt_type='input'`, `multi_layer_prompt=True`; `vilt/config.py`, and `Block.forward` in
  `vilt/modules/vision_transformer_prompts.py`); the initialisation below; only prompts and the
  head train (ViLT's transformer and embeddings are frozen).
- `paper`: {} (the defaults are the paper's input-level prompts: length 16, layers 0-5).
- The defaults differ from `reference` in zeroing the missing tower's feature (the CLIP setting
  of METHODS.md §6, as REP's code does), the head's PyTorch initialisation and weight decay on
  everything that trains.

Where the backbone differs (mmray runs MAP on CLIP's two towers, as REP and DCP re-run it; the
reference runs it on ViLT's single stream):
- Each tower gets its own three prompt sets (the reference: one set on the joint stream), and the
  classifier is one linear layer on [image feature; text feature] (the reference: ViLT's pooler,
  Linear + tanh, which trains, and a Linear-LayerNorm-GELU-Linear head on the first text token).
- In CLIP's text tower the causal mask spans prompts and text: text tokens attend to every prompt,
  a prompt only to the prompts before it (ViLT attends both ways, with text padding masked).
- ViLT's frozen blocks and embeddings run with dropout 0.1 in training (frozen is not eval there);
  CLIP's blocks have no dropout and mmray keeps the towers in eval mode.
- The prompted depth is capped at the towers' depth (the reference's pooling index assumes all of
  `prompt_layers` exist).

Other departures, under every preset:
- `replace: true` offers deep prompt replacement: a layer's prompts replace the previous layer's
  prompt outputs instead of accumulating in front of them (how REP inserts its private buffers).
- Attention-level prompts (the reference's `prompt_type: attention`, prefix tuning of keys and
  values) are not implemented; input-level prompts are the paper's main setting.
- Initialisation as in the reference: zeros with one row of ones marking the case (row 0 complete,
  1 image missing, 2 text missing; rows that a short prompt lacks are skipped).
- The reference's `simulate_missing` (random missing cases for complete train samples) is not
  here: missing patterns come from mmray's missing tables (`data.missing`).
- A sample missing both modalities has no prompt set: an error naming it (the reference's
  missing tables never make one, nor do mmray's).
- The optimizer (AdamW betas (0.9, 0.98) from `transformers`, which decays after the Adam step;
  per-step warm-up and linear decay; fp16 autocast) is the run's `train:` config, not the method's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mmray.config import bounds
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.base import MethodConfig
from mmray.methods.clip_prompting import ROLES, ClipPrompting
from mmray.modules.prompts import COMPLETE, MISSING_CASES, MISSING_IMAGE, MISSING_TEXT, Insertion


@dataclass
class Config:
    # Prompt tokens per layer, tower and missing case (16 in the paper).
    length: int = field(default=16, metadata=bounds(1, 4096))
    # The first `depth` layers of each tower get prompts (6, layers 0-5, in the paper); capped
    # at the shallower tower's depth.
    depth: int = field(default=6, metadata=bounds(1, 1000))
    # false: a layer's prompts go in front of everything, so prompts accumulate (MAP's
    # input-level prompts); true: they replace the previous layer's prompt outputs.
    replace: bool = False
    # Zero the missing modality's feature before the classifier; false passes the tower's
    # feature of the dummy input (all-ones image, empty text) on, as the reference does.
    zero_missing: bool = True
    # Std of the head's N(0, std) initial weights, bias zero (0.02 in the reference); 0: PyTorch's
    # default initialisation.
    head_init_std: float = field(default=0.0, metadata=bounds(0.0, None))
    # Weight decay spares every bias, as the reference's optimizer does; false: it decays
    # everything that trains.
    reference_decay_groups: bool = False


# ---------------------------------------------------------------------------------------------
# The formulas, as pure functions
# ---------------------------------------------------------------------------------------------

# The row of ones that marks each case's initial prompts, as in the reference.
_MARK_ROW = {COMPLETE: 0, MISSING_IMAGE: 1, MISSING_TEXT: 2}


def initial_prompts(depth: int, length: int, width: int) -> torch.Tensor:
    """(3 cases, depth, length, width): zeros with the case's marking row set to ones."""
    p = torch.zeros(len(MISSING_CASES), depth, length, width)
    for case, row in _MARK_ROW.items():
        if row < length:
            p[case, :, row] = 1.0
    return p


def prompt_insertions(prompts: torch.Tensor, case: torch.Tensor, replace: bool
                      ) -> dict[int, Insertion]:
    """Layer k gets sample i's prompts[case_i, k] in front; with `replace`, the previous layer's
    prompt outputs are dropped first."""
    chosen = prompts[case]  # (B, depth, length, width)
    length = prompts.shape[2]
    return {k: Insertion(chosen[:, k], drop=length if replace and k > 0 else 0)
            for k in range(prompts.shape[1])}


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class MAP(ClipPrompting):
    name = "map"
    Config = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {"zero_missing": False, "head_init_std": 0.02, "reference_decay_groups": True},
        "paper": {},
    }

    def __init__(self, spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__(spec, model_cfg, method_cfg)
        o = self.options
        depth = self.depth(o.depth)
        # role -> (3 cases, depth, length, the tower's width)
        self.prompts = nn.ParameterDict({
            r: nn.Parameter(initial_prompts(depth, o.length, self.tower(r).width)) for r in ROLES})

    def insertions(self, case: torch.Tensor, x0: dict[str, torch.Tensor]):
        return {r: prompt_insertions(self.prompts[r], case, self.options.replace) for r in ROLES}, {}

    def tower_parameters(self, role: str) -> list[nn.Parameter]:
        return [self.prompts[role]]

    def zero_missing(self) -> bool:
        return self.options.zero_missing
