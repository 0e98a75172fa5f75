"""G-Blending (METHODS.md §9): the weights from measured losses by hand, the held-out split, the
blended step, the copies' training and measuring, the super-epoch schedule, resume, missing
modalities and multi-label. The comparison with BalanceBenchmark's trainer is
tests/reference/test_ref_gblending.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmray.config import convert
from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method
from mmray.methods.gblending import (
    Config,
    GBlending,
    blend_weights,
    copy_optimizer,
    is_heldout,
    take_rows,
)

from helpers import ML_SPEC, SPEC, SPEC3, checked_method_config, make_batch

MODEL = ModelConfig(width=4, feature_dim=8)
FRACTION = 0.4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Many tiny steps: one torch thread (see tests/helpers.py: torch_threads)."""


def _method(spec=SPEC, seed=0, preset="", **options) -> GBlending:
    options = {"super_epoch": 1, "heldout_fraction": FRACTION, **options}
    cfg = checked_method_config("gblending", preset=preset, options=options)
    torch.manual_seed(seed)
    return build_method(spec, MODEL, cfg)


def _batches(spec=SPEC, n=2, b=8) -> list[dict]:
    out = []
    for i in range(n):
        batch = make_batch(spec, b=b, seed=20 + i)
        batch["id"] = [f"b{i}-{j}" for j in range(b)]
        out.append(batch)
    return out


def _ctx(batches, epoch=0) -> StepContext:
    return StepContext(device=torch.device("cpu"), epoch=epoch, train_batches=lambda: iter(batches))


def _sgd(method, lr=0.1):
    return torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


# -- the weights ------------------------------------------------------------------------------


def test_weights_from_the_losses_by_hand():
    # loss 1: L^T 1.0 → 0.5, L^V 1.2 → 1.0: G = 0.2, O = (1.0 − 0.5) − (1.2 − 1.0) = 0.3
    # loss 2: L^T 1.0 → 0.7, L^V 1.1 → 0.95: G = 0.15, O = 0.25 − 0.1 = 0.15
    # G/O²: 0.2/0.09 = 20/9 and 0.15/0.0225 = 60/9, so w = (0.25, 0.75)
    points = torch.tensor([[1.0, 1.0], [1.2, 1.1], [0.5, 0.7], [1.0, 0.95]])
    w, o, g = blend_weights(points)
    torch.testing.assert_close(g, torch.tensor([0.2, 0.15], dtype=torch.float64))
    torch.testing.assert_close(o, torch.tensor([0.3, 0.15], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert w.sum() == pytest.approx(1.0)


def test_a_held_out_loss_that_rose_gets_zero_or_its_magnitude():
    # loss 1 as above (20/9); loss 2: L^V rises 1.1 → 1.25: G = −0.15, O = (1.25 − 0.7) − 0.1 = 0.45
    points = torch.tensor([[1.0, 1.0], [1.2, 1.1], [0.5, 0.7], [1.0, 1.25]])
    w, _, g = blend_weights(points, "zero")
    assert g[1] == pytest.approx(-0.15)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0], dtype=torch.float64))
    w_abs, _, _ = blend_weights(points, "abs")
    raw = torch.tensor([0.2 / 0.09, 0.15 / 0.45**2], dtype=torch.float64)
    torch.testing.assert_close(w_abs, raw / raw.sum())


def test_no_gain_anywhere_gives_equal_weights_and_zero_overfitting_is_floored():
    rising = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [1.5, 1.5, 1.2]])
    w, _, _ = blend_weights(rising)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    # loss 1: L^T and L^V both fall by 0.1: O = 0, G = 0.1 → 0.1 / 1e-12; loss 2 as in the first test
    flat = torch.tensor([[1.0, 1.0], [1.2, 1.1], [0.9, 0.7], [1.1, 0.95]])
    w, o, _ = blend_weights(flat, min_o2=1e-12)
    assert o[0] == pytest.approx(0.0, abs=1e-12) and torch.isfinite(w).all()
    assert w[0] > 1 - 1e-9 and w.sum() == pytest.approx(1.0)
    inf = torch.tensor([[1.0, 1.0], [1.2, 1.1], [0.5, 0.7], [float("inf"), 0.95]])
    w, _, _ = blend_weights(inf, "abs")  # a diverged copy: its weight counts as 0
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0], dtype=torch.float64))


