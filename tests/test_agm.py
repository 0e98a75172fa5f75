"""AGM (METHODS.md §9): Shapley responses, scores, ratios, coefficients, the running mean, the
gradient the step applies and the method state, pinned by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.agm import (
    AGM,
    agm_coefficients,
    clip_if_head_exceeds_,
    coalitions,
    discrepancy_ratios,
    response_scores,
    running_mean,
    scale_grad,
    shapley_responses,
    shapley_weight,
)

from helpers import ML_SPEC, SPEC, SPEC3, Recorder, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CPU = torch.device("cpu")


def _method(spec=SPEC, preset="", **options):
    cfg = checked_method_config("agm", "concat", preset=preset, options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg)


def _double(batch: dict) -> dict:
    return {**batch, "inputs": {m: x.double() for m, x in batch["inputs"].items()}}


def _ctx(epoch=0):
    return StepContext(device=CPU, epoch=epoch)


# -- the formulas -----------------------------------------------------------------------------


def test_shapley_weights():
    assert [shapley_weight(s, 2) for s in range(2)] == [0.5, 0.5]
    assert [shapley_weight(s, 3) for s in range(3)] == pytest.approx([1 / 3, 1 / 6, 1 / 3])
    assert coalitions(["a", "v"]) == [frozenset("av"), frozenset("a"), frozenset("v")]
    assert len(coalitions(["a", "v", "t"])) == 7  # f(∅) is never needed


def _values(fn, mods):
    return {s: torch.tensor([fn(s)]) for s in coalitions(mods)}


def test_two_modality_responses_are_the_reference_closed_form():
    f = {"av": 5.0, "a": 2.0, "v": 1.5}
    vals = {frozenset(k): torch.tensor([v]) for k, v in f.items()}
    o = shapley_responses(vals, ["a", "v"])
    # Modality_Audio: ½(total − pad_audio + pad_visual) = ½(f(a,v) − f(v) + f(a)).
    assert o["a"].item() == pytest.approx(0.5 * (5.0 - 1.5 + 2.0))
    assert o["v"].item() == pytest.approx(0.5 * (5.0 - 2.0 + 1.5))
    assert (o["a"] + o["v"]).item() == pytest.approx(5.0)  # Σ o_m = f(N)


def test_three_modality_responses_are_the_reference_closed_form():
    f = {"avt": 7.0, "av": 4.0, "at": 3.5, "vt": 2.0, "a": 1.0, "v": 0.5, "t": -0.25}
    vals = {frozenset(k): torch.tensor([v]) for k, v in f.items()}
    o = shapley_responses(vals, ["a", "v", "t"])
    # URFunny_net.py Modality_Audio: (total − pad_a + pad_vt)/3 + (pad_v − pad_at + pad_t − pad_va)/6,
    # where pad_x is f of the coalition without x.
    want_a = (f["avt"] - f["vt"] + f["a"]) / 3 + (f["at"] - f["t"] + f["av"] - f["v"]) / 6
    want_v = (f["avt"] - f["at"] + f["v"]) / 3 + (f["av"] - f["a"] + f["vt"] - f["t"]) / 6
    want_t = (f["avt"] - f["av"] + f["t"]) / 3 + (f["at"] - f["a"] + f["vt"] - f["v"]) / 6
    assert [o[m].item() for m in "avt"] == pytest.approx([want_a, want_v, want_t])
    assert sum(o.values()).item() == pytest.approx(f["avt"])


@pytest.mark.parametrize("mods", [["a", "v"], ["a", "v", "t"]])
def test_an_additive_game_gives_each_modality_its_own_part_and_a_share_of_the_baseline(mods):
    c, b = {"a": 1.0, "v": -2.0, "t": 0.5}, 0.9
    o = shapley_responses(_values(lambda s: sum(c[m] for m in s) + b, mods), mods)
    for m in mods:
        assert o[m].item() == pytest.approx(c[m] + b / len(mods))


def test_scores_are_the_mean_true_class_nll_floored_at_1e_8():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    far = torch.tensor([[0.0, 40.0], [0.0, 0.0]])  # p(true) = e^-40 < 1e-8 for sample 0
    label = torch.tensor([0, 1])
    s = response_scores({"a": z, "v": far}, label)
    e = math.e
    assert s.dtype == torch.float64
    assert s[0].item() == pytest.approx((-math.log(e**2 / (e**2 + 1)) + math.log(2)) / 2, rel=1e-6)
    assert s[1].item() == pytest.approx((-math.log(1e-8) + math.log(2)) / 2, rel=1e-6)


def test_ratios_two_and_three_modalities():
    s2 = torch.tensor([0.5, 1.25], dtype=torch.float64)
    r2 = discrepancy_ratios(s2)
    assert r2.tolist() == pytest.approx([math.exp(1.25 - 0.5), math.exp(0.5 - 1.25)])
    s3 = torch.tensor([0.3, 0.9, 1.5], dtype=torch.float64)
    r3 = discrepancy_ratios(s3)
    assert r3.tolist() == pytest.approx([math.exp(1.5 * (0.9 - s)) for s in (0.3, 0.9, 1.5)])
    assert discrepancy_ratios(torch.zeros(3, dtype=torch.float64)).tolist() == [1.0, 1.0, 1.0]


def test_coefficients_and_the_clamp():
    r = torch.tensor([2.0, 0.5], dtype=torch.float64)
    concept = torch.tensor([1.0, 1.0], dtype=torch.float64)
    k = agm_coefficients(r, concept, alpha=0.7, clamp=10.0)
    # Fits better than its running share (r > r*): slowed; worse: sped up.
    assert k.tolist() == pytest.approx([math.exp(0.7 * -1.0), math.exp(0.7 * 0.5)])
    far = torch.tensor([30.0, 1.0], dtype=torch.float64)
    assert agm_coefficients(r, far, 1.0, clamp=7.0)[0].item() == pytest.approx(math.exp(7.0))
    assert agm_coefficients(r, far, 1.0, clamp=None)[0].item() == pytest.approx(math.exp(28.0))
    assert agm_coefficients(r, far, 1.0, clamp=10.0)[1].item() == pytest.approx(math.exp(0.5))


def test_running_mean_is_the_plain_average_of_every_step():
    values = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0], [6.0, 1.0]], dtype=torch.float64)
    mean = torch.zeros(2, dtype=torch.float64)
    for t, v in enumerate(values, start=1):
        mean = running_mean(mean, v, torch.tensor(t))
        torch.testing.assert_close(mean, values[:t].mean(0))


def test_scale_grad_is_the_identity_forward_and_scales_backward():
    x = torch.randn(3, 2, requires_grad=True)
    y = scale_grad(x, torch.tensor(0.25, dtype=torch.float64))
    assert torch.equal(y, x)
    (y * torch.arange(6.0).view(3, 2)).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * torch.arange(6.0).view(3, 2))


def test_clip_when_a_head_weight_gradient_exceeds_the_limit():
    head, other = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))
    head.grad, other.grad = torch.tensor([[0.5, -0.9], [0.1, 0.2]]), torch.tensor([3.0, 0.0, 4.0])
    before = [head.grad.clone(), other.grad.clone()]
    assert not clip_if_head_exceeds_([head, other], [head], 1.0)
    assert torch.equal(head.grad, before[0]) and torch.equal(other.grad, before[1])
    head.grad[0, 1] = -1.5  # |g| > 1 on the head: the total norm goes to 1
    total = math.sqrt(0.25 + 2.25 + 0.01 + 0.04 + 9 + 16)
    assert clip_if_head_exceeds_([head, other], [head], 1.0)
    norm = torch.cat([head.grad.flatten(), other.grad]).norm().item()
    assert norm == pytest.approx(total / (total + 1e-6), rel=1e-6)


# -- the step ---------------------------------------------------------------------------------


def _expected_grads(method, batch, k: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradient AGM applies, built from the two-modality closed form on a copy of the
    method: CE at f(N), with ½(k_a + k_v) on f(a,v), ½(k_a − k_v) on f(a,·masked v) and
    ½(k_v − k_a) on f(masked a,·v)."""
    m = copy.deepcopy(method)
    a, v = m.modalities
    feats = m.features(batch)  # train mode, as the step's f(N)
    if m.options.mask == "feature":
        on, off = feats, {x: torch.zeros_like(h) for x, h in feats.items()}
    else:
        m.encoders.eval()
        on = {x: m.encoders[x](batch["inputs"][x]) for x in (a, v)}
        off = {x: m.encoders[x](torch.zeros_like(batch["inputs"][x])) for x in (a, v)}
        m.encoders.train()
    f_n = m.head(feats)[0]
    f_a = m.head({a: on[a], v: off[v]})[0]
    f_v = m.head({a: off[a], v: on[v]})[0]
    ka, kv = k.tolist()
    weighted = 0.5 * (ka + kv) * f_n + 0.5 * (ka - kv) * f_a + 0.5 * (kv - ka) * f_v
    logits = weighted - weighted.detach() + f_n.detach()  # value f(N), the k-weighted gradient
    F.cross_entropy(logits.float(), batch["label"]).backward()  # mmray's loss is in float32
    return [None if p.grad is None else p.grad for p in m.parameters()]


