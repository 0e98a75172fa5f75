"""ReconBoost (METHODS.md §9): the boosting and reconcilement losses by hand, the stage schedule,
which parameters each phase trains, the fused ensemble, missing modalities, the optimizer reset,
checkpoint round-trips and the unsupported datasets. The step-by-step comparison with the
reference code is tests/reference/test_ref_reconboost.py."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.base import masked_mean
from mmray.methods.reconboost import (
    Config,
    ReconBoost,
    boosting_loss,
    reconcile_loss,
    schedule,
)

from helpers import ML_SPEC, SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=6)
FAST = {"boost_epochs": 1, "correct_epochs": 1}  # stage s: epoch 2s boosts, 2s + 1 rectifies


def _method(spec=SPEC, preset="", seed=0, **options) -> ReconBoost:
    cfg = checked_method_config("reconboost", preset=preset, options=options)
    torch.manual_seed(seed)
    return build_method(spec, MODEL, cfg)


def _ctx(epoch: int, batch_idx: int = 0) -> StepContext:
    return StepContext(device=torch.device("cpu"), epoch=epoch, batch_idx=batch_idx)


class Recorder(torch.optim.SGD):
    """SGD with lr 0 that records every parameter's gradient (None if absent) at each step."""

    def __init__(self, method):
        super().__init__(method.parameters(), lr=0.0)
        self.names = [n for n, _ in method.named_parameters()]
        self.seen: list[dict[str, torch.Tensor | None]] = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.seen.append({n: None if p.grad is None else p.grad.clone()
                          for n, p in zip(self.names, params, strict=True)})
        return super().step(closure)


# -- the formulas -------------------------------------------------------------------------------

def test_boosting_loss_by_hand():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    ens = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    e = math.e
    logp = [1 - math.log(e + 1 + 1 / e), -math.log(2 * e ** 0.5 + 1)]
    q = [1 / (2 + e), 1 / (e ** 2 + 2)]
    want = [-(5 - q[i]) * logp[i] for i in range(2)]
    got = boosting_loss(z, y, ens, 5.0, 1.0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # The reference's form: (−w1·t·log p + w2·t·q·log p) averaged over the classes.
    t = F.one_hot(y, 3).double()
    ref = (-5 * (t * z.log_softmax(1)).mean(-1) + (t * ens.softmax(1) * z.log_softmax(1)).mean(-1))
    torch.testing.assert_close(boosting_loss(z, y, ens, 5.0, 1.0, class_mean=True), ref)
    # No other learner (the reference's constant c0, softmax 1): q = 1, overall or per sample.
    torch.testing.assert_close(boosting_loss(z, y, None, 5.0, 1.0),
                               torch.tensor([-4 * v for v in logp], dtype=torch.float64))
    masked = boosting_loss(z, y, ens, 5.0, 1.0, has_others=torch.tensor([True, False]))
    torch.testing.assert_close(masked, torch.tensor([want[0], -4 * logp[1]], dtype=torch.float64))


def test_boosting_gradient_reaches_only_the_learner():
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ens = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    boosting_loss(z, torch.tensor([0, 1, 2, 0]), ens, 5.0, 1.0).sum().backward()
    assert z.grad.abs().sum() > 0 and ens.grad is None


def test_reconcile_loss_by_hand_and_its_gradient():
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)  # p = (1/4, 3/4)
    prev = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # q = (1/2, 1/2)
    rec = reconcile_loss(z, prev)
    torch.testing.assert_close(rec, torch.tensor([(0.25 ** 2 + 0.25 ** 2) / 2], dtype=torch.float64))
    rec.sum().backward()
    assert z.grad.abs().sum() > 0 and prev.grad is None
    detached = reconcile_loss(z, prev, grad=False)  # the reference: both sides detached
    torch.testing.assert_close(detached, rec.detach())
    assert not detached.requires_grad
    # nn.MSELoss's mean over B×C is the mean of the per-sample means.
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(reconcile_loss(a, b).mean(), F.mse_loss(a.softmax(1), b.softmax(1)))


def test_weighted_mean_counts_only_the_present_samples():
    per = torch.tensor([1.0, 2.0, 4.0])
    assert masked_mean(per, torch.tensor([True, False, True])).item() == pytest.approx(2.5)
    assert masked_mean(per, torch.zeros(3, dtype=torch.bool)).item() == 0.0


# -- the schedule -------------------------------------------------------------------------------