# -- the held-out part ------------------------------------------------------------------------


def test_the_held_out_split_is_a_stable_hash_of_the_id():
    ids = [f"s{i:05d}" for i in range(4000)]
    held = [is_heldout(i, 0.2) for i in ids]
    assert 0.18 < sum(held) / len(ids) < 0.22
    assert held == [is_heldout(i, 0.2) for i in ids]  # deterministic (not Python's salted hash)
    assert held != [is_heldout(i, 0.2, seed=1) for i in ids]  # the seed picks another part
    # nested: a sample held out at 0.2 is held out at 0.5
    assert all(is_heldout(i, 0.5) for i, h in zip(ids, held, strict=True) if h)


def test_a_batch_splits_into_disjoint_parts_whatever_its_order():
    method = _method()
    batch = _batches(n=1, b=16)[0]
    held = method.heldout_rows(batch)
    parts = [take_rows(batch, (held == h).nonzero().squeeze(1)) for h in (True, False)]
    assert set(parts[0]["id"]).isdisjoint(parts[1]["id"])
    assert sorted(parts[0]["id"] + parts[1]["id"]) == sorted(batch["id"])
    assert 0 < len(parts[0]["id"]) < 16
    for part in parts:  # every per-sample entry follows, nested ones too
        rows = [batch["id"].index(i) for i in part["id"]]
        assert torch.equal(part["label"], batch["label"][rows])
        assert torch.equal(part["inputs"]["audio"], batch["inputs"]["audio"][rows])
        assert torch.equal(part["present"]["image"], batch["present"]["image"][rows])
    reordered = take_rows(batch, torch.arange(15, -1, -1))
    assert method.heldout_rows(reordered).tolist() == held.flip(0).tolist()


# -- the step ---------------------------------------------------------------------------------


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_the_step_minimises_the_weighted_sum_of_the_losses():
    method = _method()
    method.blend_w.copy_(torch.tensor([0.2, 0.3, 0.5]))
    batch = _batches(n=1)[0]
    twin = copy.deepcopy(method)
    out = twin(batch)
    losses = [F.cross_entropy(out.per_modality["audio"], batch["label"]),
              F.cross_entropy(out.per_modality["image"], batch["label"]),
              F.cross_entropy(out.logits, batch["label"])]
    expected = sum(w * loss for w, loss in zip([0.2, 0.3, 0.5], losses, strict=True))
    expected.backward()
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    logs = method.train_step(batch, opt, _ctx([]))
    assert float(logs["loss"]) == pytest.approx(expected.item(), abs=1e-6)
    for k, want in zip(["audio", "image", "fused"], losses, strict=True):
        assert float(logs[f"loss/{k}"]) == pytest.approx(want.item(), abs=1e-6)
    for (n, p), q in zip(method.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - q.grad, msg=n)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_a_loss_with_weight_zero_moves_nothing_of_its_own(preset):
    """Separate heads (paper): the audio loss alone moves the audio encoder and head only, the
    fused loss alone leaves the unimodal heads. Fusion blocks (reference): the audio loss moves
    the fused head's audio block and its bias, not the image block."""
    method = _method(preset=preset)
    method.blend_w.copy_(torch.tensor([1.0, 0.0, 0.0]))
    before = _params(method)
    method.train_step(_batches(n=1)[0], torch.optim.SGD(method.parameters(), lr=0.1), _ctx([]))
    moved = {n for n, p in method.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("encoders.audio.") for n in moved)
    assert not any(n.startswith("encoders.image.") for n in moved)
    if preset == "paper":
        assert {n for n in moved if not n.startswith("encoders.")} == {
            "unimodal_heads.audio.weight", "unimodal_heads.audio.bias"}
    else:
        assert "head.fc.bias" in moved
        w = method.head.fc.weight.detach()
        assert not torch.equal(w[:, :8], before["head.fc.weight"][:, :8])
        assert torch.equal(w[:, 8:], before["head.fc.weight"][:, 8:])
    if preset == "paper":
        fused_only = _method(preset=preset)
        fused_only.blend_w.copy_(torch.tensor([0.0, 0.0, 1.0]))
        heads = _params(fused_only.unimodal_heads)
        fused_only.train_step(_batches(n=1)[0], torch.optim.SGD(fused_only.parameters(), lr=0.1),
                              _ctx([]))
        for n, p in fused_only.unimodal_heads.named_parameters():
            assert torch.equal(p.detach(), heads[n]), n


