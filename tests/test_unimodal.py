"""The unimodal baselines (mmray/methods/unimodal.py), in plain torch: what each model reads, how
the ensemble predicts and trains, and the modality option."""

from __future__ import annotations

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import MethodConfig, build_method
from mmray.train.metrics import MetricAccumulator

from helpers import CPU, ML_SPEC, SPEC, SPEC3, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)


def _build(spec, name: str, **options):
    torch.manual_seed(0)
    return build_method(spec, MODEL, MethodConfig(name, options=options))


def test_the_ensemble_predicts_the_mean_of_its_members_logits():
    ens = _build(SPEC3, "unimodal_ensemble").eval()
    batch = make_batch(SPEC3)
    with torch.no_grad():
        members = {m: ens.heads[m](ens.encoders[m](batch["inputs"][m])) for m in SPEC3.modalities}
        out = ens.predict(batch)
    torch.testing.assert_close(out.logits, sum(members.values()) / 3)
    for m, z in members.items():
        torch.testing.assert_close(out.per_modality[m], z)


def test_the_ensemble_averages_only_the_members_whose_modality_is_present():
    ens = _build(SPEC, "unimodal_ensemble").eval()
    batch = make_batch(SPEC, b=4)
    batch["present"]["image"][:2] = False
    batch["present"]["audio"][1:3] = False  # sample 1 has neither
    with torch.no_grad():
        out = ens.predict(batch)
    z = out.per_modality
    torch.testing.assert_close(out.logits[0], z["audio"][0])
    torch.testing.assert_close(out.logits[1], (z["audio"][1] + z["image"][1]) / 2)
    torch.testing.assert_close(out.logits[2], z["image"][2])
    torch.testing.assert_close(out.logits[3], (z["audio"][3] + z["image"][3]) / 2)
    # An absent member sees zero features, like every method: its logits are its head's bias.
    torch.testing.assert_close(z["image"][0], ens.heads["image"].bias)


def test_each_member_trains_on_its_own_loss_only():
    """The ensemble's loss is the sum of the members' losses, and no member's gradient depends on
    another member: encoder m's gradient of the sum is that of loss_m alone."""
    ens = _build(SPEC, "unimodal_ensemble")
    batch = make_batch(SPEC)
    z = ens.member_logits(batch)
    losses = {m: ens.criterion(z[m], batch["label"]) for m in z}
    for m in z:
        params = list(ens.encoders[m].parameters()) + list(ens.heads[m].parameters())
        total = torch.autograd.grad(sum(losses.values()), params, retain_graph=True)
        own = torch.autograd.grad(losses[m], params, retain_graph=True)
        for a, b in zip(total, own):
            torch.testing.assert_close(a, b)
    logs = ens.train_step(batch, torch.optim.SGD(ens.parameters(), lr=0.1), CPU)
    torch.testing.assert_close(logs["loss"], logs["loss/audio"] + logs["loss/image"])


def test_unimodal_reads_only_its_modality():
    uni = _build(SPEC, "unimodal", modality="image").eval()
    assert list(uni.encoders) == ["image"] and uni.modalities == ["image"]
    batch = make_batch(SPEC)
    other = make_batch(SPEC, seed=1)
    other["inputs"]["image"] = batch["inputs"]["image"]  # a different audio input, same image
    with torch.no_grad():
        out, out_other = uni.predict(batch), uni.predict(other)
    torch.testing.assert_close(out.logits, out_other.logits)
    assert set(out.per_modality) == {"image"}
    torch.testing.assert_close(out.per_modality["image"], out.logits)

    uni.train()
    uni.criterion(uni(batch).logits, batch["label"]).backward()
    reached = {name.split(".")[1] for name, p in uni.named_parameters()
               if name.startswith("encoders.") and p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"image"}


def test_a_unimodal_run_reports_its_modality_accuracy_as_acc():
    uni = _build(SPEC, "unimodal", modality="audio").eval()
    batch = make_batch(SPEC, b=12)
    acc = MetricAccumulator(uni.spec, uni.modalities)
    with torch.no_grad():
        out = uni.predict(batch)
    acc.update(out, batch["label"], uni.criterion(out.logits, batch["label"]))
    metrics = acc.compute("test")
    assert metrics["test/acc_audio"] == metrics["test/acc"]
    assert not any(k.endswith("_image") for k in metrics)


def test_the_modality_option_defaults_to_the_first_and_names_the_accepted_ones():
    assert _build(SPEC3, "unimodal").modalities == ["audio"]
    with pytest.raises(ValueError, match=r"method.options.modality: 'video' is not a modality of "
                                         r"dataset 'toy'; accepted: \['audio', 'image'\]"):
        _build(SPEC, "unimodal", modality="video")


@pytest.mark.parametrize("spec", [SPEC3, ML_SPEC], ids=["3 modalities", "multi-label"])
@pytest.mark.parametrize("name, options", [("unimodal", {"modality": "image"}), ("unimodal_ensemble", {})])
def test_both_train_on_three_modalities_and_multilabel(spec, name, options):
    method = _build(spec, name, **options)
    batch = make_batch(spec)
    batch["present"]["image"][:2] = False
    before = [p.detach().clone() for p in method.parameters()]
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.1), CPU)
    assert torch.isfinite(logs["loss"])
    assert all(not torch.equal(a, p) for a, p in zip(before, method.parameters()))
    out = method.predict(batch)
    assert out.logits.shape == (6, spec.num_classes) and set(out.per_modality) == set(method.modalities)