@pytest.mark.parametrize("mask", ["input", "feature"])
def test_the_step_scales_each_response_gradient_by_its_coefficient(mask):
    method = _method(mask=mask, alpha=3.0).double()  # float64: the comparison is to the last bits
    method.running_score.copy_(torch.tensor([0.2, 1.4], dtype=torch.float64))  # r* far from r
    method.steps.fill_(5)
    method.train()
    batch = _double(make_batch(SPEC, b=8))
    opt = Recorder(method.parameters())
    # The coefficients the step will compute, from a copy (batch-norm statistics untouched).
    o = shapley_responses(copy.deepcopy(method).coalition_logits(batch), method.modalities)
    r = discrepancy_ratios(response_scores(o, batch["label"]))
    want_k = agm_coefficients(r, discrepancy_ratios(method.running_score), 3.0, 10.0)
    expected = _expected_grads(method, batch, want_k)
    logs = method.train_step(batch, opt, _ctx())
    got = [logs[f"agm/coeff_{m}"].item() for m in method.modalities]
    assert got == pytest.approx(want_k.tolist(), rel=1e-6)
    assert abs(got[0] - got[1]) > 0.5  # the coefficients really differ
    for g, e in zip(opt.seen[0], expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


def test_outside_the_window_the_step_is_normal_joint_training():
    method = _method(modulation_starts=1, modulation_ends=2)
    batch = make_batch(SPEC, b=8)
    normal = copy.deepcopy(method)
    normal.zero_grad()
    F.cross_entropy(normal.head(normal.features(batch))[0], batch["label"]).backward()
    opt = Recorder(method.parameters())
    logs = method.train_step(batch, opt, _ctx(epoch=0))
    assert all(logs[f"agm/coeff_{m}"].item() == 1.0 for m in method.modalities)
    for g, p in zip(opt.seen[0], normal.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hold", [False, True])
def test_coefficients_before_inside_and_after_the_window(hold):
    method = _method(SPEC3, modulation_starts=1, modulation_ends=2, hold_after_window=hold)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    coeffs = []
    for i, epoch in enumerate([0, 1, 1, 2, 2]):
        logs = method.train_step(make_batch(SPEC3, b=8, seed=i), opt, _ctx(epoch))
        coeffs.append([logs[f"agm/coeff_{m}"].item() for m in method.modalities])
    assert coeffs[0] == [1.0, 1.0, 1.0]
    assert coeffs[1] != coeffs[2] and coeffs[2] != [1.0, 1.0, 1.0]
    after = coeffs[2] if hold else [1.0, 1.0, 1.0]  # held: the window's last step's
    assert coeffs[3] == pytest.approx(after) and coeffs[4] == pytest.approx(after)


def test_running_scores_average_every_step_and_start_at_ratio_one():
    method = _method(modulation_starts=3, modulation_ends=4)  # outside the window: still updated
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    scores, concepts = [], []
    for i in range(3):
        logs = method.train_step(make_batch(SPEC, b=8, seed=i), opt, _ctx())
        scores.append([logs[f"agm/score_{m}"].item() for m in method.modalities])
        concepts.append([logs[f"agm/concept_{m}"].item() for m in method.modalities])
    assert concepts[0] == [1.0, 1.0]  # s* = 0 before the first step
    assert method.steps.item() == 3
    mean = torch.tensor(scores, dtype=torch.float64).mean(0)
    torch.testing.assert_close(method.running_score, mean)
    metrics = method.epoch_metrics()
    assert metrics["agm/running_score_audio"] == pytest.approx(mean[0].item())
    assert metrics["agm/concept_ratio_audio"] == pytest.approx(math.exp(mean[1] - mean[0]))
    # r* of step 3 is the ratio of the mean of steps 1 and 2.
    two = torch.tensor(scores[:2], dtype=torch.float64).mean(0)
    assert concepts[2][0] == pytest.approx(math.exp(two[1] - two[0]))


def test_the_reference_clip_is_logged_and_bounds_the_step():
    method = _method(preset="reference", alpha=1.0)
    with torch.no_grad():
        method.head.fc.weight.mul_(30.0)
    method.running_score.copy_(torch.tensor([0.0, 3.0], dtype=torch.float64))
    opt = Recorder(method.parameters())
    logs = method.train_step(make_batch(SPEC, b=8), opt, _ctx())
    assert logs["agm/clipped"].item() == 1.0
    norm = torch.cat([g.flatten() for g in opt.seen[0] if g is not None]).norm().item()
    assert norm == pytest.approx(1.0, rel=1e-4)
    assert "agm/clipped" not in _method().train_step(make_batch(SPEC), Recorder(method.parameters()), _ctx())


def test_feature_masking_with_a_linear_head_makes_the_responses_the_head_logits():
    method = _method(mask="feature")
    batch = make_batch(SPEC, b=5)
    with torch.no_grad():
        o = shapley_responses(method.coalition_logits(batch), method.modalities)
        per_mod = method(batch).per_modality
    for m in method.modalities:
        torch.testing.assert_close(o[m], per_mod[m], rtol=1e-5, atol=1e-6)


def test_input_masking_runs_the_masked_encoders_in_eval_mode():
    method = _method()
    method.train()
    batch = make_batch(SPEC, b=6)
    bn = next(x for x in method.encoders["audio"].modules() if isinstance(x, nn.BatchNorm2d))
    tracked = bn.num_batches_tracked.item()
    method.coalition_logits(batch)
    assert bn.num_batches_tracked.item() == tracked + 1  # only the train-mode f(N) forward
    assert method.encoders["audio"].training and bn.training  # the mode is restored


def test_an_absent_modality_input_changes_nothing_in_the_step():
    def step(inputs):
        # In eval mode: in train mode an absent input still enters batch norm's batch
        # statistics (the shared encoders' behaviour, not AGM's).
        method = _method().eval()
        return method.train_step({**batch, "inputs": inputs}, Recorder(method.parameters()), _ctx())
    batch = make_batch(SPEC, b=6)
    batch["present"]["image"][::2] = False
    changed = dict(batch["inputs"])
    noise = torch.randn_like(changed["image"])
    changed["image"] = torch.where(batch["present"]["image"].view(-1, 1, 1, 1), changed["image"], noise)
    a, b = step(batch["inputs"]), step(changed)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_checkpoint_round_trip_resumes_exactly():
    method = _method(SPEC3, preset="reference_3mod", modulation_ends=1)
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    for i in range(3):
        method.train_step(make_batch(SPEC3, b=8, seed=i), opt, _ctx(epoch=i // 2))
    state, opt_state = copy.deepcopy(method.state_dict()), copy.deepcopy(opt.state_dict())
    assert {"running_score", "steps", "held"} <= set(state)
    fresh = _method(SPEC3, preset="reference_3mod", modulation_ends=1)
    fresh.load_state_dict(state)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_opt.load_state_dict(opt_state)
    batch = make_batch(SPEC3, b=8, seed=9)
    a = method.train_step(batch, opt, _ctx(epoch=2))  # after the window: the held coefficients
    b = fresh.train_step(batch, fresh_opt, _ctx(epoch=2))
    assert a["agm/coeff_audio"].item() != 1.0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for (name, p), q in zip(method.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_unsupported_datasets_say_why():
    assert "multi-label" in AGM.unsupported(ML_SPEC) and "one true class" in AGM.unsupported(ML_SPEC)
    assert AGM.unsupported(SPEC) == "" and AGM.unsupported(SPEC3) == ""
    with pytest.raises(ValueError, match="method.name=agm: .*multi-label"):
        _method(ML_SPEC)
