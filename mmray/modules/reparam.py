"""Cross-modal re-parameterization (M2PT, METHODS.md §7).

A linear layer of the target transformer that also uses the matching layer of an auxiliary
transformer trained on another modality:

    y = x (W + λ·W_aux)ᵀ + b

W and b are the target's, W_aux the auxiliary's, λ one trainable scalar per layer. After training
`merge` folds λ·W_aux into W and puts back a plain `nn.Linear`, so the deployed model is exactly
the target architecture and costs what it costs.

Layers are found by module path on each block (`blocks.<i>.attn.qkv`, ...), never by searching
parameter names; every shape is checked and a mismatch names the layer.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# timm ViT sub-layers of each block that M2PT re-parameterizes.
DEFAULT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


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
