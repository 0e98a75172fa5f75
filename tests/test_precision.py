"""Mixed precision (`train.precision`) and `train.compile`, on the CPU, in plain torch.

bf16 and fp16 autocast run on the CPU too, and so does torch's GradScaler, so the fp16 path
(scaled backward, unscale before any gradient edit, skipped steps on non-finite gradients) is
exercised here for real, on every method: what a CUDA run adds is speed, not another code path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
from torch import nn

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, StepContext, build_method
from mmray.methods import ogm_ge as ogm_module
from mmray.methods.base import Method
from mmray.train import loop
from mmray.train.experiment import TrainConfig, load_experiment

from helpers import SPEC, SPEC_IT, make_batch

CPU = torch.device("cpu")
MODEL = ModelConfig(width=4, feature_dim=8)
INF = float("inf")


def _spec(name: str) -> DatasetSpec:
    """The toy audio-image spec, or image-text for the methods that need it (MAP, REP)."""
    return SPEC if not METHODS[name].unsupported(SPEC) else SPEC_IT


def _build(name: str, seed: int = 0, **options) -> Method:
    torch.manual_seed(seed)
    return build_method(_spec(name), MODEL, MethodConfig(name, options=options))


def _scaled_context(scale: float, amp_dtype: torch.dtype | None = torch.float16) -> StepContext:
    return StepContext(device=CPU, amp_dtype=amp_dtype, scaler=torch.amp.GradScaler("cpu", init_scale=scale))


def _same(a, b) -> bool:
    """Equal state: tensors element for element, containers recursively."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@contextlib.contextmanager
def _inf_grads(params):
    """Every gradient computed for `params` comes out inf: an fp16 overflow, injected."""
    hooks = [p.register_hook(lambda g: torch.full_like(g, INF)) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# -- the config ------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "device", "dtype"), [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16),
    ("fp32", "cpu", None), ("fp32", "cuda", None),
    ("bf16", "cpu", torch.bfloat16), ("bf16", "cuda", torch.bfloat16),
    ("fp16", "cpu", torch.float16), ("fp16", "cuda", torch.float16),
])
def test_precision_gives_the_autocast_dtype_per_device(precision, device, dtype):
    cfg = load_experiment(None, [f"train.precision={precision}"]).train
    assert loop.resolve_precision(cfg, torch.device(device)) == dtype
    if device == "cpu":  # only fp16 has a loss scaler; the context carries it
        assert (loop.make_scaler(cfg, CPU) is not None) == (dtype == torch.float16)
        ctx = loop.make_context(cfg, CPU)
        assert ctx.amp_dtype == dtype and (ctx.scaler is not None) == (dtype == torch.float16)


def test_the_scale_is_checkpointed_with_the_run(tmp_path):
    cfg = load_experiment(None, ["train.precision=fp16", "model.width=2", "model.feature_dim=4"])
    state = loop.build_state(cfg, SPEC, CPU)
    assert isinstance(state.scaler, torch.amp.GradScaler)
    assert loop.make_context(cfg.train, CPU, scaler=state.scaler).scaler is state.scaler
    state.scaler.load_state_dict({**state.scaler.state_dict(), "scale": 512.0})
    loop.save_checkpoint(state, tmp_path)
    resumed = loop.build_state(cfg, SPEC, CPU)
    assert resumed.scaler.get_scale() == 65536.0  # torch's initial scale
    loop.load_checkpoint(resumed, tmp_path)
    assert resumed.scaler.get_scale() == 512.0
    fp32 = loop.build_state(dataclasses.replace(cfg, train=TrainConfig(precision="fp32")), SPEC, CPU)
    assert fp32.scaler is None and fp32.state_dict()["scaler"] is None