def test_fusion_blocks_are_the_fused_heads_per_modality_logits():
    method = _method(preset="reference")
    batch = _batches(n=1)[0]
    method.eval()
    out = method(batch)
    _, blocks = method.head(method.features(batch))
    for m in method.modalities:
        torch.testing.assert_close(out.per_modality[m], blocks[m], rtol=0, atol=0)
    assert not hasattr(method, "unimodal_heads")


def test_unimodal_losses_count_only_the_samples_where_their_modality_is_present():
    method = _method()
    batch = _batches(n=1)[0]
    absent = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    batch["present"]["audio"] = absent
    with torch.no_grad():
        out = copy.deepcopy(method)(batch)  # train mode, as the step's forward
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.0), _ctx([]))
    want_audio = F.cross_entropy(out.per_modality["audio"][absent], batch["label"][absent])
    assert float(logs["loss/audio"]) == pytest.approx(want_audio.item(), abs=1e-6)
    assert float(logs["loss/fused"]) == pytest.approx(
        float(F.cross_entropy(out.logits, batch["label"])), abs=1e-6)
    with torch.no_grad():
        per, weight = copy.deepcopy(method).sample_losses(batch, "audio")  # what a copy trains on
    assert torch.equal(weight, absent.float())
    torch.testing.assert_close(per[absent], F.cross_entropy(out.per_modality["audio"][absent],
                                                            batch["label"][absent], reduction="none"))


def test_the_reference_copy_trains_the_fused_output_on_zeroed_other_inputs():
    method = _method(SPEC3, preset="reference")
    method.eval()
    batch = _batches(SPEC3, n=1)[0]
    per, weight = method.sample_losses(batch, "image")
    zeroed = {**batch, "inputs": {m: x if m == "image" else torch.zeros_like(x)
                                  for m, x in batch["inputs"].items()}}
    logits, _ = method.head(method.features(zeroed))
    torch.testing.assert_close(per, F.cross_entropy(logits, batch["label"], reduction="none"))
    assert torch.equal(weight, torch.ones(8))


def test_multi_label_losses_are_bce_and_a_super_epoch_runs():
    assert GBlending.unsupported(ML_SPEC) == ""
    method = _method(ML_SPEC)
    batches = _batches(ML_SPEC)
    method.before_epoch(_sgd(method), _ctx(batches))
    assert torch.isfinite(method.blend_w).all() and method.blend_w.sum() == pytest.approx(1.0)
    batch = batches[0]
    with torch.no_grad():
        out = copy.deepcopy(method)(batch)
    logs = method.train_step(batch, torch.optim.SGD(method.parameters(), lr=0.0), _ctx([]))
    want = F.binary_cross_entropy_with_logits(out.per_modality["image"], batch["label"])
    assert float(logs["loss/image"]) == pytest.approx(float(want), abs=1e-6)


# -- the estimate -----------------------------------------------------------------------------


def _eval_losses(method, batches, name) -> tuple[float, float]:
    """Loss `name` of `method` by hand: eval mode, mean over the fit and the held-out samples."""
    method.eval()
    per = {True: [], False: []}
    with torch.no_grad():
        for b in batches:
            out = method(b)
            logits = out.logits if name == "fused" else out.per_modality[name]
            losses = F.cross_entropy(logits, b["label"], reduction="none")
            for i, sid in enumerate(b["id"]):
                per[is_heldout(sid, FRACTION)].append(float(losses[i]))
    method.train()
    return sum(per[False]) / len(per[False]), sum(per[True]) / len(per[True])


