"""OPM (METHODS.md §9): ratios, drop probabilities and the feature drop pinned by hand; the train
step drops only the dominant modality's features, only in its window and never at evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, StepContext, build_method
from mmray.methods.opm import (
    drop_features,
    drop_probabilities,
    kept_loss,
    opm_ratios,
    opm_scores,
    returned_theta,
)

from helpers import ML_SPEC, SPEC, SPEC3, Recorder, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
CPU = torch.device("cpu")
T = torch.tensor


def _method(spec=SPEC, preset="", **options):
    cfg = checked_method_config("opm", preset=preset, options=options)
    torch.manual_seed(0)
    return build_method(spec, MODEL, cfg)


def _dominated_by(method, modality: str, b: int = 16, seed: int = 0) -> dict:
    """A batch whose labels are the class `modality` rates highest against the others at the
    current weights: that modality dominates the scores."""
    batch = make_batch(method.spec, b=b, seed=seed)
    with torch.no_grad():
        per_mod = copy.deepcopy(method)(batch).per_modality  # a copy: BN statistics untouched
    batch["label"] = (2 * per_mod[modality] - sum(per_mod.values())).argmax(1)
    return batch


class HeadInputs:
    """Records the features each call of the fusion head receives."""

    def __init__(self, method):
        self.calls: list[dict[str, torch.Tensor]] = []
        method.head.register_forward_pre_hook(
            lambda mod, args: self.calls.append({m: h.detach().clone() for m, h in args[0].items()}))


# -- the formulas -----------------------------------------------------------------------------


def test_scores_are_summed_true_class_probabilities():
    z_a = T([[2.0, 0.0], [0.0, 0.0]])
    z_v = T([[0.0, 1.0], [1.0, 0.0]])
    s = opm_scores({"a": z_a, "v": z_v}, T([0, 1]))
    e = math.e
    assert s["a"].item() == pytest.approx(e**2 / (e**2 + 1) + 0.5, rel=1e-6)
    assert s["v"].item() == pytest.approx(2 / (1 + e), rel=1e-6)


def test_two_modalities_ratio_and_drop_probability_by_hand():
    r = opm_ratios({"a": T(3.0), "v": T(1.5)})
    assert r["a"].item() == pytest.approx(math.tanh(3.0 / 1.5 - 1), rel=1e-6)
    assert r["v"].item() == 0.0  # relu: the weaker modality has ratio 0
    q = drop_probabilities(r, q_base=0.5, alpha=0.5)
    assert q["a"].item() == pytest.approx(0.5 * (1 + 0.5 * math.tanh(1.0)), rel=1e-6)
    assert q["v"].item() == 0.0  # not q_base: only a dominant modality is dropped
    # A slight lead still gives at least q_base; equal scores drop nothing.
    q2 = drop_probabilities(opm_ratios({"a": T(1.0), "v": T(1.001)}), 0.4, 0.5)
    assert q2["v"].item() == pytest.approx(0.4 * (1 + 0.5 * math.tanh(0.001)), rel=1e-5)
    even = drop_probabilities(opm_ratios({"a": T(2.0), "v": T(2.0)}), 0.4, 0.5)
    assert even["a"].item() == 0.0 and even["v"].item() == 0.0


def test_drop_probability_is_clipped_to_one():
    q = drop_probabilities(opm_ratios({"a": T(10.0), "v": T(1.0)}), q_base=0.9, alpha=1.0)
    assert q["a"].item() == 1.0  # 0.9 · (1 + tanh(9)) > 1


def test_three_modalities_mean_sum_and_eps():
    s = {"a": T(3.0), "v": T(1.0), "t": T(2.0)}
    mean = opm_ratios(s)
    assert mean["a"].item() == pytest.approx(math.tanh(3.0 / 1.5 - 1), rel=1e-6)
    assert mean["v"].item() == 0.0 and mean["t"].item() == 0.0  # ρ_t = 2 / 2 = 1
    assert opm_ratios(s, "sum")["a"].item() == 0.0  # 3 / (1 + 2) = 1
    s2 = {"a": T(5.0), "v": T(1.0), "t": T(2.0)}
    assert opm_ratios(s2, "sum")["a"].item() == pytest.approx(math.tanh(5 / 3 - 1), rel=1e-6)
    eps = opm_ratios({"a": T(3.0), "v": T(1.5)}, eps=0.5)
    assert eps["a"].item() == pytest.approx(math.tanh(3.0 / 2.0 - 1), rel=1e-6)


def test_overwritten_scores_feed_the_later_ratios():
    # BalanceBenchmark: s_a becomes s_a / s_v = 1.2 before visual's ratio is taken, so visual,
    # the weaker modality, gets s_v / 1.2 = 5 > 1.
    r = opm_ratios({"a": T(7.2), "v": T(6.0)}, overwrite_scores=True)
    assert r["a"].item() == pytest.approx(math.tanh(0.2), rel=1e-6)
    assert r["v"].item() == pytest.approx(math.tanh(6.0 / 1.2 - 1), rel=1e-6)
    assert opm_ratios({"a": T(7.2), "v": T(6.0)})["v"].item() == 0.0
    # Three modalities, over the sum: t reads the replaced a and v.
    s3 = {"a": T(1.0), "v": T(1.0), "t": T(3.0)}
    r3 = opm_ratios(s3, "sum", overwrite_scores=True)
    ra, rv = 1.0 / 4.0, 1.0 / (0.25 + 3.0)
    assert r3["a"].item() == 0.0 and r3["v"].item() == 0.0
    assert r3["t"].item() == pytest.approx(math.tanh(3.0 / (ra + rv) - 1), rel=1e-6)
    assert opm_ratios(s3, "sum")["t"].item() == pytest.approx(math.tanh(3.0 / 2.0 - 1), rel=1e-6)


# -- the drop ---------------------------------------------------------------------------------


def _feats(b=400, dims=(4, 12)):
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(b, dims[0], generator=g).abs() + 0.1,
            "v": torch.randn(b, dims[1], generator=g).abs() + 0.1}


def test_drop_zeroes_whole_samples_of_the_dropped_modality_and_rescales_all():
    feats = _feats()
    q = {"a": T(0.6), "v": T(0.0)}
    torch.manual_seed(3)
    out, keep, executed = drop_features(feats, q, p_exe=1.0)
    assert executed.item()
    theta = (4 * 0.6 + 12 * 0.0) / 16  # width-weighted mean of q
    dropped = keep[:, 0] == 0
    assert torch.equal(keep[:, 1], torch.ones(400))  # q = 0: never dropped
    assert 0.5 < dropped.float().mean().item() < 0.7
    assert torch.equal(out["a"][dropped], torch.zeros(int(dropped.sum()), 4))
    torch.testing.assert_close(out["a"][~dropped], feats["a"][~dropped] / (1 - theta))
    torch.testing.assert_close(out["v"], feats["v"] / (1 - theta))  # the kept modality too
    # The draws: the coin, then one Bernoulli(1 − q) per sample and modality, row by row.
    torch.manual_seed(3)
    coin = torch.rand(())
    mask = torch.distributions.Bernoulli(1 - T([0.6, 0.0])).sample([400, 1]).squeeze(1)
    assert coin.item() >= 0.0 and torch.equal(keep, mask)


def test_rescale_off_and_its_eps():
    feats, q = _feats(), {"a": T(0.5), "v": T(0.0)}
    torch.manual_seed(1)
    out, keep, _ = drop_features(feats, q, p_exe=1.0, rescale=False)
    torch.testing.assert_close(out["a"], feats["a"] * keep[:, :1])
    torch.testing.assert_close(out["v"], feats["v"])
    torch.manual_seed(1)
    out, _, _ = drop_features(feats, q, p_exe=1.0, rescale_eps=0.1)
    torch.testing.assert_close(out["v"], feats["v"] / (1 - 4 * 0.5 / 16 + 0.1))


def test_the_coin_decides_whether_a_step_drops_at_all():
    feats, q = _feats(b=8), {"a": T(0.9), "v": T(0.0)}
    out, keep, executed = drop_features(feats, q, p_exe=0.0)
    assert not executed.item() and torch.equal(keep, torch.ones(8, 2))
    assert all(torch.equal(out[m], feats[m]) for m in feats)  # no drop, no rescale
    torch.manual_seed(0)
    runs = [drop_features(feats, q, p_exe=0.7)[2].item() for _ in range(2000)]
    assert sum(runs) / 2000 == pytest.approx(0.7, abs=0.04)


def test_kept_loss_leaves_out_samples_that_lost_every_modality():
    logits = torch.randn(4, 3)
    label = T([0, 1, 2, 0])
    keep = T([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    want = torch.nn.functional.cross_entropy(logits[[0, 2, 3]], label[[0, 2, 3]])
    torch.testing.assert_close(kept_loss(logits, label, keep), want)
    assert kept_loss(logits, label, torch.zeros(4, 2)).item() == 0.0


def test_returned_theta_is_zero_valued_and_its_gradient_is_theta_times_its_own():
    x = torch.tensor(0.3, requires_grad=True)
    term = returned_theta(x**2, torch.tensor(True))
    assert term.item() == 0.0
    term.backward()
    assert x.grad.item() == pytest.approx(0.09 * 0.6)  # θ · ∂θ/∂x
    x.grad = None
    returned_theta(x**2, torch.tensor(False)).backward()
    assert x.grad.item() == 0.0  # a step that does not drop has no θ


# -- the step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("theta_grad, head_too", [("theta", False), ("rescale", True)])
def test_a_theta_gradient_reaches_what_the_reference_reaches(theta_grad, head_too):
    seen, losses = {}, {}
    for tg in ("none", theta_grad):
        method = _method(theta_grad=tg, p_exe=1.0)
        batch = _dominated_by(method, "audio")
        opt = Recorder(method.parameters())
        torch.manual_seed(3)
        losses[tg] = method.train_step(batch, opt, StepContext(device=CPU))["loss"]
        seen[tg] = opt.seen[0]
    assert losses[theta_grad].item() == losses["none"].item()  # the CE either way
    head = {id(p) for p in method.head.parameters()}
    differs = {i: not torch.allclose(a, b, rtol=1e-6, atol=1e-9)
               for i, (a, b) in enumerate(zip(seen["none"], seen[theta_grad], strict=True))}
    in_head = [id(p) in head for p in method.parameters()]
    for m in method.modalities:  # both encoders: θ reads both scores
        idx = {id(p) for p in method.encoders[m].parameters()}
        assert any(differs[i] for i, p in enumerate(method.parameters()) if id(p) in idx), m
    assert any(differs[i] for i, h in enumerate(in_head) if h) == head_too



@pytest.mark.parametrize("dominant", ["audio", "image"])
def test_the_step_drops_only_the_dominant_modality(dominant):
    method = _method(q_base=0.6, p_exe=1.0)
    batch = _dominated_by(method, dominant, b=32)
    seen = HeadInputs(method)
    torch.manual_seed(5)
    logs = method.train_step(batch, Recorder(method.parameters()), StepContext(device=CPU))
    plain, dropped = seen.calls  # the scores' undropped features, then the fused input
    other = next(m for m in method.modalities if m != dominant)
    q = logs[f"opm/drop_prob_{dominant}"].item()
    assert q >= 0.6 and logs[f"opm/drop_prob_{other}"].item() == 0.0
    assert logs[f"opm/ratio_{dominant}"].item() > 0 and logs[f"opm/ratio_{other}"].item() == 0
    scale = 1 - q / 2  # equal widths: θ = q / 2
    zero = (dropped[dominant] == 0).all(1)
    assert 0 < zero.sum() < 32
    torch.testing.assert_close(dropped[dominant][~zero], plain[dominant][~zero] / scale)
    torch.testing.assert_close(dropped[other], plain[other] / scale)  # never zeroed
    assert logs[f"opm/dropped_{dominant}"].item() == pytest.approx(zero.float().mean().item())
    assert logs[f"opm/dropped_{other}"].item() == 0.0 and logs["opm/executed"].item() == 1.0


def test_the_step_is_ce_on_the_dropped_fusion_with_the_same_draws():
    method = _method(q_base=0.6, p_exe=1.0)
    batch = _dominated_by(method, "audio", b=16)
    method.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # by hand, from the same weights and the same draws
    feats = method.features(batch)
    _, per_mod = method.head(feats)
    q = drop_probabilities(opm_ratios(opm_scores(per_mod, batch["label"])), 0.6, 0.5)
    coin = torch.rand(())
    keep = torch.bernoulli(1 - torch.stack([q["audio"], q["image"]]).expand(16, 2))
    assert coin.item() >= 0.0 and keep[:, 1].all() and not keep[:, 0].all()
    scale = 1 - (8 * q["audio"] + 8 * q["image"]) / 16
    h = {"audio": feats["audio"] * keep[:, :1] / scale, "image": feats["image"] / scale}
    loss = torch.nn.functional.cross_entropy(method.head(h)[0], batch["label"])
    loss.backward()
    want = [p.grad.clone() for p in method.parameters()]
    opt = Recorder(method.parameters())
    torch.manual_seed(7)
    logs = method.train_step(batch, opt, StepContext(device=CPU))
    assert logs["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for got, w in zip(opt.seen[0], want, strict=True):
        torch.testing.assert_close(got, w)


def test_outside_the_window_the_step_is_normal_and_draws_nothing():
    method = _method(modulation_starts=2, modulation_ends=4, p_exe=1.0, q_base=0.9)
    batch = _dominated_by(method, "audio")
    normal = build_method(SPEC, MODEL, MethodConfig("normal"))
    normal.load_state_dict(method.state_dict(), strict=False)
    opt_n = Recorder(normal.parameters())
    normal.train_step(batch, opt_n, StepContext(device=CPU))
    for epoch, on in [(0, False), (1, False), (2, True), (3, True), (4, False)]:
        opt = Recorder(method.parameters())
        torch.manual_seed(0)
        state = torch.get_rng_state()
        logs = method.train_step(batch, opt, StepContext(device=CPU, epoch=epoch))
        assert torch.equal(torch.get_rng_state(), state) != on, epoch
        assert (logs["opm/drop_prob_audio"].item() > 0) == on, epoch
        if not on:
            for got, want in zip(opt.seen[0], opt_n.seen[0], strict=True):
                torch.testing.assert_close(got, want)
            assert logs["opm/executed"].item() == 0.0 and logs["opm/dropped_audio"].item() == 0.0


@pytest.mark.parametrize("preset, on, off", [
    ("", [0, 7, 500], []),
    ("reference", [6, 7, 500], [0, 5]),
    ("balancebench", [0, 79, 80], [81]),
])
def test_windows_of_the_presets(preset, on, off):
    method = _method(preset=preset)
    assert all(method.active(e) for e in on) and not any(method.active(e) for e in off)
    assert not _method(modulation_starts=1, modulation_ends=3).active(3)


def test_evaluation_never_drops():
    method = _method(q_base=1.0, alpha=1.0, p_exe=1.0)
    batch = _dominated_by(method, "audio")
    normal = build_method(SPEC, MODEL, MethodConfig("normal"))
    normal.load_state_dict(method.state_dict(), strict=False)
    method.eval(), normal.eval()
    with torch.no_grad():
        outs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            outs.append(method.predict(batch).logits)
        want = normal(batch).logits
    torch.testing.assert_close(outs[0], want, rtol=0, atol=0)
    torch.testing.assert_close(outs[1], want, rtol=0, atol=0)


def test_three_modalities_and_balancebench_drop_both():
    method = _method(SPEC3, preset="reference", p_exe=1.0)
    with torch.no_grad():  # a confident head: text's score can exceed the other two together
        method.head.fc.weight.mul_(20.0)
    logs = method.train_step(_dominated_by(method, "text"), Recorder(method.parameters()),
                             StepContext(device=CPU, epoch=6))
    assert logs["opm/drop_prob_text"].item() > 0.5
    assert logs["opm/drop_prob_audio"].item() == 0 and logs["opm/drop_prob_image"].item() == 0
    bb = _method(preset="balancebench", p_exe=1.0)
    torch.manual_seed(2)
    logs = bb.train_step(_dominated_by(bb, "audio", b=32), Recorder(bb.parameters()),
                         StepContext(device=CPU))
    # The overwritten audio score makes image, the weaker modality, look dominant too.
    assert logs["opm/drop_prob_image"].item() > logs["opm/drop_prob_audio"].item() > 0.4


def test_a_missing_modality_stays_zero_and_its_input_does_not_matter():
    method = _method(p_exe=1.0, q_base=0.6)
    batch = _dominated_by(method, "audio")
    batch["present"]["image"][::2] = False
    changed = {**batch, "inputs": {**batch["inputs"], "image": batch["inputs"]["image"].clone()}}
    changed["inputs"]["image"][::2] = torch.randn_like(changed["inputs"]["image"][::2])
    losses = []
    for b in (batch, changed):
        m = _method(p_exe=1.0, q_base=0.6)
        m.encoders.eval()  # batch-norm statistics would mix the absent inputs into the rest
        seen = HeadInputs(m)
        torch.manual_seed(4)
        losses.append(m.train_step(b, Recorder(m.parameters()), StepContext(device=CPU))["loss"])
        assert (seen.calls[1]["image"][::2] == 0).all()
    torch.testing.assert_close(losses[0], losses[1])


def test_checkpoint_round_trip_gives_the_same_next_step():
    method = _method(p_exe=1.0)
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    for i in range(2):
        torch.manual_seed(10 + i)
        method.train_step(make_batch(SPEC, b=8, seed=i), opt, StepContext(device=CPU))
    fresh = _method(p_exe=1.0)
    fresh.load_state_dict(method.state_dict())
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # its buffers are not shared
    batch = make_batch(SPEC, b=8, seed=5)
    logs = []
    for m, o in ((method, opt), (fresh, opt2)):
        torch.manual_seed(42)
        logs.append(m.train_step(batch, o, StepContext(device=CPU)))
    assert logs[0]["loss"].item() == logs[1]["loss"].item()
    for a, b in zip(method.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_logs_are_averaged_per_epoch_by_the_loop():
    from mmray.train.loop import RunState, train_epoch

    method = _method()
    state = RunState(method, torch.optim.SGD(method.parameters(), lr=0.01), None)
    means = train_epoch(state, [make_batch(SPEC, seed=s) for s in range(3)], StepContext(device=CPU))
    for m in SPEC.modalities:
        assert {f"train/opm/ratio_{m}", f"train/opm/drop_prob_{m}", f"train/opm/dropped_{m}",
                f"train/loss/{m}"} <= set(means)
    assert "train/opm/executed" in means


def test_unsupported_names_the_reason():
    cls = METHODS["opm"]
    assert cls.unsupported(SPEC) == "" and cls.unsupported(SPEC3) == ""
    assert "multi-label" in cls.unsupported(ML_SPEC) and "softmax" in cls.unsupported(ML_SPEC)
    one = DatasetSpec("one", {"audio": ModalitySpec("audio", (1, 12, 8))}, num_classes=3)
    assert "modalities" in cls.unsupported(one)
    with pytest.raises(ValueError, match=r"method.name=opm: .*multi-label"):
        build_method(ML_SPEC, MODEL, MethodConfig("opm"))


def test_the_window_is_validated():
    from mmray.methods import check_method_config

    errors: list[str] = []
    check_method_config(MethodConfig("opm", options={"modulation_starts": 5, "modulation_ends": 2}),
                        "method", errors)
    assert any("modulation_ends" in e for e in errors)
