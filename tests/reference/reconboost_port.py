"""Independent ports of the ReconBoost reference training, for tests/reference/test_ref_reconboost.py.

- `run_authors`: the stage loop of `main` in huacong/ReconBoost `train.py` (two modalities; its
  three-modality twin `train_MSA.py` differs only in the previous-model map text←audio,
  visual←text, audio←visual, i.e. the previous stage's modality) without `--use_pretrain`, with
  `DynamicNet` from `models/dynamic_net.py` and `schedule_model`'s fixed order, at commit
  14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932.
- `run_balancebench`: `ReconBoostTrainer.fit` / `train_loop` / `training_step1` /
  `training_step2` of GeWu-Lab/BalanceBenchmark `balancemm/trainer/ReconBoost_trainer.py` with
  `BaseClassifierReconBoostModel` (`balancemm/models/avclassify_model.py`) at commit
  4c1482fca5aaa8d4278af8e26020daa039e3ccf3. It pins torch 1.12.1, whose `zero_grad()` zeroes
  gradients in place; the port calls `zero_grad(set_to_none=False)` for it.

The reference's ResNets are the caller's encoders (copies of the model under test's); the port
uses no mmray code. Each batch is {"inputs": {modality: tensor}, "label": tensor}.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Learner(nn.Module):
    """`AudioNet` / `VisualNet`: the backbone, then `self.fc` (replaced by the shared head)."""

    def __init__(self, net: nn.Module, fc: nn.Module):
        super().__init__()
        self.net = net
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x))


class DynamicNetPort:
    """`DynamicNet` with `common_space=True`: the learners added so far, a shared head and β."""

    def __init__(self, c0: float, boost_rate: float, head: nn.Module, dtype: torch.dtype):
        self.models: list[nn.Module] = []
        self.models_name: list[str] = []
        self.c0 = c0
        self.boost_rate = nn.Parameter(torch.tensor(boost_rate, dtype=dtype))
        self.head = head

    def add(self, model: nn.Module, model_name: str) -> None:
        if model_name in self.models_name:  # re-added learners move to the end
            i = self.models_name.index(model_name)
            self.models.pop(i)
            self.models_name.pop(i)
        self.models.append(model)
        self.models_name.append(model_name)

    def parameters(self) -> list[nn.Parameter]:
        params = [p for m in self.models for n, p in m.named_parameters() if "fc" not in n]
        return params + list(self.head.parameters()) + [self.boost_rate]

    def to_train(self) -> None:
        for m in self.models:
            m.train(True)
        self.head.train(True)

    def forward(self, inputs: dict, mask_model: str | None = None):
        if not self.models:
            return self.c0
        prediction = None
        with torch.no_grad():
            for m, name in zip(self.models, self.models_name):
                if name == mask_model:
                    continue
                pred = m(inputs[name])
                prediction = pred if prediction is None else prediction + pred
        return self.boost_rate * prediction

    def forward_grad(self, inputs: dict) -> torch.Tensor:
        prediction = None
        for m, name in zip(self.models, self.models_name):
            pred = m(inputs[name])
            prediction = pred if prediction is None else prediction + pred
        return self.boost_rate * prediction


def boosting(out_obj: torch.Tensor, out_join: torch.Tensor, lbl: torch.Tensor, n_class: int,
             weight1: float, weight2: float) -> torch.Tensor:
    target = torch.zeros(lbl.shape[0], n_class, dtype=out_obj.dtype).scatter_(1, lbl.view(-1, 1), 1)
    return (-weight1 * (target * out_obj.log_softmax(1)).mean(-1)
            + weight2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1))


def run_authors(order: list[str], learners: dict[str, Learner], net: DynamicNetPort, stages: int,
                batches: Callable[[int], list[dict]], epochs_per_stage: int, correct_epoch: int,
                lr: float, n_class: int, weight1: float = 5.0, weight2: float = 1.0,
                alpha: float = 0.5, on_step: Callable[[dict], None] = lambda rec: None) -> None:
    """`main`'s `while check_status(stage)` loop for `stages` stages; `batches(epoch)` gives the
    epoch's batches (epochs counted over both phases); `on_step` gets each step's losses."""
    epoch_no = 0
    for stage in range(stages):
        model_name = order[stage % len(order)]
        model, pre_name = learners[model_name], order[(stage - 1) % len(order)]
        pre_model = learners[pre_name]
        model.fc = net.head
        net.to_train()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(epochs_per_stage):
            for batch in batches(epoch_no):
                x, lbl = batch["inputs"], batch["label"]
                out_join = net.forward(x, mask_model=model_name)
                if stage == 0:  # not args.use_pretrain
                    out_join = torch.as_tensor(out_join, dtype=torch.float64).view(-1, 1).expand(lbl.shape[0], 1)
                out_obj = model(x[model_name])
                boosting_loss = boosting(out_obj, out_join, lbl, n_class, weight1, weight2)
                model.zero_grad()
                rec = {"boost": boosting_loss.mean().item()}
                if stage == 0:
                    loss = boosting_loss
                else:
                    pre_out_obj = pre_model(x[pre_name])
                    ga_loss = F.mse_loss(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))
                    rec["recon"] = ga_loss.item()
                    loss = boosting_loss + alpha * ga_loss
                loss.mean().backward()
                optimizer.step()
                on_step(rec)
            epoch_no += 1
        net.add(model, model_name)
        optimizer_correct = torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(correct_epoch):
            for batch in batches(epoch_no):
                out = net.forward_grad(batch["inputs"])
                loss = F.cross_entropy(out, batch["label"])
                optimizer_correct.zero_grad()
                loss.backward()
                optimizer_correct.step()
                on_step({"ensemble": loss.item()})
            epoch_no += 1


class BalanceBenchModelPort(nn.Module):
    """`BaseClassifierReconBoostModel`: encoders, `fusion_module.fc_out` (a Linear), β = 0.01."""

    def __init__(self, encoders: dict[str, nn.Module], fc_out: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.modalitys = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fc_out = fc_out
        self.boost_rate = nn.Parameter(torch.tensor(0.01, dtype=dtype))

    def modality_model(self, inputs: dict, modality: str) -> torch.Tensor:
        return self.fc_out(self.encoders[modality](inputs[modality]))

    def forward(self, inputs: dict, mask_model: str | None = None) -> torch.Tensor:
        output = None
        with torch.no_grad():
            for modality in self.modalitys:
                if modality == mask_model:
                    continue
                res = self.modality_model(inputs, modality)
                output = res if output is None else output + res
        return self.boost_rate * output

    def forward_grad(self, inputs: dict) -> torch.Tensor:
        output = None
        for modality in self.modalitys:
            res = self.modality_model(inputs, modality)
            output = res if output is None else output + res
        return self.boost_rate * output


def run_balancebench(model: BalanceBenchModelPort, optimizer: torch.optim.Optimizer, epochs: int,
                     batches: Callable[[int], list[dict]], T_epochs: int = 1, weight1: float = 5.0,
                     weight2: float = 1.0, alpha: float = 0.5,
                     on_step: Callable[[dict], None] = lambda rec: None) -> None:
    """`fit` for `epochs` epochs: per epoch and modality, `T_epochs` of `training_step1` then of
    `training_step2`, each step followed by `optimizer.step()` and `optimizer.zero_grad()`.
    `batches(n)` gives the n-th pass over the data."""
    key, n_class, passes = model.modalitys, model.fc_out.out_features, 0
    for current_epoch in range(epochs):
        model.train()
        for i, modality in enumerate(key):
            pre_modality = key[i - 1]  # key[len(key) - 1] for the first
            for _ in range(T_epochs):
                for batch in batches(passes):
                    x, label = batch["inputs"], batch["label"]
                    out_join = model.forward(x, mask_model=modality)
                    out_obj = model.modality_model(x, modality)
                    boosting_loss = boosting(out_obj, out_join, label, n_class, weight1, weight2)
                    rec = {"boost": boosting_loss.mean().item()}
                    if current_epoch == 0:
                        loss = boosting_loss
                    else:
                        pre_out_obj = model.modality_model(x, pre_modality)
                        ga_loss = F.mse_loss(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))
                        rec["recon"] = ga_loss.item()
                        loss = boosting_loss + alpha * ga_loss
                    loss.mean().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # torch 1.12's zero_grad()
                    on_step(rec)
                passes += 1
            for _ in range(T_epochs):
                for batch in batches(passes):
                    out = model.forward_grad(batch["inputs"])
                    loss = F.cross_entropy(out, batch["label"])
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)
                    on_step({"ensemble": loss.item()})
                passes += 1