# -- every method under autocast -------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_under_autocast_on_cpu(name, precision):
    """Batches through the loop's step until two are taken: the forwards run in the autocast
    dtype (seen at the outputs of the Linear and Conv layers), the logged losses are finite and
    the parameters move. bf16 takes every step; under fp16 a step that overflows at the scale
    is skipped and not logged, and the scale is halved until it fits (from 2^10: torch's
    initial 2^16 costs REP on CLIP, slow in fp16 on a CPU, 4 skipped batches here)."""
    method = _build(name)
    ctx = loop.make_context(TrainConfig(precision=precision), CPU)
    if ctx.scaler is not None:
        ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    dtype = ctx.amp_dtype
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype) if torch.is_tensor(out) else None)
             for m in method.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in method.parameters()]
    logged = []
    for i in range(16):
        ctx.batch_idx = i
        out = loop.train_step(method, make_batch(_spec(name), seed=i), opt, ctx)
        if out is not None:
            logged.append(out)
        if len(logged) == 2:
            break
    for h in hooks:
        h.remove()
    assert dtype in seen, f"{name} ran no layer under {precision} autocast: {seen}"
    assert len(logged) == 2 and ctx.applied_steps >= 2
    assert all(torch.isfinite(torch.as_tensor(out["loss"])) for out in logged)
    assert any(not torch.equal(a, p) for a, p in zip(before, method.parameters(), strict=True))
    if precision == "bf16":
        assert ctx.skipped_steps == 0 and ctx.batch_idx == 1


# -- fp16: a skipped step leaves no trace ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_step_with_inf_gradients_is_skipped_and_leaves_every_state_unchanged(name):
    """After a normal step (Adam has moments, the method its running state), a batch whose
    gradients are all inf takes no step: parameters, buffers, the method's extra state (QMF's
    loss history, ReconBoost's stepped set, ...) and the optimizer's state are exactly as
    before; the scale is backed off, the batch is not logged, and the next batch trains."""
    method = _build(name)
    ctx = _scaled_context(2.0 ** 8)  # low enough that the toy steps do not overflow by themselves
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    assert loop.train_step(method, make_batch(_spec(name), seed=0), opt, ctx) is not None
    ctx.batch_idx = 1
    state, opt_state = copy.deepcopy(method.state_dict()), copy.deepcopy(opt.state_dict())
    applied, scale = ctx.applied_steps, ctx.scaler.get_scale()

    with _inf_grads(list(method.parameters())):
        out = loop.train_step(method, make_batch(_spec(name), seed=1), opt, ctx)

    assert out is None and ctx.applied_steps == applied and ctx.skipped_steps >= 1
    assert ctx.scaler.get_scale() < scale
    assert _same(method.state_dict(), state), "a skipped step changed the method's state"
    assert _same(opt.state_dict(), opt_state), "a skipped step changed the optimizer's state"
    ctx.batch_idx = 2
    assert loop.train_step(method, make_batch(_spec(name), seed=2), opt, ctx) is not None
    assert ctx.applied_steps > applied
    assert not _same(method.state_dict(), state)


