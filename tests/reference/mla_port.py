"""An independent port of the MLA reference training step, for tests/reference/test_ref_mla.py.

Written from Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation:
- `main.py`, `train_epoch`, the `gs_flag` branch, and `calculate_entropy` /
  `calculate_gating_weights` / `calculate_gating_weights3` (used by `valid`), at the latest commit
  ab6c184579f9ff390e9c9b8216c9900c2a43545b;
- `utils/utils.py`, `GSPlugin.before_update`, at that commit (it matches only a parameter named
  "module.weight") and at 4735bbcb8e33e56da8e08d4408a1939e73d01047 (it also matched "weight",
  the name the bare `fc_out` Linear it is handed actually has, so it projected).

The reference pins torch 1.8.1, whose `Optimizer.zero_grad()` zeroes gradients in place rather
than deleting them; the port calls `zero_grad(set_to_none=False)` where the reference calls
`zero_grad()`, and deletes every gradient at the end of the batch as the reference does. It uses
no mmray code: the caller hands it the encoders and the head (copies of the model under test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FINAL_NAMES = ("module.weight",)  # ab6c184: never matches a bare nn.Linear
FIRST_NAMES = ("module.weight", "weight")  # 4735bbc


class GSPluginPort:
    """`GSPlugin`: a projector Pl = I_d and a step counter, both kept over the whole run."""

    def __init__(self, d: int, dtype: torch.dtype, names: tuple[str, ...] = FINAL_NAMES):
        self.Pl = torch.eye(d, dtype=dtype)  # the reference hard-codes d = 512
        self.exp_count = 0
        self.names = names

    @torch.no_grad()
    def before_update(self, model: nn.Module, before_batch_input: torch.Tensor, batch_index: int,
                      len_dataloader: int, train_exp_counter: int) -> None:
        """Called between backward and the optimizer step of each unimodal step."""
        alpha = 0.1 ** (batch_index / len_dataloader + 1)
        if train_exp_counter == 0:  # the first call of the run does nothing
            return
        for name, w in model.named_parameters():
            if name not in self.names:
                continue
            r = before_batch_input.mean(dim=0, keepdim=True)  # 1 x d
            k = self.Pl @ r.t()  # d x 1
            # torch.mm(k, r) is the d x d outer product: the division is element-wise.
            self.Pl = self.Pl - (k @ k.t()) / (alpha + k @ r)
            self.Pl = self.Pl / torch.norm(self.Pl, p="fro")
            w.grad = w.grad @ self.Pl.t()


def train_batch(encoders: dict[str, nn.Module], fc_out: nn.Linear, inputs: dict[str, torch.Tensor],
                label: torch.Tensor, optimizer: torch.optim.Optimizer, gs: GSPluginPort,
                batch_step: int, len_dataloader: int, params: list[nn.Parameter]) -> dict[str, float]:
    """One batch of `train_epoch` with `gs_flag`: one forward of every encoder, then per modality
    (in `encoders`' order: a, v[, t]) CE on fc_out(h), backward, `before_update`, step. Returns
    each modality's loss."""
    optimizer.zero_grad(set_to_none=False)
    feats = {m: enc(inputs[m]) for m, enc in encoders.items()}
    losses = {}
    for m, h in feats.items():
        loss = F.cross_entropy(fc_out(h), label)
        loss.backward()
        gs.before_update(fc_out, h, batch_step, len_dataloader, gs.exp_count)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        gs.exp_count += 1
        losses[m] = loss.item()
    for p in params:  # `del p.grad` for every parameter
        p.grad = None
    return losses


def entropy(out: torch.Tensor) -> torch.Tensor:
    """`calculate_entropy`: softmax over dim 0 (the batch), −Σ p log p over the whole matrix."""
    p = torch.softmax(out, dim=0)
    return -(p * torch.log(p)).sum()


def gating_weights(*outs: torch.Tensor) -> list[torch.Tensor]:
    """`calculate_gating_weights` (two outputs) and `calculate_gating_weights3` (three)."""
    e = [entropy(o) for o in outs]
    top = max(e)
    w = [torch.exp(top - x) for x in e]
    total = sum(w)
    return [x / total for x in w]
