"""N workers × batch B take the steps of 1 worker × batch N·B, for every registered method.

Two real gloo processes on 127.0.0.1 (torch.multiprocessing, no Ray: the same collectives a Ray
Train worker group uses, started in seconds) each train every method for one `before_epoch` and
three steps on their rows of three global batches of 8, through `mmray.train.collective.distribute`
(bucketed gradient all-reduce during backward, BatchNorm and method statistics over the global
batch), and alone on the whole global batches. Tolerance: float32 on both sides, every parameter
and float buffer within |got − want| ≤ 1e-6 + 1e-4·|want| (the sums over the batch are split
differently, nothing else). Methods with random draws draw alike: both runs seed torch the same
way, as the loop does per (seed, epoch) on every worker; dropout is off for REP and
reprogramming (`dist_procs.OPTIONS`): a worker draws a mask for its own rows, so W workers'
masks are not slices of the one mask a single process draws (the same distribution, other draws).
"""

from __future__ import annotations

import json
import socket

import dist_procs
import pytest
import torch.multiprocessing as mp

from mmray.methods import METHODS

WORLD, BATCH = 2, 4
pytestmark = pytest.mark.slow  # two processes train every method: ~30 s

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("global_batch")
    mp.spawn(dist_procs.worker, args=(WORLD, _free_port(), str(out), sorted(METHODS), BATCH),
             nprocs=WORLD, join=True)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_workers_step_as_one_worker_on_the_global_batch(name, results):
    for rank in range(WORLD):
        got = results[rank][name]
        assert got["status"] != "error", got.get("error")
        if got["status"] == "unsupported":
            pytest.skip(f"{name} supports neither test dataset")
        assert got["keys_equal"], "distributing must keep the state-dict keys (checkpoints)"
        assert got["moved"] > 1e-3, "the steps must change the parameters"
        assert got["err"] <= 1.0, (f"rank {rank}: {got['worst']} differs by {got['abs']:.3g} "
                                   f"({got['err']:.3g}× the tolerance)")