@pytest.mark.parametrize("update_first", [False, True])
def test_mla_undoes_its_projector_update_for_one_skipped_modality_step(update_first, monkeypatch):
    """MLA steps once per modality: with the image step's gradients inf, the audio step is taken
    and kept (its projector update too), the image step is skipped and its update of P undone."""
    method = _build("mla", update_first=update_first)
    ctx = _scaled_context(2.0 ** 8)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    assert loop.train_step(method, make_batch(SPEC, seed=0), opt, ctx) is not None  # P moves off I
    at_entry: list[torch.Tensor] = []
    real = method.backward_and_step

    def recording(*args, **kwargs):
        at_entry.append(method.projector.clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(method, "backward_and_step", recording)
    audio = [p.detach().clone() for p in method.encoders["audio"].parameters()]
    image = [p.detach().clone() for p in method.encoders["image"].parameters()]
    applied, skipped = ctx.applied_steps, ctx.skipped_steps
    ctx.batch_idx = 1
    with _inf_grads(list(method.encoders["image"].parameters())):
        out = loop.train_step(method, make_batch(SPEC, seed=1), opt, ctx)

    assert method.order == ["audio", "image"]
    assert (ctx.applied_steps - applied, ctx.skipped_steps - skipped) == (1, 1) and out is None
    assert not torch.equal(at_entry[1], at_entry[0])  # the audio step updated P ...
    assert torch.equal(method.projector, at_entry[1])  # ... the skipped image step did not
    assert all(not torch.equal(a, p) for a, p in zip(audio, method.encoders["audio"].parameters(), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(image, method.encoders["image"].parameters(), strict=True))


# -- fp16: edits and norms see the unscaled gradient -----------------------------------------


def _two_steps(name: str, ctx: StepContext) -> tuple[Method, list[dict]]:
    method = _build(name)
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    logs = []
    for i in range(2):
        ctx.batch_idx = i
        torch.manual_seed(100 + i)  # the same draws (OGM-GE's noise, dropout) in both runs
        logs.append(loop.train_step(method, make_batch(_spec(name), seed=i), opt, ctx))
    return method, logs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_scaled_backward_steps_as_an_unscaled_one(name):
    """fp32 forwards, with and without the scaler at 2^12: a power of two scales and unscales
    exactly, so when the edits (OGM-GE's noise, AGM's clip test on the head's gradient norm,
    MMPareto's combination of task gradients, MLA's projection) and the logged gradient norms
    see the unscaled gradient, both runs take the same steps and log the same values."""
    plain, plain_logs = _two_steps(name, StepContext(device=CPU))
    ctx = _scaled_context(2.0 ** 12, amp_dtype=None)
    scaled, scaled_logs = _two_steps(name, ctx)
    assert ctx.skipped_steps == 0
    for (key, a), b in zip(plain.state_dict().items(), scaled.state_dict().values(), strict=True):
        if torch.is_tensor(a) and a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=key)
    for a, b in zip(plain_logs, scaled_logs, strict=True):
        for key in a:
            if key.startswith("grad/") or key == "loss":
                torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


def test_ogm_ge_modulates_the_unscaled_gradient(monkeypatch):
    """What OGM-GE's modulation (k·g + N(0, std(g)²)) reads is the true gradient: the same under
    the scaler at 2^20 (fp32 forwards) as without a scaler, not 2^20 times it."""
    seen: list[list[torch.Tensor]] = []
    real = ogm_module.modulate_

    def recording(params, *args, **kwargs):
        params = list(params)
        seen.append([p.grad.clone() for p in params if p.grad is not None])
        return real(params, *args, **kwargs)

    monkeypatch.setattr(ogm_module, "modulate_", recording)
    _two_steps("ogm_ge", StepContext(device=CPU))
    plain, seen[:] = list(seen), []
    ctx = _scaled_context(2.0 ** 20, amp_dtype=None)
    _two_steps("ogm_ge", ctx)
    assert ctx.skipped_steps == 0 and len(seen) == len(plain) == 4  # 2 steps x 2 modalities
    for a, b in zip(plain, seen, strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-8)


def test_task_gradients_are_unscaled():
    method = _build("mmpareto")
    batch = make_batch(SPEC)
    params = list(method.encoders["audio"].parameters())
    ctx = _scaled_context(2.0 ** 20, amp_dtype=None)
    _, loss = method.fused_loss(batch, ctx)
    plain = Method.task_grads({"mm": loss}, params)["mm"]
    scaled = Method.task_grads({"mm": loss}, params, ctx)["mm"]
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0.0)


# -- a run: skipped steps logged, the scale resumed ------------------------------------------

TINY = DatasetSpec("toy", {"audio": ModalitySpec("audio", (1, 6, 4)),
                           "image": ModalitySpec("image", (3, 4, 4))}, num_classes=3)


