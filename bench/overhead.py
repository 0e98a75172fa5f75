"""Pipeline overhead and preprocessing throughput.

    python bench/overhead.py [--samples 4000] [--epochs 10] [--out bench/results]

1. The same model, data and epochs trained (a) by a bare PyTorch loop over in-memory tensors and
   (b) as an mmray Ray Train run with one worker (start-up, Ray Data streaming, per-epoch
   evaluation, checkpoints and reports included). Prints the wall-time ratio (b)/(a) (goal: within
   1.10 on CPU), the steady-state ratio of training-epoch times, and the time the Ray run spends
   outside training epochs, split into evaluation and the rest (start-up, checkpoints). The
   bare loop evaluates the validation split every epoch too, and both use the same number of
   torch threads.
2. Ray Data preprocessing throughput (samples/s) of the synthetic dataset with 1 and with 2
   parallel featurizer workers (forced rewrite, so no cache hit).

Writes overhead.json and overhead.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from common import write_results


def bare_loop(cfg, version_dir: str) -> tuple[float, list[float], float]:
    """Plain torch: read the shards into memory, then the method's forward + CE + Adam step and
    a val pass per epoch; nothing else."""
    from mmray.data.ingest import read_split
    from mmray.data.reader import iter_batches, load_manifest, spec_of
    from mmray.methods import build_method

    t0 = time.perf_counter()  # reading the shards counts, as the Ray run's does
    spec = spec_of(load_manifest(version_dir))
    train, val = read_split(version_dir, "train"), read_split(version_dir, "val")
    torch.manual_seed(cfg.seed)
    model = build_method(spec, cfg.model, cfg.method)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    epochs, eval_s = [], 0.0
    for epoch in range(cfg.train.epochs):
        t_epoch = time.perf_counter()
        model.train()
        for batch in iter_batches(train, spec, cfg.train.batch_size, shuffle_seed=epoch):
            loss = torch.nn.functional.cross_entropy(model(batch).logits, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs.append(time.perf_counter() - t_epoch)
        t_eval = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for batch in iter_batches(val, spec, cfg.train.batch_size, shuffle_seed=None):
                model(batch)
        eval_s += time.perf_counter() - t_eval
    return time.perf_counter() - t0, epochs, eval_s


def ray_train_run(cfg, version_dir: str, storage: str) -> dict:
    """Seconds of the whole run, of building it (datasets read into the object store), and the
    per-epoch training and evaluation times the workers measured."""
    from mmray.train.ray_train import build_trainer, final_state

    t0 = time.perf_counter()
    trainer = build_trainer(cfg, version_dir, "bench", storage)
    built = time.perf_counter() - t0
    result = trainer.fit()
    history = final_state(result)["history"]
    return {"total": time.perf_counter() - t0, "build": built,
            "epochs": [h["time/train_epoch_s"] for h in history],
            "eval": sum(h["time/eval_s"] for h in history)}


def preprocess_throughput(cfg, parallelism: int) -> float:
    import dataclasses

    from mmray.data.preprocess import preprocess

    data = dataclasses.replace(cfg.data, parallelism=parallelism)
    t0 = time.perf_counter()
    prepared = preprocess(data, force=True)
    seconds = time.perf_counter() - t0
    return sum(prepared.manifest["rows"].values()) / seconds


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    from mmray.pipeline_support import prepare_data
    from mmray.ray_utils import init_ray
    from mmray.train.experiment import load_experiment

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="mmray-bench-") as tmp:
        cfg = load_experiment("configs/base.yaml", [
            f"data.root={tmp}/raw", f"data.data_dir={tmp}/shards",
            f"data.synthetic.num_samples={args.samples}", f"train.epochs={args.epochs}",
            # Same threads for both: a Ray worker gets OMP threads = its CPUs.
            f"train.cpus_per_worker={cpus}", "train.device=cpu"])
        init_ray(num_cpus=cpus)
        prepared = prepare_data(cfg.data)
        torch.set_num_threads(cpus)
        bare, bare_epochs, bare_eval = bare_loop(cfg, str(prepared.version_dir))
        ray = ray_train_run(cfg, str(prepared.version_dir), f"{tmp}/runs")
        thr = {n: preprocess_throughput(cfg, n) for n in (1, 2)}

    ray_s, ray_epochs, ray_eval = ray["total"], ray["epochs"], ray["eval"]
    fixed = ray_s - sum(ray_epochs)
    result = {
        "samples": args.samples, "epochs": args.epochs, "cpus": cpus,
        "bare_loop_s": round(bare, 2), "ray_train_s": round(ray_s, 2),
        "overhead_ratio": round(ray_s / bare, 3),
        # Steady state: median training-epoch time after the first, Ray worker / bare loop.
        "epoch_ratio": round(_median(ray_epochs[1:]) / _median(bare_epochs[1:]), 3),
        "ray_fixed_s": round(fixed, 2),
        # Of that: reading the splits into the object store (train.ingest=auto caches them) ...
        "ray_dataset_s": round(ray["build"], 2),
        # ... evaluation (val each epoch; test, FLOP count and latency after the last) ...
        "ray_eval_s": round(ray_eval, 2), "bare_eval_s": round(bare_eval, 2),
        # ... and the rest: starting and stopping the Train run and its worker, checkpoints.
        "ray_startup_checkpoints_s": round(fixed - ray["build"] - ray_eval, 2),
        "preprocess_samples_per_s": {str(k): round(v, 1) for k, v in thr.items()},
    }
    md = ("| measure | value |\n|---|---|\n"
          f"| bare PyTorch loop ({args.samples} samples × {args.epochs} epochs, reading included) | {bare:.1f} s |\n"
          f"| mmray Ray Train run, 1 worker | {ray_s:.1f} s |\n"
          f"| overhead ratio, whole run (goal ≤ 1.10) | {ray_s / bare:.3f} |\n"
          f"| training-epoch time ratio after epoch 0 | {result['epoch_ratio']:.3f} |\n"
          f"| Ray time outside training epochs | {fixed:.1f} s |\n"
          f"| of which reading the splits into Ray's object store | {ray['build']:.1f} s |\n"
          f"| of which evaluation (val every epoch; test + cost after the last) | {ray_eval:.1f} s "
          f"(bare loop's val passes: {bare_eval:.1f} s) |\n"
          f"| of which starting/stopping the Train run, checkpoints, reports | "
          f"{result['ray_startup_checkpoints_s']:.1f} s |\n"
          f"| preprocessing, 1 worker | {thr[1]:.1f} samples/s |\n"
          f"| preprocessing, 2 workers | {thr[2]:.1f} samples/s |\n")
    write_results(args.out, "overhead", result, md)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