def test_an_estimate_measures_the_model_trains_copies_on_the_fit_part_and_leaves_the_model(monkeypatch):
    method = _method(super_epoch=2)
    batches = _batches(n=3)
    fit_ids = {i for b in batches for i in b["id"] if not is_heldout(i, FRACTION)}
    trained: list[tuple[str, list[str]]] = []
    sample_losses = GBlending.sample_losses

    def record(self, batch, name):
        if self.training:  # the copies' steps; passes that measure run in eval mode
            trained.append((name, list(batch["id"])))
        return sample_losses(self, batch, name)

    monkeypatch.setattr(GBlending, "sample_losses", record)
    before = {**_params(method), **{n: b.clone() for n, b in method.named_buffers()
                                    if not n.startswith(("blend_", "estimated_at"))}}
    by_hand = {k: _eval_losses(method, batches, k) for k in method.loss_names}
    opt = _sgd(method)
    assert method.before_epoch(opt, _ctx(batches)) == {}
    assert not opt.state  # the run's optimizer is untouched
    for n, v in {**dict(method.named_parameters()), **dict(method.named_buffers())}.items():
        if n in before:
            assert torch.equal(v.detach(), before[n]), n
    # each loss: a copy trained on it for 2 epochs of 3 batches, on train-part samples only
    assert [name for name, _ in trained] == [k for k in method.loss_names for _ in range(6)]
    assert all(set(ids) <= fit_ids and ids for _, ids in trained)
    for i, k in enumerate(method.loss_names):
        assert method.blend_points[:2, i].tolist() == pytest.approx(by_hand[k], abs=1e-6), k
    assert (method.blend_points[2:] > 0).all()
    w, o, g = blend_weights(method.blend_points)
    for buf, want in ((method.blend_w, w), (method.blend_o, o), (method.blend_g, g)):
        torch.testing.assert_close(buf, want)
    logged = method.epoch_metrics()
    assert logged["gblend/estimated_at"] == 0.0
    for i, k in enumerate(method.loss_names):
        assert logged[f"gblend/w_{k}"] == pytest.approx(float(w[i]))
        assert logged[f"gblend/o_{k}"] == pytest.approx(float(o[i]))
        assert logged[f"gblend/g_{k}"] == pytest.approx(float(g[i]))


def test_the_reference_measures_after_the_first_epoch_and_leaves_the_second_point_at_zero():
    method = _method(preset="reference", super_epoch=1)
    method.before_epoch(_sgd(method), _ctx(_batches()))
    assert (method.blend_points[:2] > 0).all() and (method.blend_points[2:] == 0).all()


def test_the_super_epoch_schedule(monkeypatch):
    method = _method(super_epoch=3)
    calls = []

    def estimate(self, optimizer, ctx):
        calls.append(ctx.epoch)
        return torch.tensor([[1.0, 1.0, 1.0], [1.2, 1.1, 1.3], [0.5, 0.7, 0.6],
                             [1.0, 0.95, 1.2 - 0.01 * ctx.epoch]])

    monkeypatch.setattr(GBlending, "estimate", estimate)
    seen = []
    for epoch in range(7):
        method.before_epoch(_sgd(method), _ctx([], epoch))
        seen.append((method.epoch_metrics()["gblend/estimated_at"], method.blend_w.clone()))
    assert calls == [0, 3, 6]
    assert [e for e, _ in seen] == [0, 0, 0, 3, 3, 3, 6]
    assert torch.equal(seen[1][1], seen[0][1]) and not torch.equal(seen[3][1], seen[0][1])


