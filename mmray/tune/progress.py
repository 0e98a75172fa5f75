"""A sweep's console: one line per trial event, printed on the driver by a Tune callback.

    12:03:04 name=normal,seed=0: started
    12:03:31 name=normal,seed=0: epoch 0  val/acc=0.7143
    12:03:52 name=normal,seed=0: done  test/acc=0.8095  val/acc=0.7619  (48 s; 1/4 trials ended)

It replaces Tune's status tables (`RunConfig(verbose=0)`) and Ray Train's log line per report,
which prints the whole metrics dict (quieted in `mmray.train.ray_train`); both stay in Ray's log
files (`<session>/logs/`, `ray-train-sys-*.log`) and every metric is in MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ray import tune


def _value(result: dict, metric: str) -> str:
    v = result.get(metric)
    if not isinstance(v, int | float) or not math.isfinite(v):
        return f"{metric}=–"
    return f"{metric}={v:.4f}"


def trial_name(trial) -> str:
    """The mmray trial name (grid cell, seed, sample) Tune's trial carries in its config."""
    return str(getattr(trial, "config", {}).get("trial") or trial)


def format_event(event: str, name: str, result: dict | None, metric: str, final_metric: str,
                 done: int, total: int, seconds: float | None = None) -> str:
    """One line without the clock. `event`: start, result, complete or error; `done` trials of
    `total` have ended (this one included)."""
    head = f"{name}:"
    result = result or {}
    if event == "start":
        return f"{head} started"
    if event == "result":
        if "mlflow_run_id" in result:  # a resumed sweep's trial that had finished before
            return f"{head} finished before, metrics from MLflow run {result['mlflow_run_id']}"
        epoch = result.get("epoch")
        where = f"epoch {int(epoch)}" if isinstance(epoch, int | float) else "result"
        return f"{head} {where}  {_value(result, metric)}"
    took = f"{seconds:.0f} s; " if seconds is not None else ""
    took = f"  ({took}{done}/{total} trials ended)"
    if event == "complete":
        shown = [_value(result, final_metric)] + ([_value(result, metric)]
                                                  if metric != final_metric else [])
        return f"{head} done  {'  '.join(shown)}{took}"
    return f"{head} FAILED{took}"


class SweepProgress(tune.Callback):
    """Prints `format_event` lines for every trial (on the Tune driver, where callbacks run).

    `metric` is printed per epoch (the search metric), `final_metric` at the end (the report's
    main test metric). Kept picklable: Tune stores callbacks with the sweep's state for
    `--resume`."""

    def __init__(self, metric: str, final_metric: str, total: int,
                 write: Callable[[str], None] | None = None):
        self.metric, self.final_metric, self.total = metric, final_metric, total
        self.write = write
        self.done = 0
        self.started: dict[str, float] = {}

    def _emit(self, event: str, trial, result: dict | None = None) -> None:
        start = self.started.get(trial.trial_id)
        ended = event in ("complete", "error") and start is not None
        seconds = time.monotonic() - start if ended else None
        line = format_event(event, trial_name(trial), result, self.metric, self.final_metric,
                            self.done, self.total, seconds)
        if event == "error" and getattr(trial, "error_file", None):
            line += f": {trial.error_file}"
        line = f"{time.strftime('%H:%M:%S')} {line}"
        if self.write is not None:
            self.write(line)
        else:
            print(line, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.started[trial.trial_id] = time.monotonic()
        self._emit("start", trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._emit("result", trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        self._emit("complete", trial, trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        self._emit("error", trial)