def test_the_schedule_alternates_boosting_and_rectification():
    order = ["audio", "image"]
    stages = [schedule(e, order, 2, 1, from_start=False) for e in range(9)]
    assert [s.active for s in stages] == ["audio"] * 3 + ["image"] * 3 + ["audio"] * 3
    assert [s.index for s in stages] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.rectify for s in stages] == [False, False, True] * 3
    assert [s.phase_start for s in stages] == [True, False, True] * 3
    assert [s.previous for s in stages[::3]] == ["image", "audio", "image"]
    # A learner joins when its first boosting phase ends; summed from the one after the active.
    assert [s.members for s in stages[::3]] == [("audio",), ("audio", "image"), ("image", "audio")]
    assert schedule(0, order, 2, 1, from_start=True).members == ("image", "audio")
    assert schedule(-1, order, 2, 1, from_start=False) == stages[0]  # before any training
    no_rectify = [schedule(e, order, 2, 0, from_start=False) for e in range(4)]
    assert [s.active for s in no_rectify] == ["audio", "audio", "image", "image"]
    assert not any(s.rectify for s in no_rectify)


def test_three_modalities_alternate_in_turn():
    order = ["text", "image", "audio"]  # the reference's MOSEI order
    stages = [schedule(e, order, 1, 1, from_start=False) for e in range(0, 10, 2)]
    assert [s.active for s in stages] == ["text", "image", "audio", "text", "image"]
    assert [s.previous for s in stages] == ["audio", "text", "image", "audio", "text"]
    assert [s.members for s in stages] == [("text",), ("text", "image"), ("text", "image", "audio"),
                                           ("image", "audio", "text"), ("audio", "text", "image")]


def test_modality_order_sets_the_alternation():
    method = _method(SPEC3, modality_order=["text", "audio", "image"], **FAST)
    method.epoch = 2
    assert method.stage.active == "audio" and method.stage.previous == "text"
    with pytest.raises(ValueError, match=r"modality_order=\['audio'\] must list each modality"):
        _method(SPEC, modality_order=["audio"])
    errors: list[str] = []
    Config(modality_order=["audio", "audio"]).validate("method.options", errors)
    assert errors == ["method.options.modality_order: ['audio', 'audio'] repeats a modality"]


# -- the steps ----------------------------------------------------------------------------------

def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_a_boosting_step_trains_only_the_active_learner_and_the_head():
    method = _method(**FAST)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for epoch in range(2):  # stage 0: audio boosts, then the ensemble rectifies
        method.train_step(make_batch(SPEC, seed=epoch), opt, _ctx(epoch))
    before = _params(method)
    logs = method.train_step(make_batch(SPEC, seed=5), opt, _ctx(2))  # stage 1: image boosts
    after = _params(method)
    for n, p in before.items():
        assert torch.equal(p, after[n]) != n.startswith(("encoders.image.", "head.")), n
    assert logs["grad/audio"] == 0 and logs["grad/image"] > 0


def test_the_boosting_gradient_is_the_hand_written_loss():
    batch = make_batch(SPEC, seed=3)
    for recon_grad in (True, False):
        method = _method(recon_grad=recon_grad, alpha=2.0, **FAST)
        method.boost_rate.data.fill_(0.7)
        rec = Recorder(method)
        method.train_step(batch, rec, _ctx(2))  # stage 1: image active, audio the ensemble
        ref = copy.deepcopy(method)
        with torch.no_grad():
            ens = 0.7 * ref.learner(batch, "audio")
        z = ref.learner(batch, "image")
        q = ens.softmax(1).gather(1, batch["label"].view(-1, 1)).squeeze(1)
        logp = z.log_softmax(1).gather(1, batch["label"].view(-1, 1)).squeeze(1)
        loss = (-(5.0 - q) * logp).mean()
        if recon_grad:
            loss = loss + 2.0 * F.mse_loss(z.softmax(1), ens.div(0.7).softmax(1))
        loss.backward()
        for n, p in ref.named_parameters():
            got = rec.seen[0][n]
            if p.grad is None:
                assert got is None, n
            else:
                torch.testing.assert_close(got, p.grad, msg=n)
        assert rec.seen[0]["boost_rate"] is None and rec.seen[0]["encoders.audio.proj.weight"] is None