def _batches(split: str, epoch: int, miss):
    g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split] + 10 * epoch)
    return [{"inputs": {m: torch.randn(4, *s.shape, generator=g) for m, s in TINY.modalities.items()},
             "present": {m: torch.ones(4, dtype=torch.bool) for m in TINY.modalities},
             "label": torch.randint(0, 3, (4,), generator=g), "id": [f"{split}{i}" for i in range(4)]}
            for _ in range(3)]


def _fit(cfg, state, stop_after: int | None = None) -> list[dict]:
    class Stop(Exception):
        pass

    def report(epoch, metrics, st):
        if stop_after is not None and len(st.history) - start >= stop_after:
            raise Stop

    start = len(state.history)
    ctx = loop.make_context(cfg.train, CPU, scaler=state.scaler)
    with contextlib.suppress(Stop):
        loop.fit(cfg, state, _batches, report, ctx)
    return state.history


def test_an_fp16_run_logs_its_skipped_steps_and_resumes_with_its_scale(tmp_path):
    """A scaler that doubles its scale after every good step (growth interval 1) overflows
    fp16 within a few steps: the run skips those steps, logs them and the scale, and a run
    resumed from its epoch-1 checkpoint (which holds the scaler) ends exactly as one that
    never stopped."""
    cfg = load_experiment(None, ["train.precision=fp16", "train.epochs=3", "model.width=2",
                                 "model.feature_dim=4", "train.select=last"])

    def fresh():
        state = loop.build_state(cfg, TINY, CPU)
        state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
        return state

    full = _fit(cfg, fresh())
    assert all(h["train/amp_scale"] > 0 and h["train/amp_skipped_steps"] >= 0 for h in full)
    assert sum(h["train/amp_skipped_steps"] for h in full) > 0, "no step overflowed"
    part = fresh()
    _fit(cfg, part, stop_after=1)
    loop.save_checkpoint(part, tmp_path)
    resumed = loop.build_state(cfg, TINY, CPU)  # a default scaler, until the checkpoint loads
    loop.load_checkpoint(resumed, tmp_path)
    history = _fit(cfg, resumed)
    for key in ("train/loss", "train/amp_scale", "train/amp_skipped_steps", "val/loss", "test/loss"):
        assert history[-1][key] == full[-1][key], key


# -- torch.compile ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)  # inductor compiles C++ kernels, cache cold: 35 s on 2 cores, 65 s when busy
def test_compiled_encoders_train_keep_their_state_dict_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    over = ["train.epochs=2", "model.width=2", "model.feature_dim=4", "train.select=last"]
    cfg = load_experiment(None, [*over, "train.compile=true"])
    plain_state = loop.build_state(load_experiment(None, over), TINY, CPU)
    state = loop.build_state(cfg, TINY, CPU)
    assert type(state.method.encoders["audio"]) is type(plain_state.method.encoders["audio"])
    assert list(state.method.state_dict()) == list(plain_state.method.state_dict())

    full = _fit(cfg, state)
    plain = _fit(load_experiment(None, over), plain_state)
    assert full[-1]["train/loss"] == pytest.approx(plain[-1]["train/loss"], rel=1e-4)
    assert full[-1]["cost/flops_per_sample"] == plain[-1]["cost/flops_per_sample"]  # still counted
    part = loop.build_state(cfg, TINY, CPU)
    _fit(cfg, part, stop_after=1)
    loop.save_checkpoint(part, tmp_path)
    resumed = loop.build_state(cfg, TINY, CPU)
    loop.load_checkpoint(resumed, tmp_path)
    history = _fit(cfg, resumed)
    assert history[-1]["train/loss"] == pytest.approx(full[-1]["train/loss"], rel=1e-6)
    assert history[-1]["test/loss"] == pytest.approx(full[-1]["test/loss"], rel=1e-6)
    # The checkpoint of a compiled run loads into an uncompiled method, strictly.
    loop.build_state(load_experiment(None, over), TINY, CPU).method.load_state_dict(
        torch.load(tmp_path / loop.CHECKPOINT_FILE, weights_only=False)["method"])
