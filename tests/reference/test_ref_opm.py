"""OPM beside the ports of its reference training steps (tests/reference/opm_port.py): the same
initial weights, the same batches, the same random draws (the global generator seeded before each
step on both sides) and the reference's optimizer give the same losses, ratios, drop
probabilities and parameters after every step:
- `preset: reference` against the authors' `main.py` / `Classifier.py` (two modalities, AdamW as
  theirs with lr 1e-2 instead of 5e-5 so that a few steps move the weights past the tolerance),
  over the last warm-up epoch and two epochs after it;
- `preset: balancebench` against BalanceBenchmark's `OPMTrainer.training_step` (two and three
  modalities, SGD with momentum).
The batches' labels favour each modality in turn, so the dominant modality changes; the steps
cover drops and no drops (the p_exe coin), and for BalanceBenchmark samples that lost every
modality. Each test also checks that its preset's gradient quirk matters: `theta_grad: none`
leaves the reference's weights behind.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

import opm_port
from helpers import SPEC, SPEC3, checked_method_config

MODEL = ModelConfig(width=4, feature_dim=8)
B = 8
TOL = dict(rtol=0, atol=1e-5)


def build(spec, preset: str, confidence: float, **options):
    cfg = checked_method_config("opm", "concat", preset=preset, options=options)
    torch.manual_seed(0)
    method = build_method(spec, MODEL, cfg)
    with torch.no_grad():  # a confident head lets each modality dominate a batch clearly
        method.head.fc.weight.mul_(confidence)
    return method


def batches(method, n: int) -> list[dict]:
    """n batches whose labels favour each modality in turn at the initial weights (the class it
    rates highest against the others): the dominant modality changes from batch to batch."""
    out = []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        inputs = {m: (torch.randint(0, s.vocab_size, (B, *s.shape), generator=g) if s.kind == "text"
                      else torch.randn(B, *s.shape, generator=g))
                  for m, s in method.spec.modalities.items()}
        b = {"inputs": inputs, "present": {m: torch.ones(B, dtype=torch.bool) for m in inputs},
             "label": torch.zeros(B, dtype=torch.long), "id": [f"s{j}" for j in range(B)]}
        with torch.no_grad():
            per_mod = copy.deepcopy(method)(b).per_modality  # a copy: BN statistics untouched
        target = method.modalities[i % len(method.modalities)]
        b["label"] = (2 * per_mod[target] - sum(per_mod.values())).argmax(1)
        out.append(b)
    return out


def assert_same_weights(method, encoders: dict, fc: torch.nn.Linear) -> None:
    for m, enc in encoders.items():
        ours = method.encoders[m].state_dict()
        for k, v in enc.state_dict().items():
            torch.testing.assert_close(ours[k], v, **TOL, msg=f"{m}.{k}")
    for k, v in fc.state_dict().items():
        torch.testing.assert_close(method.head.fc.state_dict()[k], v, **TOL, msg=f"head.{k}")


def max_weight_gap(method, encoders: dict, fc: torch.nn.Linear) -> float:
    gaps = [(method.encoders[m].state_dict()[k] - v).abs().max().item()
            for m, enc in encoders.items() for k, v in enc.state_dict().items()
            if v.is_floating_point()]
    return max(gaps + [(method.head.fc.weight - fc.weight).abs().max().item()])


# -- the authors' code ------------------------------------------------------------------------

EPOCHS = [5, 6, 6, 6, 6, 6, 6, 7]  # epoch 5 is the warm-up's last


def run_authors(theta_grad: str | None = None):
    options = {} if theta_grad is None else {"theta_grad": theta_grad}
    method = build(SPEC, "reference", 20.0, **options)
    audio, image = (copy.deepcopy(method.encoders[m]) for m in ("audio", "image"))
    port = opm_port.Classifier(audio, image, copy.deepcopy(method.head.fc), q_base=0.5, lam=0.5,
                               p_exe=0.7)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(port.parameters(), lr=1e-2, weight_decay=0.01)
    method.train(), port.train()
    encoders = {"audio": audio, "image": image}
    return method, port, encoders, opt, ref_opt


def test_reference_preset_steps_like_the_authors_code():
    method, port, encoders, opt, ref_opt = run_authors()
    seen = []
    for i, (epoch, b) in enumerate(zip(EPOCHS, batches(method, len(EPOCHS)), strict=True)):
        torch.manual_seed(100 + i)  # the coin and the mask: the same draws on both sides
        logs = method.train_step(b, opt, StepContext(device=torch.device("cpu"), epoch=epoch))
        torch.manual_seed(100 + i)
        ref = opm_port.authors_step(port, b["inputs"]["audio"], b["inputs"]["image"], b["label"],
                                    ref_opt, epoch)
        seen.append(ref)
        assert not ref["skipped"] and ref["kept"] == B  # the weaker modality is never dropped
        assert float(logs["loss"]) == pytest.approx(ref["loss"], abs=1e-5), i
        assert bool(logs["opm/executed"]) == ref["executed"], i
        for j, m in enumerate(("audio", "image")):
            assert float(logs[f"loss/{m}"]) == pytest.approx(ref["losses"][j], abs=1e-5), (i, m)
            assert float(logs[f"opm/drop_prob_{m}"]) == pytest.approx(ref["q"][j], abs=1e-6), (i, m)
            if ref["ratios"] is not None:
                assert float(logs[f"opm/ratio_{m}"]) == pytest.approx(ref["ratios"][j], abs=1e-6)
        assert_same_weights(method, encoders, port.fxy)
    # Both modalities dominated some dropping step; the coin said no in others; the warm-up
    # epoch dropped nothing.
    on = [r for r in seen[1:]]
    assert {r["q"].index(max(r["q"])) for r in on if r["executed"]} == {0, 1}
    assert any(not r["executed"] for r in on) and not seen[0]["executed"]


def test_the_authors_theta_gradient_matters():
    method, port, encoders, opt, ref_opt = run_authors(theta_grad="none")
    gaps = []
    for i, (epoch, b) in enumerate(zip(EPOCHS, batches(method, len(EPOCHS)), strict=True)):
        torch.manual_seed(100 + i)
        method.train_step(b, opt, StepContext(device=torch.device("cpu"), epoch=epoch))
        torch.manual_seed(100 + i)
        opm_port.authors_step(port, b["inputs"]["audio"], b["inputs"]["image"], b["label"],
                              ref_opt, epoch)
        gaps.append(max_weight_gap(method, encoders, port.fxy))
    assert gaps[0] < 1e-5  # the warm-up step: no drop, no θ
    assert max(gaps) > 1e-3


# -- BalanceBenchmark -------------------------------------------------------------------------

STEPS = 8


def run_balancebench(spec, theta_grad: str | None = None):
    options = {} if theta_grad is None else {"theta_grad": theta_grad}
    # The initial head: scores of the same size, where the overwritten score makes the second
    # modality's ratio exceed 1 too.
    method = build(spec, "balancebench", 1.0, **options)
    encoders = {m: copy.deepcopy(method.encoders[m]) for m in method.modalities}
    fc = copy.deepcopy(method.head.fc)
    params = [p for e in encoders.values() for p in e.parameters()] + list(fc.parameters())
    sgd = dict(lr=1e-2, momentum=0.9, weight_decay=1e-4)
    opt, ref_opt = torch.optim.SGD(method.parameters(), **sgd), torch.optim.SGD(params, **sgd)
    method.train()
    for e in encoders.values():
        e.train()
    return method, encoders, fc, opt, ref_opt


def bb_step(encoders, fc, b, ref_opt):
    return opm_port.balancebench_step(encoders, fc, {m: b["inputs"][m] for m in encoders},
                                      b["label"], ref_opt, q_base=0.4, alpha=0.5, p_exe=0.7)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
@pytest.mark.parametrize("spec", [SPEC, SPEC3], ids=["2mod", "3mod"])
def test_balancebench_preset_steps_like_its_trainer(spec):
    method, encoders, fc, opt, ref_opt = run_balancebench(spec)
    seen = []
    for i, b in enumerate(batches(method, STEPS)):
        torch.manual_seed(200 + i)
        logs = method.train_step(b, opt, StepContext(device=torch.device("cpu"), epoch=i // 4))
        torch.manual_seed(200 + i)
        ref = bb_step(encoders, fc, b, ref_opt)
        seen.append(ref)
        assert float(logs["loss"]) == pytest.approx(ref["loss"], abs=1e-5), i
        assert bool(logs["opm/executed"]) == ref["executed"], i
        for j, m in enumerate(method.modalities):
            assert float(logs[f"opm/ratio_{m}"]) == pytest.approx(ref["ratios"][j], abs=1e-6), (i, m)
            assert float(logs[f"opm/drop_prob_{m}"]) == pytest.approx(ref["q"][j], abs=1e-6), (i, m)
        assert_same_weights(method, encoders, fc)
    assert any(r["executed"] for r in seen) and any(not r["executed"] for r in seen)
    # The overwritten scores: with two modalities both are dropped in some steps, and samples
    # that lost both left the loss; with three the last one, divided by the first two's ratios,
    # is dropped in every step.
    if len(spec.modalities) == 2:
        assert any(min(r["q"]) > 0 for r in seen) and any(r["kept"] < B for r in seen)
    else:
        assert all(r["q"][-1] > 0 for r in seen)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_the_balancebench_rescale_gradient_matters():
    method, encoders, fc, opt, ref_opt = run_balancebench(SPEC, theta_grad="none")
    gaps = []
    for i, b in enumerate(batches(method, STEPS)):
        torch.manual_seed(200 + i)
        method.train_step(b, opt, StepContext(device=torch.device("cpu")))
        torch.manual_seed(200 + i)
        bb_step(encoders, fc, b, ref_opt)
        gaps.append(max_weight_gap(method, encoders, fc))
    assert max(gaps) > 1e-4  # ten times the tolerance the preset meets
