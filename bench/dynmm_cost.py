"""DynMM's compute saving against always-late-fusion, measured, with the accuracy it costs.

    python bench/dynmm_cost.py [--seeds 3] [--lambdas 0.3 1.0] [--device auto] [--out bench/results]

On the synthetic text-image data of `configs/ablations/dynmm.yaml` (text cheap and informative
for 60% of samples, image for 90%), trains per seed the always-late-fusion model (Normal, concat)
and DynMM (experts text-only and late fusion) at each λ, in this process from the same shards.
Then, on the test split, per model: FLOPs per sample counted by torch's FLOP counter over every
forward as the model ran (DynMM: its gate plus the experts it chose), wall time per sample (the
median of 5 passes over the split in batches, eval mode), and test accuracy. Reported: mean ±
std over seeds, and the savings 1 − x / x(late fusion) of FLOPs and of wall time. (The paper
reports a 46.5% FLOPs saving on CMU-MOSEI with negligible loss; this is other data.)

Writes dynmm_cost.json and dynmm_cost.md into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from common import write_results


def train_and_load(cfg, version_dir: str, ckpt: str, device: torch.device):
    from mmray.data.reader import load_manifest, spec_of
    from mmray.train.loop import build_state, load_checkpoint, run_local

    run_local(cfg, version_dir, ckpt)
    state = build_state(cfg, spec_of(load_manifest(version_dir)), device)
    load_checkpoint(state, ckpt)
    return state.method.eval()


def measure(method, test: dict, cfg, device: torch.device) -> dict[str, float]:
    from mmray.data.reader import iter_batches
    from mmray.train.loop import evaluate, make_context

    ctx = make_context(cfg.train, device)
    batches = list(iter_batches(test, method.spec, cfg.train.batch_size, device=device))
    metrics = evaluate(method, batches, ctx, "test", measure_cost=True)
    passes = []
    with torch.no_grad():
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for batch in batches:
                method.predict(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            passes.append(time.perf_counter() - t0)
    method.eval_counts()  # drop the timing passes' routing
    out = {"acc": metrics["test/acc"], "flops_per_sample": metrics["cost/flops_per_sample"],
           "us_per_sample": 1e6 * statistics.median(passes) / len(test["id"])}
    if "test/dynmm/route_late_fusion" in metrics:
        out["routed_to_late_fusion"] = metrics["test/dynmm/route_late_fusion"]
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    from mmray.data.ingest import read_split
    from mmray.methods import MethodConfig
    from mmray.pipeline_support import prepare_data
    from mmray.ray_utils import init_ray
    from mmray.train.loop import resolve_device
    from mmray.tune.grid import load_ablation

    with tempfile.TemporaryDirectory(prefix="mmray-bench-") as tmp:
        abl = load_ablation("configs/ablations/dynmm.yaml", [
            f"data.root={tmp}/raw", f"data.data_dir={tmp}/shards", f"train.epochs={args.epochs}",
            f"train.device={args.device}"])
        base = abl.experiment
        init_ray()  # preprocessing runs on Ray Data
        prepared = prepare_data(base.data)
        vdir = str(prepared.version_dir)
        device = resolve_device(base.train)
        test = read_split(vdir, "test")
        models = {"late fusion (normal)": MethodConfig("normal", "concat")}
        for lam in args.lambdas:
            models[f"dynmm λ={lam:g}"] = MethodConfig(
                "dynmm", "concat", {**base.method.options, "resource_weight": lam})
        runs: dict[str, list[dict]] = {name: [] for name in models}
        for seed in range(args.seeds):
            for name, method_cfg in models.items():
                cfg = dataclasses.replace(base, seed=seed, method=method_cfg)
                method = train_and_load(cfg, vdir, f"{tmp}/ckpt-{seed}-{len(runs[name])}-{name}",
                                        device)
                runs[name].append(measure(method, test, cfg, device))

    ref = runs["late fusion (normal)"]
    rows, result = [], {"device": str(device), "seeds": args.seeds, "test_samples": len(test["id"]),
                        "models": {}}
    for name, rs in runs.items():
        acc, acc_sd = _mean_std([r["acc"] for r in rs])
        flops = statistics.mean(r["flops_per_sample"] for r in rs)
        us = statistics.mean(r["us_per_sample"] for r in rs)
        # Savings per seed against that seed's late-fusion model, then averaged.
        f_save = _mean_std([1 - r["flops_per_sample"] / b["flops_per_sample"] for r, b in zip(rs, ref)])
        t_save = _mean_std([1 - r["us_per_sample"] / b["us_per_sample"] for r, b in zip(rs, ref)])
        d_acc = _mean_std([r["acc"] - b["acc"] for r, b in zip(rs, ref)])
        routed = [r["routed_to_late_fusion"] for r in rs if "routed_to_late_fusion" in r]
        result["models"][name] = {"runs": rs, "acc": [acc, acc_sd], "flops_per_sample": flops,
                                  "us_per_sample": us, "flops_saving": list(f_save),
                                  "time_saving": list(t_save), "acc_change": list(d_acc)}
        rows.append(f"| {name} | {acc:.3f} ± {acc_sd:.3f} | {d_acc[0]:+.3f} ± {d_acc[1]:.3f} | "
                    f"{flops / 1e6:.3f} | {100 * f_save[0]:.1f}% ± {100 * f_save[1]:.1f} | "
                    f"{us:.1f} | {100 * t_save[0]:.1f}% ± {100 * t_save[1]:.1f} | "
                    f"{statistics.mean(routed):.2f} |" if routed else
                    f"| {name} | {acc:.3f} ± {acc_sd:.3f} | – | {flops / 1e6:.3f} | – | {us:.1f} | – | – |")
    md = (f"DynMM vs always-late-fusion on synthetic text-image data, {args.seeds} seeds, "
          f"{len(test['id'])} test samples, device {device}\n\n"
          "| model | test acc | Δ acc vs late fusion | MFLOPs / sample | FLOPs saving | "
          "µs / sample | wall-time saving | routed to late fusion |\n|---|---|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n")
    write_results(args.out, "dynmm_cost", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
