"""Sweep wall time with 1 and with 2 concurrent trials.

    python bench/sweep.py [--trials 4] [--epochs 3] [--out bench/results]

The demo ablation (Normal, concat vs sum fusion, seeds) on the default synthetic data, run twice
as a fresh `pipelines/ablate.py` process each (embedded local Ray start, preprocessing cache hit,
Tune, one Ray Train run per trial, MLflow, report): once with resources.max_concurrent_trials=1,
once with 2. Prints both wall times and the speed-up. On 2 cores a trial's fixed start-up cost
(Ray Train worker group, dataset materialisation) overlaps with the other trial's training, which
is where the speed-up comes from.

Writes sweep.json and sweep.md into --out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(tmp: str, name: str, concurrent: int, seeds: list[int], epochs: int) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "RAY_ADDRESS": ""}
    cmd = [sys.executable, "pipelines/ablate.py", "--config", "configs/ablations/demo.yaml",
           "--report-dir", f"{tmp}/reports", f"name={name}", f"storage_path={tmp}/runs",
           f"data.root={tmp}/raw", f"data.data_dir={tmp}/shards", f"train.epochs={epochs}",
           f"grid={{method.fusion: [concat, sum], seed: {seeds}}}",
           f"resources.max_concurrent_trials={concurrent}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4, help="an even number: 2 fusions x seeds")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    seeds = list(range(max(1, args.trials // 2)))
    with tempfile.TemporaryDirectory(prefix="mmray-bench-") as tmp:
        # A first, untimed sweep writes the dataset and shards, so both timed runs hit the cache.
        run_sweep(tmp, "warm", 2, [0], 1)
        times = {c: run_sweep(tmp, f"c{c}", c, seeds, args.epochs) for c in (1, 2)}
    trials = 2 * len(seeds)
    result = {"trials": trials, "epochs": args.epochs, "cpus": os.cpu_count(),
              "wall_s": {str(c): round(s, 1) for c, s in times.items()},
              "speedup_2_over_1": round(times[1] / times[2], 3)}
    md = ("| sweep (demo ablation) | wall time |\n|---|---|\n"
          f"| {trials} trials × {args.epochs} epochs, 1 trial at a time | {times[1]:.1f} s |\n"
          f"| {trials} trials × {args.epochs} epochs, 2 trials at a time | {times[2]:.1f} s |\n"
          f"| speed-up | {times[1] / times[2]:.2f}× |\n")
    write_results(args.out, "sweep", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
