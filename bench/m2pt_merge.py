"""M2PT's "no inference cost": latency and FLOPs of the merged model vs the plain target.

    python bench/m2pt_merge.py [--size small|vitb] [--batch 8] [--device auto] [--out bench/results]

Three models of one timm ViT architecture: the plain target, the pathway model (every block's
attn.qkv, attn.proj, mlp.fc1, mlp.fc2 re-parameterized with an auxiliary ViT, λ ≠ 0) and the
merged model (`mmray.methods.m2pt.merge` of the pathway). Latency is the median forward time
(eval, no grad, CUDA synchronised), timed one forward at a time in rotating order so that the
machine's load hits every model alike; the ratio merged / plain (median over rounds of the
within-round ratio) should be 1.00 ± 0.03: the merged model is the target architecture. FLOPs are counted by torch's FLOP counter (matrix products); the pathway also
computes W + λ·W_aux for every layer on every forward, 2 element-wise FLOPs per weight the
counter does not see, listed apart. The merged model's outputs are checked against the pathway's.

--size small (default, about a minute on 2 CPU cores): a 6-block, 384-wide ViT/16 at 112 px;
--size vitb: vit_base_patch16_224 (ViT-B/16 at 224 px, the paper's), for a GPU.
Writes m2pt_merge.json and m2pt_merge.md into --out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import pick_device, write_results

SIZES = {
    "small": ("vit_small_patch16_224", {"img_size": 112, "depth": 6, "num_classes": 100}),
    "vitb": ("vit_base_patch16_224", {"num_classes": 1000}),
}



def build(size: str, device: torch.device):
    import timm

    from mmray.methods.m2pt import cross_modal_layers, merge, reparameterize

    name, kwargs = SIZES[size]
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, **kwargs)
    pathway = timm.create_model(name, pretrained=False, **kwargs)
    pathway.load_state_dict(plain.state_dict())
    reparameterize(pathway, timm.create_model(name, pretrained=False, **kwargs))
    with torch.no_grad():
        for k, layer in enumerate(cross_modal_layers(pathway)):
            layer.scale.fill_(0.01 * (1 + k % 7))  # trained λ are small and non-zero
    merged = merge(pathway)
    aux_weights = sum(layer.aux_weight.numel() for layer in cross_modal_layers(pathway))
    models = {m: x.to(device).eval() for m, x in
              (("plain", plain), ("merged", merged), ("pathway", pathway))}
    return name, kwargs, models, aux_weights


@torch.no_grad()
def interleaved_latency(models: dict, x: torch.Tensor, iters: int, warmup: int) -> dict:
    """Seconds per forward of each model, timed one forward at a time in rotating order, so
    that the machine's load at any moment hits every model alike. Returns, per model, every
    timing after `warmup` rounds."""
    cuda = x.device.type == "cuda"
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + iters):
        for n in names[i % len(names):] + names[:i % len(names)]:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            models[n](x)
            if cuda:
                torch.cuda.synchronize()  # kernels are asynchronous: time them, not the launch
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=25, help="timed rounds (one forward per model)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    from mmray.cost import count_params, flops_per_sample

    device = pick_device(args.device)
    t0 = time.perf_counter()
    name, kwargs, models, aux_weights = build(args.size, device)
    size = models["plain"].patch_embed.img_size
    x = torch.randn(args.batch, 3, *size, device=device)
    with torch.no_grad():
        diff = float((models["merged"](x) - models["pathway"](x)).abs().max())
    times = interleaved_latency(models, x, args.iters, args.warmup)
    lat = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}  # least disturbed by other load
    flops = {n: flops_per_sample(m, x) for n, m in models.items()}
    params = {n: count_params(m) for n, m in models.items()}
    result = {
        "model": name, "kwargs": kwargs, "device": str(device), "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "latency_ms_median": {n: round(1000 * v, 3) for n, v in lat.items()},
        "latency_ms_min": {n: round(1000 * v, 3) for n, v in best.items()},
        # Median over rounds of the time ratio within a round (robust to drifting load).
        "ratio_merged_over_plain": round(paired_ratio(times, "merged", "plain"), 4),
        "ratio_pathway_over_plain": round(paired_ratio(times, "pathway", "plain"), 4),
        "ratio_merged_over_plain_min": round(best["merged"] / best["plain"], 4),
        "flops_per_sample": flops, "params": params,
        # W + λ·W_aux: a multiply and an add per auxiliary weight, once per forward.
        "pathway_elementwise_flops_per_forward": 2 * aux_weights,
        "merged_vs_pathway_max_abs_diff": diff,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    ratio = {"plain": 1.0, "merged": result["ratio_merged_over_plain"],
             "pathway": result["ratio_pathway_over_plain"]}
    rows = "".join(
        f"| {n} | {lat[n] * 1000:.2f} | {best[n] * 1000:.2f} | {ratio[n]:.3f} | "
        f"{flops[n] / 1e9:.3f} | {params[n] / 1e6:.2f} |\n" for n in ("plain", "merged", "pathway"))
    md = (f"{name} {kwargs}, batch {args.batch}, {device}, {result['torch_threads']} threads, "
          f"{args.iters} interleaved rounds\n\n"
          "| model | latency median (ms / batch) | min | vs plain (paired median) | "
          "GFLOPs / sample (counted) | params (M) |\n"
          "|---|---|---|---|---|---|\n" + rows +
          f"\nmerged / plain latency: {result['ratio_merged_over_plain']:.3f} (goal 1.00 ± 0.03); "
          f"the pathway also does {2 * aux_weights / 1e6:.1f} M element-wise FLOPs per forward "
          f"(W + λ·W_aux) the counter omits; max |merged − pathway| = {diff:.2e}\n")
    write_results(args.out, "m2pt_merge", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
