"""Greedy beside ports of its reference training steps (tests/reference/greedy_port.py): the same
initial weights and batches give the same losses, modes, speed gap d, running averages,
evaluation logits and parameters after every step.

- `preset: reference` against the authors' code: SGD as in `configs/training_guided.gin` (lr 0.1,
  momentum 0) and with momentum 0.9 (a replaced gate's layer then moves by its momentum, with the
  zero gradient the authors' `zero_grad` leaves it), three epochs of six batches with a window of
  2. The threshold is picked so that the run covers the warm-up epoch (speeds summed, no
  re-balancing), windows caring for each branch, regular steps that trigger and that do not,
  and an epoch that ends inside a window (its evaluation uses the averaged gate).
- `preset: balancebench` against BalanceBenchmark's trainer: fused loss on the concat head, no
  warm-up, its threshold, evaluation with live gates that still feeds the average (plain SGD:
  it deletes the gradients mmray zeroes, which only plain SGD cannot tell apart).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

import greedy_port
from helpers import SPEC, checked_method_config, make_batch, torch_threads

MODEL = ModelConfig(width=4, feature_dim=6)
TOL = dict(rtol=1e-6, atol=1e-7)
EPOCHS, BATCHES, WINDOW = 3, 6, 3


def build(preset: str, seed: int = 0, **options):
    cfg = checked_method_config("greedy", preset=preset, options=options)
    torch.manual_seed(seed)
    return build_method(SPEC, MODEL, cfg).double()


def batches(n: int, seed: int) -> list[dict]:
    out = []
    for s in range(n):
        b = make_batch(SPEC, b=8, seed=seed + s)
        b["inputs"] = {m: x.double() for m, x in b["inputs"].items()}
        out.append(b)
    return out


def step_record(method, logs) -> tuple[bool, int]:
    """(curation, caring branch) of the step that produced `logs`."""
    a, v = method.modalities
    return bool(logs["greedy/curation"]), 1 if logs[f"greedy/rebalance_{v}"] else 0


# -- the authors' code ------------------------------------------------------------------------


def authors_model(method):
    a, v = method.modalities
    mmtm = greedy_port.MMTMMitigate(method.encoders[a].out_dim, method.encoders[v].out_dim,
                                    method.options.ratio).double()
    mmtm.fc_squeeze = copy.deepcopy(method.mmtm.squeeze)
    mmtm.fc_visual = copy.deepcopy(method.mmtm.excite[a])
    mmtm.fc_skeleton = copy.deepcopy(method.mmtm.excite[v])
    return greedy_port.MMTMMVCNN(
        greedy_port.Branch(copy.deepcopy(method.encoders[a]), copy.deepcopy(method.heads[a])),
        greedy_port.Branch(copy.deepcopy(method.encoders[v]), copy.deepcopy(method.heads[v])), mmtm)


def authors_pairs(method, model):
    a, v = method.modalities
    mine = [*method.encoders[a].parameters(), *method.heads[a].parameters(),
            *method.encoders[v].parameters(), *method.heads[v].parameters(),
            *method.mmtm.squeeze.parameters(), *method.mmtm.excite[a].parameters(),
            *method.mmtm.excite[v].parameters()]
    theirs = [*model.net_view_0.body.parameters(), *model.net_view_0.fc.parameters(),
              *model.net_view_1.body.parameters(), *model.net_view_1.fc.parameters(),
              *model.mmtm.fc_squeeze.parameters(), *model.mmtm.fc_visual.parameters(),
              *model.mmtm.fc_skeleton.parameters()]
    assert len(mine) == len(theirs) == len(list(method.parameters()))
    return list(zip(mine, theirs, strict=True))


def run_authors(momentum: float, threshold: float, seed: int, **options):
    """Trains mmray's Greedy (preset reference) and the authors' port side by side; yields each
    step's mmray logs and port (loss, mode) and, after each epoch, both evaluation logits."""
    method = build("reference", seed, window=WINDOW, threshold=threshold, **options)
    model = authors_model(method)
    state = greedy_port.ModelState()
    callback = greedy_port.BiasMitigationStrong(model, state, epsilon=threshold,
                                                curation_windowsize=WINDOW, starting_epoch=2)
    pairs = authors_pairs(method, model)
    opt_m = torch.optim.SGD(method.parameters(), lr=0.1, momentum=momentum)
    opt_p = torch.optim.SGD([p for _, p in pairs], lr=0.1, momentum=momentum)
    a, v = method.modalities
    val = batches(1, seed=99)[0]
    method.train()
    model.train()
    for epoch in range(EPOCHS):
        callback.on_epoch_begin(epoch + 1)  # the reference counts epochs from 1
        for i, b in enumerate(batches(BATCHES, seed=10 * epoch)):
            ctx = StepContext(device=torch.device("cpu"), epoch=epoch, batch_idx=i,
                              batches_per_epoch=BATCHES)
            logs = method.train_step(b, opt_m, ctx)
            port = greedy_port.authors_train_step(model, state, callback, b["inputs"][a],
                                                  b["inputs"][v], b["label"], opt_p)
            yield "step", method, model, callback, pairs, logs, port
        method.eval()
        with torch.no_grad():
            mine = method.predict(val).logits
        method.train()
        theirs = greedy_port.authors_eval(model, state, val["inputs"][a], val["inputs"][v])
        yield "eval", method, model, callback, pairs, mine, theirs


