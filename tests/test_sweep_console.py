"""A sweep's console: the progress line per trial event, and Ray Train's per-report records kept
off a worker's console (no Ray runtime: fake trials and log records)."""

from __future__ import annotations

import logging
import os
import pickle
from types import SimpleNamespace

import ray.train

from mmray.train.ray_train import _TrainRecordsOffConsole, quiet_train_console
from mmray.tune.progress import SweepProgress, format_event


def test_format_event_lines():
    assert format_event("start", "name=qmf,seed=1", None, "val/acc", "test/acc", 0, 4) == (
        "name=qmf,seed=1: started")
    epoch = format_event("result", "seed=0", {"epoch": 2, "val/acc": 0.714285, "train/loss": 1.2,
                                              "test/acc": 0.5}, "val/acc", "test/acc", 0, 4)
    assert epoch == "seed=0: epoch 2  val/acc=0.7143"  # the main metric only, not the dict
    done = format_event("complete", "seed=0", {"val/acc": 0.7, "test/acc": 0.80952},
                        "val/acc", "test/acc", 3, 4, 47.6)
    assert done == "seed=0: done  test/acc=0.8095  val/acc=0.7000  (48 s; 3/4 trials ended)"
    assert format_event("complete", "seed=0", {}, "val/acc", "test/acc", 1, 1) == (
        "seed=0: done  test/acc=–  val/acc=–  (1/1 trials ended)")
    assert format_event("error", "seed=0", None, "val/acc", "test/acc", 4, 4, 3.0) == (
        "seed=0: FAILED  (3 s; 4/4 trials ended)")
    resumed = format_event("result", "seed=0", {"mlflow_run_id": "abc", "test/acc": 0.8},
                           "val/acc", "test/acc", 0, 4)
    assert resumed == "seed=0: finished before, metrics from MLflow run abc"


def test_callback_prints_one_line_per_trial_event():
    lines: list[str] = []
    progress = SweepProgress("val/acc", "test/acc", 2, write=lines.append)
    a = SimpleNamespace(trial_id="a1", config={"trial": "fusion=concat"}, last_result={})
    b = SimpleNamespace(trial_id="b2", config={"trial": "fusion=sum"}, error_file="/x/error.txt")
    progress.on_trial_start(0, [a, b], a)
    progress.on_trial_start(0, [a, b], b)
    for epoch in range(2):
        result = {"epoch": epoch, "val/acc": 0.5 + epoch / 10, "train/loss": 1.0}
        progress.on_trial_result(0, [a, b], a, result)
    a.last_result = {**result, "test/acc": 0.75}
    progress.on_trial_complete(0, [a, b], a)
    progress.on_trial_error(0, [a, b], b)
    texts = [line.split(" ", 1)[1] for line in lines]  # drop the clock
    assert texts == ["fusion=concat: started", "fusion=sum: started",
                     "fusion=concat: epoch 0  val/acc=0.5000",
                     "fusion=concat: epoch 1  val/acc=0.6000",
                     "fusion=concat: done  test/acc=0.7500  val/acc=0.6000  (0 s; 1/2 trials ended)",
                     "fusion=sum: FAILED  (0 s; 2/2 trials ended): /x/error.txt"]
    assert all(len(line.split(" ", 1)[0]) == len("12:03:04") for line in lines)
    # Tune pickles callbacks with the sweep's state for --resume
    assert pickle.loads(pickle.dumps(SweepProgress("val/acc", "test/acc", 2))).total == 2


def _record(pathname: str, level: int, name: str = "x") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "Reporting training result 1: ...", None,
                             None)


def test_train_records_below_the_level_stay_off_the_console():
    inside = os.path.join(os.path.dirname(ray.train.__file__), "v2", "_internal", "execution",
                          "context.py")
    f = _TrainRecordsOffConsole(logging.WARNING)
    assert not f.filter(_record(inside, logging.INFO, name=inside))  # the per-report record
    assert f.filter(_record(inside, logging.WARNING))
    assert f.filter(_record("/work/mmray/train/loop.py", logging.INFO))  # not Ray Train's


def test_quiet_train_console_filters_console_handlers_only(tmp_path):
    root = logging.getLogger()
    console, file = logging.StreamHandler(), logging.FileHandler(tmp_path / "train.log")
    root.addHandler(console)
    root.addHandler(file)
    try:
        quiet_train_console("WARNING")
        quiet_train_console("WARNING")  # a restarted worker group: still one filter
        assert sum(isinstance(f, _TrainRecordsOffConsole) for f in console.filters) == 1
        assert not file.filters  # Ray's log files keep every record
    finally:
        for h in root.handlers:  # pytest's own handlers got the filter too
            for f in [f for f in h.filters if isinstance(f, _TrainRecordsOffConsole)]:
                h.removeFilter(f)
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()
