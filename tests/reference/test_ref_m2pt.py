"""M2PT with `preset: reference`, step by step beside a port of the reference fine-tuning step.

The port below is written from https://github.com/AILab-CVC/M2PT at commit
57cd821941cffdbc84cee9c30e645384278719c3 (same computation, written for this test; it calls
nothing of mmray.methods.m2pt):
- `multimodal_pathway.py`: `CrossModalReparamLinear` (an nn.Linear whose forward uses
  W + cross_modal_scale·aux_weight; cross_modal_scale = zeros(1); aux_weight is the auxiliary
  layer's own Parameter, trainable), `build_cross_modal_reparam_linear`,
  `reparameterize_aux_into_target_model` (zip of the two models' blocks, four layer names);
- `Image/models_vit.py`: MAE's `VisionTransformer(global_pool=True)` over timm's (mean of the
  patch tokens, then `fc_norm`; the final `norm` deleted), with timm 0.3.2's `forward`
  (`head(forward_features(x))`);
- `Image/main_finetune.py`: the target built with `drop_path_rate=args.drop_path` (0.1), its
  checkpoint (`checkpoint['model']`) loaded non-strictly after deleting a head of another shape,
  `trunc_normal_(head.weight, std=2e-5)`;
  the auxiliary loaded strictly into a token-pooling timm ViT; then the re-parameterization;
  `param_groups_lrd(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
  layer_decay)`, `AdamW(param_groups, lr)`; `LabelSmoothingCrossEntropy(smoothing=0.1)` (mixup off);
- `Image/util/lr_decay.py`: `param_groups_lrd`, `get_layer_id_for_vit`;
- `Image/util/lr_sched.py`: `adjust_learning_rate` sets each group's lr to lr·lr_scale (held at
  one lr here: mmray's schedules change the lr per epoch, and the three steps are one epoch);
- `Image/engine_finetune.py` `train_one_epoch`: `model.train()`, `loss = criterion(model(x), y)`,
  backward and step through the loss scaler (no clipping: `--clip_grad` unset; no scaling on a
  CPU), `optimizer.zero_grad()`; the logged loss is `loss.item()`.

Both sides start from the same weights files, in float64; the head's trunc_normal draw is
injected (the port takes mmray's draw) and drop-path's draws are aligned by seeding each step.
The `--layer_decay 0.65` and `--drop_path 0.1` are `Image/README.md`'s command.
"""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from torch import nn

from mmray.encoders.tiny_vit import TINY_VIT, register_tiny_vit
from mmray.methods import StepContext
from mmray.train.experiment import load_experiment
from mmray.train.loop import build_state

from helpers import SPEC, make_batch

LR, WEIGHT_DECAY, LAYER_DECAY, DROP_PATH, SMOOTHING = 1e-2, 0.05, 0.65, 0.1, 0.1
LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
STEPS = 3


# -- the port ---------------------------------------------------------------------------------


class PortReparamLinear(nn.Linear):
    """multimodal_pathway.py CrossModalReparamLinear."""

    def __init__(self, origin: nn.Linear, aux_weight: nn.Parameter):
        super().__init__(origin.in_features, origin.out_features, origin.bias is not None)
        self.cross_modal_scale = nn.Parameter(torch.zeros(1))
        assert self.weight.size() == aux_weight.size()
        self.aux_weight = aux_weight  # the auxiliary model's Parameter itself
        self.aux_weight.requires_grad_(True)
        with torch.no_grad():
            self.weight.copy_(origin.weight)
            self.bias.copy_(origin.bias)

    def forward(self, x):
        return F.linear(x, self.weight + self.cross_modal_scale * self.aux_weight, self.bias)


def port_reparameterize(target: nn.Module, aux: nn.Module) -> None:
    for t_block, a_block in zip(target.blocks, aux.blocks):
        for name in LAYERS:
            owner, leaf = name.split(".")
            origin = getattr(getattr(t_block, owner), leaf)
            aux_layer = getattr(getattr(a_block, owner), leaf)
            setattr(getattr(t_block, owner), leaf, PortReparamLinear(origin, aux_layer.weight))