def assert_same_params(pairs, where):
    for k, (mine, theirs) in enumerate(pairs):
        torch.testing.assert_close(mine, theirs, **TOL, msg=lambda s, k=k: f"{where} param {k}: {s}")


# (momentum, seed, α): what each run covers after the warm-up epoch, all found by running it.
AUTHORS_CASES = {
    "gin-sgd": (0.0, 2, 0.1, {"care_0", "no_trigger", "eval_in_window"}),
    "momentum": (0.9, 2, 0.08, {"care_0", "care_1", "eval_in_window"}),
    "momentum-care-1": (0.9, 4, 0.1, {"care_1"}),
}


@pytest.mark.parametrize("case", sorted(AUTHORS_CASES))
def test_reference_preset_trains_as_the_authors_code(case):
    momentum, seed, threshold, expected = AUTHORS_CASES[case]
    modes, seen = [], set()
    with torch_threads(1):
        for kind, method, model, callback, pairs, mine, theirs in run_authors(momentum, threshold,
                                                                              seed):
            a, v = method.modalities
            if kind == "eval":
                torch.testing.assert_close(mine, theirs, **TOL)
                if method.curation:
                    seen.add("eval_in_window")
                continue
            loss, curation, caring = theirs
            assert mine["loss"].item() == pytest.approx(loss, rel=1e-9)
            assert step_record(method, mine) == (curation, caring if curation else 0)
            assert method.gap.item() == pytest.approx(float(callback.d_BDR), rel=1e-9, abs=1e-12)
            assert bool(method.curation) == model_mode(callback)[0]
            torch.testing.assert_close(method.mmtm.average(a), model.mmtm.running_avg_weight_visual)
            torch.testing.assert_close(method.mmtm.average(v),
                                       model.mmtm.running_avg_weight_skeleton)
            modes.append((curation, caring if curation else 0))
            assert_same_params(pairs, f"step {len(modes)}")
    assert not any(c for c, _ in modes[:BATCHES])  # the warm-up epoch never re-balances
    later = modes[BATCHES:]
    seen |= {f"care_{k}" for c, k in later if c}
    if any(not later[i][0] and not later[i + 1][0] for i in range(len(later) - 1)):
        seen.add("no_trigger")  # a regular step followed by a regular step
    assert expected <= seen, (case, modes)


def model_mode(callback):
    s = callback.model_pytoune
    return s.curation_mode, s.caring_modality


# -- BalanceBenchmark -------------------------------------------------------------------------