def test_the_reconcilement_is_absent_at_stage_zero_and_logged_after():
    method = _method(**FAST)
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    first = method.train_step(make_batch(SPEC), opt, _ctx(0))
    later = method.train_step(make_batch(SPEC), opt, _ctx(2))
    assert "loss/recon" not in first and later["loss/recon"] > 0
    assert later["loss"].item() == pytest.approx(
        later["loss/boost"].item() + 0.5 * later["loss/recon"].item(), rel=1e-6)
    late = _method(recon_starts=3, **FAST)
    assert "loss/recon" not in late.train_step(make_batch(SPEC), opt, _ctx(4))


@pytest.mark.parametrize("from_start", [False, True])
def test_rectification_trains_the_members_the_head_and_the_boost_rate(from_start):
    method = _method(ensemble_from_start=from_start, **FAST)
    rec = Recorder(method)
    logs = method.train_step(make_batch(SPEC), rec, _ctx(1))  # stage 0 rectifies
    seen = rec.seen[0]
    assert seen["boost_rate"] is not None and seen["head.0.weight"] is not None
    assert seen["encoders.audio.proj.weight"] is not None
    assert (seen["encoders.image.proj.weight"] is not None) == from_start
    out = method(make_batch(SPEC))
    want = F.cross_entropy(out.logits, make_batch(SPEC)["label"])
    assert logs["loss/ensemble"].item() == pytest.approx(want.item(), rel=1e-6)


def test_separate_heads_train_with_their_learner():
    method = _method(shared_head=False, head_hidden=0, **FAST)
    rec = Recorder(method)
    method.train_step(make_batch(SPEC), rec, _ctx(2))
    assert rec.seen[0]["heads.image.weight"] is not None and rec.seen[0]["heads.audio.weight"] is None


def test_zero_grad_steps_keep_stepping_what_had_a_gradient():
    method = _method(preset="balancebench")  # one boosting and one rectification epoch a stage
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    method.train_step(make_batch(SPEC), opt, _ctx(0))  # audio and the head only
    assert method.stepped == {n for n, _ in method.named_parameters()
                              if n.startswith(("encoders.audio", "head"))}
    method.train_step(make_batch(SPEC), opt, _ctx(1))  # rectification: everything
    before = _params(method)
    logs = method.train_step(make_batch(SPEC), opt, _ctx(2))  # image boosts; audio by momentum
    assert logs["grad/audio"] == 0
    after = _params(method)
    assert not torch.equal(before["encoders.audio.proj.weight"], after["encoders.audio.proj.weight"])
    assert not torch.equal(before["boost_rate"], after["boost_rate"])


# -- the ensemble -------------------------------------------------------------------------------

def test_forward_is_the_boosted_sum_of_the_members():
    method = _method(**FAST).eval()
    method.boost_rate.data.fill_(0.5)
    batch = make_batch(SPEC)
    with torch.no_grad():
        f = {m: method.learner(batch, m) for m in SPEC.modalities}
        method.epoch = 0  # only audio has been boosted
        out = method(batch)
        torch.testing.assert_close(out.logits, 0.5 * f["audio"])
        assert set(out.per_modality) == {"audio", "image"}
        torch.testing.assert_close(out.per_modality["image"], f["image"])
        method.epoch = 2
        torch.testing.assert_close(method(batch).logits, 0.5 * (f["audio"] + f["image"]))
        batch["present"]["image"][:3] = False  # an absent modality's learner leaves the sum
        out = method(batch)
    torch.testing.assert_close(out.logits[:3], 0.5 * f["audio"][:3])
    torch.testing.assert_close(out.logits[3:], 0.5 * (f["audio"][3:] + f["image"][3:]))


def test_absent_samples_of_the_active_modality_do_not_count():
    method = _method(**FAST)
    batch = make_batch(SPEC, b=6, seed=2)
    batch["present"]["image"][:2] = False
    other = copy.deepcopy(batch)
    other["label"][:2] = (other["label"][:2] + 1) % 3  # what absent samples say does not matter
    opt = torch.optim.SGD(method.parameters(), lr=0.0)
    a = method.train_step(batch, opt, _ctx(2))  # image boosts
    b = method.train_step(other, opt, _ctx(2))
    assert a["loss/boost"].item() == pytest.approx(b["loss/boost"].item(), rel=1e-6)
    assert a["loss/recon"].item() == pytest.approx(b["loss/recon"].item(), rel=1e-6)
    # The reconcilement also needs the previous learner's modality (audio) present.
    batch["present"]["audio"][2:4] = False
    logs = method.train_step(batch, opt, _ctx(2))
    with torch.no_grad():
        per = reconcile_loss(method.learner(batch, "image"), method.learner(batch, "audio"))
    assert logs["loss/recon"].item() == pytest.approx(per[4:].mean().item(), rel=1e-6)