class MAEViT(timm.models.vision_transformer.VisionTransformer):
    """Image/models_vit.py VisionTransformer with global_pool=True."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc_norm = kwargs["norm_layer"](kwargs["embed_dim"])
        del self.norm

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:, :].mean(dim=1))

    def forward(self, x):
        return self.head(self.forward_features(x))


def layer_id_for_vit(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def port_param_groups_lrd(model: nn.Module, weight_decay: float, no_weight_decay_list,
                          layer_decay: float) -> list[dict]:
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in no_weight_decay_list
        layer_id = layer_id_for_vit(n, num_layers)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        groups.setdefault(key, {"lr_scale": layer_scales[layer_id],
                                "weight_decay": 0.0 if no_decay else weight_decay, "params": []})
        groups[key]["params"].append(p)
    return list(groups.values())


def port_model(target_file, aux_file, head_weight: torch.Tensor) -> nn.Module:
    model = MAEViT(**{**TINY_VIT, "img_size": (8, 8), "in_chans": 3, "num_classes": 3},
                   mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                   drop_path_rate=DROP_PATH)
    checkpoint = torch.load(target_file)["model"]
    state_dict = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in checkpoint and checkpoint[k].shape != state_dict[k].shape:
            del checkpoint[k]
    model.load_state_dict(checkpoint, strict=False)
    with torch.no_grad():
        model.head.weight.copy_(head_weight)  # the trunc_normal_(std=2e-5) draw, injected
    aux = timm.create_model("mmray_vit_tiny", img_size=(12, 8), in_chans=1, num_classes=5)
    aux.load_state_dict(torch.load(aux_file), strict=True)
    port_reparameterize(model, aux)
    return model


def port_step(model, optimizer, criterion, batch) -> float:
    model.train(True)
    loss = criterion(model(batch["inputs"]["image"]), batch["label"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


# -- the comparison ---------------------------------------------------------------------------


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def weights_files(tmp_path):
    """A target with MAE's global pooling and a head for 4 classes (a task of its own; the
    dataset has 3), and an auxiliary trained for another input (a 1-channel 12x8 spectrogram,
    5 classes, token pooling)."""
    register_tiny_vit()
    torch.manual_seed(1)
    target = timm.create_model("mmray_vit_tiny", img_size=(8, 8), in_chans=3, num_classes=4,
                               global_pool="avg")
    aux = timm.create_model("mmray_vit_tiny", img_size=(12, 8), in_chans=1, num_classes=5)
    with torch.no_grad():
        target.head.bias.normal_()  # dropped on both sides: the new head's bias is 0
        for p in aux.parameters():  # an auxiliary unlike the target's init
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": target.state_dict()}, tmp_path / "target.pt")  # as MAE saves
    torch.save(aux.state_dict(), tmp_path / "aux.pt")
    return tmp_path / "target.pt", tmp_path / "aux.pt"


def mmray_state(target_file, aux_file):
    cfg = load_experiment(None, [
        "method.name=m2pt", "method.preset=reference",
        f"method.options.target_weights={target_file}", f"method.options.aux_weights={aux_file}",
        "method.options.model_kwargs={global_pool: avg, num_classes: 4}",
        "method.options.aux_kwargs={in_chans: 1, img_size: [12, 8], num_classes: 5, global_pool: token}",
        "train.optimizer=adamw", f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}",
        "train.device=cpu"])
    o = cfg.method.options
    assert (o["layer_decay"], o["drop_path"], o["label_smoothing"], o["decay_exempt"]) == (
        LAYER_DECAY, DROP_PATH, SMOOTHING, "mae")
    return build_state(cfg, SPEC, torch.device("cpu"))


def port_name(name: str) -> str:
    return name[:-len("scale")] + "cross_modal_scale" if name.endswith(".scale") else name


def test_reference_preset_steps_like_the_reference_fine_tuning(tmp_path, float64):
    target_file, aux_file = weights_files(tmp_path)
    state = mmray_state(target_file, aux_file)
    method, opt = state.method, state.optimizer
    vit = method.encoders["image"]
    head = vit.head.weight.detach()
    assert head.abs().max() < 2e-4 and 0.5e-5 < head.std() < 4e-5  # the 2e-5 draw
    assert torch.equal(vit.head.bias, torch.zeros(3))
    port = port_model(target_file, aux_file, head)
    port_opt = torch.optim.AdamW(port_param_groups_lrd(port, WEIGHT_DECAY, port.no_weight_decay(),
                                                       LAYER_DECAY), lr=LR)
    for group in port_opt.param_groups:  # lr_sched.adjust_learning_rate at lr
        group["lr"] = LR * group["lr_scale"]
    criterion = LabelSmoothingCrossEntropy(smoothing=SMOOTHING)

    ours, theirs = dict(vit.named_parameters()), dict(port.named_parameters())
    assert {port_name(n) for n in ours} == set(theirs)
    ctx = StepContext(device=torch.device("cpu"))
    for i in range(STEPS):
        batch = make_batch(SPEC, b=6, seed=10 + i)
        method.train()
        torch.manual_seed(100 + i)  # drop-path draws, the same on both sides
        logged = float(method.train_step(batch, opt, ctx)["loss"])
        torch.manual_seed(100 + i)
        loss = port_step(port, port_opt, criterion, batch)
        assert logged == pytest.approx(loss, abs=1e-5), f"step {i}"
        for name, p in ours.items():
            torch.testing.assert_close(p.detach().reshape(theirs[port_name(name)].shape),
                                       theirs[port_name(name)].detach(), rtol=0, atol=1e-5,
                                       msg=lambda m, n=name, i=i: f"step {i}, {n}: {m}")
    # Every λ moved from 0, each by less than its block's lr·0.65^(depth−i) per step.
    for i, block in enumerate(vit.blocks):
        for name in LAYERS:
            scale = float(block.get_submodule(name).scale.detach())
            assert 0 < abs(scale) <= STEPS * LR * LAYER_DECAY ** (len(vit.blocks) - i) + 1e-12
    # The merged plain model computes what the reference's pathway model computes.
    method.eval()
    port.eval()
    x = make_batch(SPEC, b=6, seed=99)["inputs"]["image"]
    with torch.no_grad():
        torch.testing.assert_close(method.merged_model()(x), port(x), rtol=0, atol=1e-5)