def run_balancebench(threshold: float):
    method = build("balancebench", threshold=threshold, window=WINDOW)
    a, v = method.modalities
    dims = [method.encoders[a].out_dim, method.encoders[v].out_dim]
    mmtm = greedy_port.BBMMTM(dims, method.options.ratio, [a, v]).double()
    mmtm.fc_squeeze = copy.deepcopy(method.mmtm.squeeze)
    mmtm.fc_excites = copy.deepcopy(method.mmtm.excite)
    model = greedy_port.BBGreedyModel({m: copy.deepcopy(method.encoders[m]) for m in (a, v)},
                                      mmtm, copy.deepcopy(method.head.fc))
    trainer = greedy_port.BBGreedyTrainer(alpha=threshold, window_size=WINDOW)
    mine = [*method.encoders[a].parameters(), *method.encoders[v].parameters(),
            *method.mmtm.squeeze.parameters(), *method.mmtm.excite.parameters(),
            *method.head.parameters()]
    theirs = [*model.modality_encoder[a].parameters(), *model.modality_encoder[v].parameters(),
              *mmtm.fc_squeeze.parameters(), *mmtm.fc_excites.parameters(),
              *model.fusion_module.fc_out.parameters()]
    pairs = list(zip(mine, theirs, strict=True))
    opt_m = torch.optim.SGD(method.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(theirs, lr=0.1)
    val = batches(1, seed=99)[0]
    for epoch in range(2):
        for i, b in enumerate(batches(BATCHES, seed=10 * epoch)):
            ctx = StepContext(device=torch.device("cpu"), epoch=epoch, batch_idx=i)
            logs = method.train_step(b, opt_m, ctx)
            port = trainer.step(model, b["inputs"], b["label"], opt_p)
            yield "step", method, mmtm, trainer, pairs, logs, port
        method.eval()
        with torch.no_grad():
            out = method.predict(val).logits
        method.train()
        yield "eval", method, mmtm, trainer, pairs, out, greedy_port.bb_eval(model, val["inputs"])


def test_balancebench_preset_trains_as_its_trainer():
    modes = []
    with torch_threads(1):
        for kind, method, mmtm, trainer, pairs, mine, theirs in run_balancebench(0.05):
            if kind == "eval":
                torch.testing.assert_close(mine, theirs, **TOL)
                continue
            loss, curation, caring = theirs
            assert mine["loss"].item() == pytest.approx(loss, rel=1e-9)
            assert step_record(method, mine) == (curation, caring if curation else 0)
            assert method.gap.item() == pytest.approx(float(trainer.speed), rel=1e-9, abs=1e-12)
            for m in method.modalities:
                torch.testing.assert_close(method.mmtm.average(m), mmtm.running_avg_weight[m])
            modes.append((curation, caring if curation else 0))
            assert_same_params(pairs, f"step {len(modes)}")
    assert modes[1][0], "no warm-up: the first step can trigger"
    assert any(c for c, _ in modes) and not all(c for c, _ in modes)


@pytest.mark.parametrize("quirk", ["average_in_eval", "eval_follows_curation", "shared_average"])
def test_each_reference_quirk_changes_the_run(quirk):
    """The comparison above is not vacuous: dropping any one quirk of the reference preset moves
    the evaluation logits, the averages or the weights past the tolerance in the `momentum` run."""
    momentum, seed, threshold, _ = AUTHORS_CASES["momentum"]
    moved = False
    with torch_threads(1):
        for kind, method, model, _, pairs, mine, theirs in run_authors(momentum, threshold, seed,
                                                                       **{quirk: False}):
            a, v = method.modalities
            try:
                if kind == "eval":
                    torch.testing.assert_close(mine, theirs, **TOL)
                    continue
                torch.testing.assert_close(method.mmtm.average(v),
                                           model.mmtm.running_avg_weight_skeleton)
                assert_same_params(pairs, "")
            except AssertionError:
                moved = True
                break
    assert moved, quirk
