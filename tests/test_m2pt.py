"""M2PT (METHODS.md §7): cross-modal re-parameterization, merge, λ's optimisation, weights, runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from mmray.cost import count_params, flops_per_sample
from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.methods.m2pt import M2PT, CrossModalLinear, cross_modal_layers, merge, reparameterize
from mmray.train.experiment import load_experiment

from helpers import load_pipeline

# A tiny timm ViT by VisionTransformer kwargs (any timm ViT name takes them).
NAME = "vit_tiny_patch16_224"
KW = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3}
SPEC = DatasetSpec("toy", {"audio": ModalitySpec("audio", (1, 12, 8)),
                           "image": ModalitySpec("image", (3, 8, 8))}, num_classes=3)
CPU = StepContext(device=torch.device("cpu"))


def vit(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, **{**KW, **kw}).eval()


def batch(n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {"audio": torch.randn(n, 1, 12, 8, generator=g),
                       "image": torch.randn(n, 3, 8, 8, generator=g)},
            "present": {m: torch.ones(n, dtype=torch.bool) for m in ("audio", "image")},
            "label": torch.randint(0, 3, (n,), generator=g), "id": [f"s{i}" for i in range(n)]}


def m2pt(**options) -> nn.Module:
    torch.manual_seed(0)
    return build_method(SPEC, ModelConfig(), MethodConfig("m2pt", options=options))


def train(method, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
    opt = torch.optim.AdamW(method.param_groups(weight_decay), lr=lr)
    for i in range(steps):
        method.train_step(batch(seed=i), opt, CPU)


# -- the formula and the module ---------------------------------------------------------------


def test_cross_modal_linear_by_hand():
    target, aux = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        target.bias.copy_(torch.tensor([0.5, -0.5]))
        aux.weight.copy_(torch.tensor([[2.0, 2.0, 0.0], [4.0, 0.0, -2.0]]))
    layer = CrossModalLinear(target, aux, scale_init=0.5)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # W + 0.5 W_aux = [[2, 1, 2], [2, -1, 0]]; y = x (W + λ W_aux)ᵀ + b
    torch.testing.assert_close(layer(x), torch.tensor([[2 + 2 + 6 + 0.5, 2 - 2 + 0 - 0.5]]))
    torch.testing.assert_close(layer.merged()(x), layer(x))
    assert layer.scale.shape == () and layer.weight is target.weight  # W, b taken over


def test_lambda_zero_gives_exactly_the_targets_outputs():
    model, aux = vit(0), vit(1)
    with torch.no_grad():
        for p in aux.parameters():
            p.mul_(100.0)  # an auxiliary that would show if it leaked in
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    new = reparameterize(model, aux)
    assert len(new) == 2 * 4 and all(layer.scale.item() == 0.0 for layer in new)
    assert torch.equal(model(x), before)


def test_layers_are_chosen_by_module_path():
    model = vit(0)
    reparameterize(model, vit(1), layers=("attn.qkv", "mlp.fc2"))
    for block in model.blocks:
        assert isinstance(block.attn.qkv, CrossModalLinear) and isinstance(block.mlp.fc2, CrossModalLinear)
        assert type(block.attn.proj) is nn.Linear and type(block.mlp.fc1) is nn.Linear
    assert type(model.head) is nn.Linear and len(cross_modal_layers(model)) == 4


def test_mismatches_name_the_layer():
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1: target weight \(64, 16\) vs auxiliary \(32, 16\)"):
        reparameterize(vit(0), vit(1, mlp_ratio=2.0))
    with pytest.raises(ValueError, match="the target has 2 blocks and the auxiliary 3"):
        reparameterize(vit(0), vit(1, depth=3))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qk: the target model has no such layer"):
        reparameterize(vit(0), vit(1), layers=("attn.qk",))
    model = vit(0)
    reparameterize(model, vit(1))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: the target model's layer is a CrossModalLinear"):
        reparameterize(model, vit(1))


def test_merged_model_equals_the_pathway_and_loads_into_a_fresh_timm_model():
    model = vit(0)
    reparameterize(model, vit(1))
    with torch.no_grad():
        for k, layer in enumerate(cross_modal_layers(model)):
            layer.scale.fill_(0.1 * (k + 1))
    x = torch.randn(4, 3, 8, 8)
    merged = merge(model)
    assert not cross_modal_layers(merged) and cross_modal_layers(model)  # a copy; model intact
    assert (merged(x) - model(x)).abs().max() <= 1e-5
    fresh = timm.create_model(NAME, pretrained=False, **KW).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), merged(x), rtol=0, atol=0)
    # No inference cost: the merged model is the plain architecture.
    assert count_params(merged) == count_params(fresh) < count_params(model)
    assert flops_per_sample(merged, x) == flops_per_sample(fresh, x)


# -- the method -------------------------------------------------------------------------------


def backward(method, seed: int = 0) -> None:
    method.train()
    _, loss = method.fused_loss(batch(seed=seed), CPU)
    loss.backward()


def test_gradients_of_lambda_and_the_auxiliary_by_hand():
    # y = x (W + λ W_aux)ᵀ + b with G = ∂L/∂(W + λ W_aux): ∂L/∂W = G, ∂L/∂λ = <G, W_aux>,
    # ∂L/∂W_aux = λ G; at λ = 0 the auxiliary gets exactly no gradient.
    for scale_init in (0.0, 0.3):
        method = m2pt(scale_init=scale_init)
        backward(method)
        for layer in cross_modal_layers(method):
            g = layer.weight.grad
            assert float(g.abs().max()) > 0
            torch.testing.assert_close(layer.scale.grad, (g * layer.aux_weight).sum())
            torch.testing.assert_close(layer.aux_weight.grad, scale_init * g, rtol=0, atol=0)
    frozen = m2pt(train_aux=False, scale_init=0.3)
    aux_before = [layer.aux_weight.detach().clone() for layer in cross_modal_layers(frozen)]
    backward(frozen)
    for layer in cross_modal_layers(frozen):
        assert layer.aux_weight.grad is None and not layer.aux_weight.requires_grad
        torch.testing.assert_close(layer.scale.grad, (layer.weight.grad * layer.aux_weight).sum())
    train(frozen)
    assert all(torch.equal(a, layer.aux_weight) for a, layer in zip(aux_before, cross_modal_layers(frozen)))


def test_first_step_moves_lambda_by_the_adam_step_against_its_gradient():
    method = m2pt()
    backward(method, seed=0)
    grads = [layer.scale.grad.clone() for layer in cross_modal_layers(method)]
    train(method, steps=1, lr=1e-2)  # the same batch (seed 0): the same gradient
    for g, layer in zip(grads, cross_modal_layers(method)):
        # Adam's first step: lr · ĝ/(|ĝ| + ε) with ĝ the bias-corrected g.
        torch.testing.assert_close(layer.scale.detach(), -1e-2 * g / (g.abs() + 1e-8))


# Three train steps on batches 0, 1, 2 (AdamW, lr 1e-2, weight decay 0.05): the logged losses
# and λ of blocks.0.attn.qkv and blocks.1.mlp.fc2 after them.
PINNED = {
    "paper": ([1.1138099431991577, 0.923851490020752, 1.3686994314193726],
              0.007942982017993927, -0.021692046895623207),
    "reference": ([1.098568081855774, 1.07940673828125, 1.259558916091919],
                  0.010582689195871353, -0.009691314771771431),
}


@pytest.mark.parametrize("preset", sorted(PINNED))
def test_train_steps_are_pinned(preset):
    method = m2pt(**M2PT.presets[preset])
    opt = torch.optim.AdamW(method.param_groups(0.05), lr=1e-2)
    for group in opt.param_groups:  # what the training loop does with a group's lr_scale
        group["lr"] = 1e-2 * group.get("lr_scale", 1.0)
    losses = []
    for i in range(3):
        torch.manual_seed(100 + i)  # drop-path draws
        losses.append(float(method.train_step(batch(seed=i), opt, CPU)["loss"]))
    model = method.encoders["image"]
    got = (losses, float(model.blocks[0].attn.qkv.scale.detach()),
           float(model.blocks[1].mlp.fc2.scale.detach()))
    want_losses, want_qkv, want_fc2 = PINNED[preset]
    assert losses == pytest.approx(want_losses, abs=1e-5)
    assert got[1:] == pytest.approx((want_qkv, want_fc2), abs=1e-6)


def test_lambda_is_exempt_from_weight_decay():
    method = m2pt(scale_init=0.5)
    decayed, exempt = method.param_groups(0.3)
    scales = [layer.scale for layer in cross_modal_layers(method)]
    assert exempt["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.3
    assert {id(p) for p in exempt["params"]} == {id(p) for p in scales}
    assert {id(p) for p in decayed["params"]} == {
        id(p) for p in method.parameters() if p.requires_grad} - {id(p) for p in scales}
    # A step with zero gradients: AdamW's decay alone moves the weights, never λ.
    opt = torch.optim.AdamW(method.param_groups(0.5), lr=0.1)
    w = method.encoders["image"].blocks[0].attn.qkv.weight.detach().clone()
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(s.item() == 0.5 for s in scales)
    torch.testing.assert_close(method.encoders["image"].blocks[0].attn.qkv.weight, w * (1 - 0.1 * 0.5))


def test_reference_groups_decay_and_learning_rates_by_hand():
    method = m2pt(decay_exempt="mae", layer_decay=0.5)
    vit = method.encoders["image"]
    groups = method.param_groups(0.3)
    # depth 2: tokenizer lr·0.5³, block i lr·0.5^(2−i), final norm and head lr.
    where = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(where) == sum(1 for _ in method.parameters())
    assert where[id(vit.cls_token)] == where[id(vit.pos_embed)] == (0.125, 0.0)
    assert where[id(vit.patch_embed.proj.weight)] == (0.125, 0.3)
    assert where[id(vit.patch_embed.proj.bias)] == (0.125, 0.0)
    for i, block in enumerate(vit.blocks):
        qkv = block.attn.qkv
        assert where[id(qkv.weight)] == where[id(qkv.aux_weight)] == (0.5 ** (2 - i), 0.3)
        assert where[id(qkv.scale)] == where[id(qkv.bias)] == where[id(block.norm1.weight)] == (0.5 ** (2 - i), 0.0)
    assert where[id(vit.head.weight)] == (1.0, 0.3) and where[id(vit.head.bias)] == (1.0, 0.0)
    # The paper's grouping: λ alone is exempt, one learning rate.
    assert all("lr_scale" not in g for g in m2pt().param_groups(0.3))


def test_label_smoothing_by_hand():
    method = m2pt(label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    label = torch.tensor([0, 1])
    logp = torch.log_softmax(logits, dim=1)
    by_hand = (0.9 * -logp[[0, 1], label] + 0.1 * -logp.mean(dim=1)).mean()
    torch.testing.assert_close(method.criterion(logits, label), by_hand)
    torch.testing.assert_close(m2pt().criterion(logits, label), (-logp[[0, 1], label]).mean())


def test_reference_head_init_and_drop_path(tmp_path):
    from mmray.encoders.tiny_vit import register_tiny_vit

    register_tiny_vit()
    files = {}
    for classes in (3, 5):  # a head the dataset's 3 classes keep, and one they replace
        model = timm.create_model("mmray_vit_tiny", img_size=(8, 8), in_chans=3, num_classes=classes)
        with torch.no_grad():
            model.head.bias.fill_(0.5)
        files[classes] = tmp_path / f"target{classes}.pt"
        torch.save(model.state_dict(), files[classes])
    new = m2pt(**M2PT.presets["reference"], target_weights=str(files[5]), model_kwargs={"num_classes": 5})
    vit = new.encoders["image"]
    assert torch.equal(vit.head.bias, torch.zeros(3)) and vit.head.weight.abs().max() < 2e-4
    assert 0.5e-5 < float(vit.head.weight.detach().std()) < 4e-5  # N(0, (2e-5)²)
    kept = m2pt(**M2PT.presets["reference"], target_weights=str(files[3])).encoders["image"].head
    assert torch.equal(kept.bias, torch.full((3,), 0.5)) and kept.weight.abs().max() < 2e-4
    method = m2pt(**M2PT.presets["reference"])
    vit = method.encoders["image"]
    # timm's stochastic depth, linear over the 2 blocks; not needed to load the merged model.
    assert isinstance(vit.blocks[0].drop_path1, nn.Identity)
    assert vit.blocks[1].drop_path1.drop_prob == vit.blocks[1].drop_path2.drop_prob == pytest.approx(0.1)
    assert "drop_path_rate" not in method.timm_kwargs
    with pytest.raises(ValueError, match="method.options.model_kwargs.drop_path_rate: given with"):
        load_experiment(None, ["method.name=m2pt", "method.preset=reference",
                               "method.options.model_kwargs={drop_path_rate: 0.2}"])


def test_final_module_is_the_merged_model_and_the_difference_is_logged():
    method = m2pt(scale_init=0.2)
    train(method)
    logs = method.epoch_metrics()
    assert logs["m2pt/merge_max_abs_diff"] <= 1e-5
    assert set(logs) >= {f"m2pt/lambda/{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    method.eval()
    deployable = method.final_module()
    assert not cross_modal_layers(deployable) and cross_modal_layers(method)
    assert method.merge_max_abs_diff is not None and method.merge_max_abs_diff <= 1e-5
    b = batch(seed=9)
    assert (deployable.predict(b).logits - method.predict(b).logits).abs().max() <= 1e-5
    fresh = timm.create_model(method.options.timm_name, pretrained=False, **method.timm_kwargs)
    fresh.load_state_dict(method.merged_model().state_dict(), strict=True)
    assert set(deployable.predict(b).per_modality) == {"image"} == set(method.modalities)


def test_weights_load_strictly_from_local_files(tmp_path):
    from mmray.encoders.tiny_vit import register_tiny_vit

    register_tiny_vit()
    # The target's checkpoint has another head (5 classes); the auxiliary saw spectrograms.
    target = timm.create_model("mmray_vit_tiny", img_size=(8, 8), in_chans=3, num_classes=5)
    aux = timm.create_model("mmray_vit_tiny", img_size=(12, 8), in_chans=1, num_classes=7)
    torch.save(target.state_dict(), tmp_path / "target.pt")
    torch.save({"model": aux.state_dict()}, tmp_path / "aux.pt")  # wrapped, as MAE saves
    method = m2pt(target_weights=str(tmp_path / "target.pt"), aux_weights=str(tmp_path / "aux.pt"),
                  model_kwargs={"num_classes": 5},
                  aux_kwargs={"in_chans": 1, "img_size": [12, 8], "num_classes": 7})
    model = method.encoders["image"]
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, target.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, target.patch_embed.proj.weight)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.aux_weight, aux.blocks[1].mlp.fc1.weight)
    assert model.head.out_features == 3  # a new head for the dataset's classes
    assert method.timm_kwargs == {"img_size": (8, 8), "in_chans": 3, "num_classes": 3}
    with pytest.raises(ValueError, match=f"method.options.aux_weights .*: {tmp_path / 'aux.pt'} does not match"):
        m2pt(aux_weights=str(tmp_path / "aux.pt"))  # the auxiliary's own input not given
    with pytest.raises(FileNotFoundError, match=f"weights file {tmp_path / 'absent.pt'} not found"):
        m2pt(target_weights=str(tmp_path / "absent.pt"))
    random_aux = m2pt(aux_weights=str(tmp_path / "aux.pt"), aux_random=True)  # file not read
    assert not torch.equal(random_aux.encoders["image"].blocks[1].mlp.fc1.aux_weight,
                           aux.blocks[1].mlp.fc1.weight)


def test_target_modality_choice_and_errors():
    assert m2pt().target == "image"
    audio = m2pt(target="audio")
    assert audio.modalities == ["audio"] and audio.timm_kwargs["in_chans"] == 1
    assert audio.predict(batch()).logits.shape == (6, 3)
    with pytest.raises(ValueError, match="method.options.target: 'text' is not a modality"):
        m2pt(target="text")
    no_image = DatasetSpec("a", {"audio": SPEC.modalities["audio"]}, 3)
    with pytest.raises(ValueError, match="dataset 'a' has no image modality"):
        build_method(no_image, ModelConfig(), MethodConfig("m2pt"))
    with pytest.raises(ValueError, match="method.options.model_kwargs.img_size: set from the target"):
        load_experiment(None, ["method.name=m2pt", "method.options={model_kwargs: {img_size: 224}}"])
    with pytest.raises(ValueError, match="method.options.layers"):
        load_experiment(None, ["method.name=m2pt", "method.options={layers: [attn.qkv, attn.qkv]}"])
    with pytest.raises(ValueError, match="method.options.timm_name: unknown timm model 'nope'"):
        m2pt(timm_name="nope")


def test_trains_end_to_end_with_an_auxiliary_trained_on_audio(tiny_data, tmp_path):
    from mmray.train.loop import run_local

    m2pt_aux = load_pipeline("m2pt_aux")

    cfg, prepared = tiny_data
    aux_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    model, kwargs, stats = m2pt_aux.train_aux(aux_cfg, prepared.version_dir, "audio")
    m2pt_aux.save(model, tmp_path / "aux.pt")
    assert kwargs["in_chans"] == 1 and 0.0 <= stats["val_acc"] <= 1.0
    aux_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
                  if k in ("img_size", "in_chans", "num_classes")}
    # The method's own config, as it ships, pointed at the auxiliary.
    method = load_experiment(Path(__file__).resolve().parents[1] / "configs/methods/m2pt.yaml", [
        f"method.options.aux_weights={tmp_path / 'aux.pt'}", "method.options.aux_modality=audio",
        f"method.options.aux_kwargs={aux_kwargs}"]).method
    # 6 epochs: the tiny ViT sits at chance for about 3 before its loss starts to fall.
    run = dataclasses.replace(cfg, method=method, train=dataclasses.replace(cfg.train, epochs=6))
    history = run_local(run, prepared.version_dir)
    last = history[-1]
    assert last["m2pt/merge_max_abs_diff"] <= 1e-5 and "test/acc" in last and "test/acc_image" in last
    assert "val/acc_audio" not in last  # audio is not read by the target's classifier
    assert last["m2pt/lambda/mlp.fc1"] != 0.0 and last["train/loss"] < history[0]["train/loss"]