# -- epochs, optimizer and checkpoint -----------------------------------------------------------

def test_before_epoch_resets_the_optimizer_when_a_phase_starts():
    for reset in (True, False):
        method = _method(boost_epochs=2, correct_epochs=1, reset_optimizer=reset)
        opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
        kept = []
        for epoch in range(4):
            ctx = _ctx(epoch)
            method.on_epoch_start(epoch)
            logs = method.before_epoch(opt, ctx)
            kept.append(len(opt.state) > 0)
            method.train_step(make_batch(SPEC, seed=epoch), opt, ctx)
        # epochs 0 (boost), 1 (boost), 2 (rectify), 3 (next stage's boost)
        assert kept == ([False, True, False, False] if reset else [False, True, True, True])
        assert logs == {"recon/active": 1.0, "recon/stage": 1.0, "recon/rectify": 0.0}


@pytest.mark.parametrize("preset", ["reference", "balancebench"])
def test_a_checkpoint_resumes_exactly(preset):
    a = _method(preset=preset, **FAST)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):
        a.on_epoch_start(epoch)
        a.before_epoch(opt_a, _ctx(epoch))
        a.train_step(make_batch(SPEC, seed=epoch), opt_a, _ctx(epoch))
    b = _method(preset=preset, seed=1, **FAST)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert b.epoch == 2 and b.stepped == a.stepped
    batch = make_batch(SPEC, seed=9)
    a.eval(), b.eval()
    torch.testing.assert_close(b(batch).logits, a(batch).logits)
    for m, opt in ((a, opt_a), (b, opt_b)):
        m.train()
        m.on_epoch_start(3)
        m.before_epoch(opt, _ctx(3))
        m.train_step(batch, opt, _ctx(3))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if torch.is_tensor(p):
            assert torch.equal(p, q), n
        else:
            assert p == q, n


def test_a_kept_epochs_weights_fuse_with_that_epochs_ensemble():
    method = _method(**FAST)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    method.train_step(make_batch(SPEC), opt, _ctx(0))
    kept = copy.deepcopy(method.state_dict())  # as train.select=best_val keeps them
    method.train_step(make_batch(SPEC), opt, _ctx(2))
    copy_of_best = copy.deepcopy(method)
    copy_of_best.load_state_dict(kept)
    assert copy_of_best.stage.members == ("audio",) and method.stage.members == ("audio", "image")


# -- what it is defined for ---------------------------------------------------------------------

def test_unsupported_datasets_are_named_with_the_reason():
    assert "is multi-label" in ReconBoost.unsupported(ML_SPEC)
    assert "softmax probability of the one true class" in ReconBoost.unsupported(ML_SPEC)
    assert ReconBoost.unsupported(SPEC) == "" and ReconBoost.unsupported(SPEC3) == ""
    one = DatasetSpec("one", {"audio": ModalitySpec("audio", (1, 12, 8))}, num_classes=3)
    assert "needs 2 or 3 modalities" in ReconBoost.unsupported(one)
    with pytest.raises(ValueError, match="multi-label"):
        _method(ML_SPEC)


def test_a_shared_head_needs_one_feature_width(monkeypatch):
    import mmray.methods.base as base

    widths = iter([6, 5])
    real = base.build_encoder

    def uneven(spec, cfg, m=""):
        return real(spec, dataclasses.replace(cfg, feature_dim=next(widths)), m)

    monkeypatch.setattr(base, "build_encoder", uneven)
    with pytest.raises(ValueError, match=r"shared head needs one feature width.*shared_head=false"):
        _method()
    widths = iter([6, 5])
    assert _method(shared_head=False).heads["image"][0].in_features == 5


def test_the_reference_head_is_the_authors_mlp_and_balancebench_a_linear():
    assert [type(x).__name__ for x in _method(preset="reference").head] == ["Linear", "ReLU", "Linear"]
    assert _method(preset="reference").head[0].out_features == 256
    assert type(_method(preset="balancebench").head).__name__ == "Linear"
    assert _method(preset="balancebench").boost_rate.item() == pytest.approx(0.01)
