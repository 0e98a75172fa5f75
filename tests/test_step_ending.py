"""One way a train step ends (`Method.backward_and_step`): fresh gradients, the method's gradient
edits, the average across workers, the gradient norms, one optimizer step; and no method file
backpropagates or steps anywhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import mmray.methods
from mmray.encoders import ModelConfig
from mmray.methods import METHODS, MethodConfig, StepContext, build_method
from mmray.methods.base import Method

from helpers import SPEC, SPEC_IT, make_batch

METHODS_DIR = Path(mmray.methods.__file__).parent
ENDING = ("base.py", "Method.backward_and_step")
# Per-task gradients for a method to combine (MMPareto) are made here, never applied here.
TASK_GRADS = ("base.py", "Method.task_grads")
# Calls that make, average or apply gradients: only the ending may make them. `.step(` counts on
# an optimizer (or a grad scaler); a module's own `step` (REP's TowerBuffers.step) is no update.
GRADIENT_CALLS = {"backward", "zero_grad", "sync_grads", "grad"}
STEPPERS = ("optimizer", "opt", "scaler")
MODEL = ModelConfig(width=4, feature_dim=8)
CPU = torch.device("cpu")


def _gradient_calls(path: Path) -> list[tuple[str, str, int]]:
    """(enclosing Class.function, called name, line) of every gradient call in a source file."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                name = child.func.attr
                receiver = ast.unparse(child.func.value).rsplit(".", 1)[-1]
                if name in GRADIENT_CALLS or (name == "step" and receiver.endswith(STEPPERS)):
                    found.append((scope, name, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "")
    return found


def test_only_the_base_ending_backpropagates_averages_and_steps():
    outside, steps = [], []
    for path in sorted(METHODS_DIR.glob("*.py")):
        for scope, name, line in _gradient_calls(path):
            if (path.name, scope) == ENDING:
                steps += [name] if name == "step" else []
            elif (path.name, scope) == TASK_GRADS and name == "grad":
                continue
            else:
                outside.append(f"{path.name}:{line} {scope or '<module>'} calls .{name}(")
    assert not outside, ("gradients are made and applied only in Method.backward_and_step; "
                         "pass a gradient edit as its edit_grads hook instead: " + "; ".join(outside))
    assert steps == ["step"], "Method.backward_and_step must call optimizer.step() exactly once"


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that records, at each step, the gradients it applies and the step's place in
    the shared event log."""

    def __init__(self, params, events: list[str]):
        super().__init__(params, lr=0.1)
        self.events = events
        self.applied: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.events.append("step")
        self.applied.append({id(p): p.grad.clone() for g in self.param_groups
                             for p in g["params"] if p.grad is not None})
        return super().step(closure)


def _grads(method: Method) -> dict[int, torch.Tensor]:
    return {id(p): p.grad.clone() for p in method.parameters() if p.grad is not None}


def test_the_ending_averages_then_edits_then_measures_and_steps():
    torch.manual_seed(0)
    method = build_method(SPEC, MODEL, MethodConfig("normal"))
    batch = make_batch(SPEC)
    _, loss = method.fused_loss(batch, StepContext(device=CPU))
    loss.backward(retain_graph=True)
    fresh = _grads(method)  # what one clean backward gives
    for p in method.parameters():  # stale gradients the ending must not add to
        p.grad = torch.full_like(p, 7.0)

    events: list[str] = []
    seen: dict[str, dict[int, torch.Tensor]] = {}
    audio = {id(p) for p in method.encoders["audio"].parameters()}

    def edit() -> None:
        events.append("edit")
        seen["edit"] = _grads(method)
        for p in method.encoders["audio"].parameters():
            p.grad.mul_(3.0)

    def average(module) -> None:  # as if a second worker contributed zero gradients
        events.append("sync")
        seen["sync"] = _grads(module)  # fresh: the stale 7s are gone
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(2.0)

    opt = RecordingSGD(method.parameters(), events)
    before = {id(p): p.detach().clone() for p in method.parameters()}
    logs = method.backward_and_step(loss, opt, StepContext(device=CPU, sync_grads=average),
                                    {"extra": loss * 2, "count": 3}, edit_grads=edit)

    assert events == ["sync", "edit", "step"]
    assert seen["sync"].keys() == fresh.keys()
    for k, g in fresh.items():
        torch.testing.assert_close(seen["sync"][k], g)
        torch.testing.assert_close(seen["edit"][k], g / 2)  # the edit sees the average
        edited = g / 2 * 3.0 if k in audio else g / 2
        torch.testing.assert_close(opt.applied[0][k], edited)  # the step, the edited average
    for p in method.parameters():
        torch.testing.assert_close(p.detach(), before[id(p)] - 0.1 * opt.applied[0][id(p)])
    assert set(logs) == {"loss", "extra", "count", "grad/audio", "grad/image"}
    torch.testing.assert_close(logs["loss"], loss.detach())
    assert not logs["extra"].requires_grad and logs["count"] == 3
    for m in ("audio", "image"):  # norms of the gradient the step applied
        applied = [opt.applied[0][id(p)] for p in method.encoders[m].parameters()]
        want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in applied]))
        torch.testing.assert_close(logs[f"grad/{m}"], want)


def test_without_an_edit_the_step_applies_the_averaged_gradient():
    torch.manual_seed(0)
    method = build_method(SPEC, MODEL, MethodConfig("normal"))
    _, loss = method.fused_loss(make_batch(SPEC), StepContext(device=CPU))
    loss.backward(retain_graph=True)
    fresh = _grads(method)
    events: list[str] = []
    opt = RecordingSGD(method.parameters(), events)
    ctx = StepContext(device=CPU, sync_grads=lambda module: events.append("sync"))
    method.backward_and_step(loss, opt, ctx)
    assert events == ["sync", "step"]
    for k, g in fresh.items():
        torch.testing.assert_close(opt.applied[0][k], g)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_steps_only_through_the_ending(name, monkeypatch):
    spec = next((s for s in (SPEC, SPEC_IT) if not METHODS[name].unsupported(s)), None)
    if spec is None:
        pytest.skip(f"{name} supports neither test dataset")
    torch.manual_seed(0)
    method = build_method(spec, MODEL, MethodConfig(name))
    events: list[str] = []
    ending = Method.backward_and_step

    def counted(self, *args, **kwargs):
        events.append("ending")
        return ending(self, *args, **kwargs)

    monkeypatch.setattr(Method, "backward_and_step", counted)
    opt = RecordingSGD(method.param_groups(0.0), events)
    logs = method.train_step(make_batch(spec), opt, StepContext(device=CPU))
    # Every step is preceded by its own call of the ending (MLA: one per modality).
    assert events and events[::2] == ["ending"] * (len(events) // 2)
    assert events[1::2] == ["step"] * (len(events) // 2)
    assert torch.isfinite(logs["loss"])


def test_task_grads_are_each_losses_own_gradient_and_leave_grad_alone():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    unused = nn.Parameter(torch.tensor([3.0]))
    x = w * torch.tensor([3.0, 4.0])
    losses = {"a": x.sum(), "b": (x**2).sum()}
    grads = Method.task_grads(losses, [w, unused])
    assert torch.equal(grads["a"][0], torch.tensor([3.0, 4.0]))
    assert torch.equal(grads["b"][0], torch.tensor([2 * 3.0 * 3.0, 2 * 8.0 * 4.0]))
    assert torch.equal(grads["a"][1], torch.zeros(1)) and w.grad is None
    (losses["a"] + losses["b"]).backward()  # the graph is still there for the step
    assert torch.equal(w.grad, grads["a"][0] + grads["b"][0])