def test_a_batch_of_held_out_samples_only_takes_a_zero_step(monkeypatch):
    """A step all the same (with several workers, every one must take the same steps), with a
    zero gradient: plain SGD moves nothing on it."""
    method = _method(heldout_fraction=0.5)
    ids = [f"x{i}" for i in range(200)]
    held = [i for i in ids if is_heldout(i, 0.5)][:4]
    fit = [i for i in ids if not is_heldout(i, 0.5)][:4]
    all_held, mixed = _batches(n=2, b=4)
    all_held["id"], mixed["id"] = held, fit
    plain = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731 (no momentum: a zero step moves nothing)
    a, b = copy.deepcopy(method), copy.deepcopy(method)
    steps = []
    ending = GBlending.backward_and_step

    def counted(self, loss, *args, **kwargs):
        steps.append(loss.item())
        return ending(self, loss, *args, **kwargs)

    monkeypatch.setattr(GBlending, "backward_and_step", counted)
    method.train_copy_epoch(a, plain(a), "fused", _ctx([all_held, mixed]))
    assert len(steps) == 2 and steps[0] == 0.0
    method.train_copy_epoch(b, plain(b), "fused", _ctx([mixed]))
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)


def test_no_held_out_sample_is_an_error_naming_the_option():
    method = _method(heldout_fraction=1e-9)
    with pytest.raises(ValueError, match="raise method.options.heldout_fraction"):
        method.before_epoch(_sgd(method), _ctx(_batches()))


def test_the_copies_optimizer_has_the_runs_class_and_hyper_parameters():
    method = _method()
    opt = torch.optim.Adam(method.param_groups(0.01), lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(), sched.step()  # the run's lr is 0.05 now
    twin = copy.deepcopy(method)
    for lr, want in (("current", 0.05), ("initial", 0.1)):
        made = copy_optimizer(opt, method, twin, lr)
        assert type(made) is torch.optim.Adam and not made.state
        group = made.param_groups[0]
        assert group["lr"] == pytest.approx(want) and group["betas"] == (0.8, 0.9)
        assert group["weight_decay"] == 0.01
        assert [id(p) for p in group["params"]] == [id(p) for p in twin.parameters()]


# -- resume, options, support -----------------------------------------------------------------


def test_a_checkpoint_restores_the_weights_and_the_next_step_exactly():
    method = _method(preset="reference", super_epoch=2)
    batches = _batches()
    opt = _sgd(method)
    method.before_epoch(opt, _ctx(batches))
    assert not torch.allclose(method.blend_w, torch.full((3,), 1 / 3, dtype=torch.float64))
    state, opt_state = copy.deepcopy(method.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = _method(preset="reference", super_epoch=2, seed=5)
    fresh.load_state_dict(state)
    fresh_opt = _sgd(fresh)
    fresh_opt.load_state_dict(opt_state)
    assert fresh.epoch_metrics() == method.epoch_metrics()
    # epoch 1 is not an estimate epoch: both go on with the restored weights
    for m in (method, fresh):
        m.before_epoch(opt if m is method else fresh_opt, _ctx(batches, epoch=1))
    a = method.train_step(batches[1], opt, _ctx([], 1))
    b = fresh.train_step(batches[1], fresh_opt, _ctx([], 1))
    assert float(a["loss"]) == float(b["loss"])
    for (n, p), q in zip(method.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_config_checks():
    errors: list[str] = []
    convert(Config, {"train_loss": "running"}, "method.options", errors)
    convert(Config, {"heldout_fraction": 1.0}, "method.options", errors)
    convert(Config, {"heldout_fraction": 0.0}, "method.options", errors)
    text = "\n".join(errors)
    assert "method.options.train_loss: running needs first_point=after_first_epoch" in text
    assert "method.options.heldout_fraction: 1.0 leaves the copies no train sample" in text
    assert text.count("heldout_fraction") == 2
    reference = {**dataclasses.asdict(Config()), **GBlending.presets["reference"]}
    assert convert(Config, reference, "method.options", errors := []) and not errors


def test_support_follows_the_modality_count_not_the_label_kind():
    one = DatasetSpec("one", {"audio": ModalitySpec("audio", (1, 12, 8))}, num_classes=3)
    assert "needs 2 or 3 modalities" in GBlending.unsupported(one)
    for spec in (SPEC, SPEC3, ML_SPEC):
        assert GBlending.unsupported(spec) == ""
    fused = DatasetSpec("f", {"audio": SPEC.modalities["audio"],
                              "fused": ModalitySpec("image", (3, 8, 8))}, num_classes=3)
    with pytest.raises(ValueError, match="modality of that name"):
        _method(fused)
