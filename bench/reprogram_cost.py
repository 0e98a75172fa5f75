"""Reprogramming into a frozen CLIP tower vs a separately trained encoder: what training costs.

    python bench/reprogram_cost.py [--clip small|ViT-B-16|...] [--batch 8] [--device auto]

Both variants of the `reprogram` method on ESC-50-shaped audio (a 128-bin fbank of 204 frames,
50 classes, the text anchor): `encoder: reprogram` (stem + attention reprogramming layer,
CLIP's image tower frozen) and `encoder: separate` (the same stem feeding a trainable copy of
the tower). Reported per variant: trainable and total parameters, forward FLOPs per sample of
the audio encoder (torch's counter, as the method logs them), and the median time of a whole
training step (forward, InfoNCE, backward, AdamW) over interleaved steps on random inputs.
Note that reprogramming still back-propagates through the frozen tower (to reach the stem), so
its step saves the weight gradients and optimizer state of the tower, not the backward pass.

--clip small (default, about a minute on 2 CPU cores): a 6-layer, 384-wide ViT/16 at 112 px
("mmray-bench-small", registered here); --clip ViT-B-16 (or any open_clip ViT) for a GPU.
Weights are random: costs do not depend on them. Writes reprogram_cost.json and .md to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import pick_device, write_results

SMALL_CLIP = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 112, "layers": 6, "width": 384, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2},
}



def build(clip: str, encoder: str, frames: int, mels: int, classes: int, device: torch.device):
    from mmray.data.spec import DatasetSpec, ModalitySpec
    from mmray.encoders import ModelConfig
    from mmray.methods import MethodConfig, build_method

    spec = DatasetSpec("esc50-shaped", {"audio": ModalitySpec("audio", (1, frames, mels))}, classes)
    torch.manual_seed(0)
    method = build_method(spec, ModelConfig(), MethodConfig(
        "reprogram", options={"clip_model": clip, "encoder": encoder, "dropout": 0.0}))
    return spec, method.to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="small", help="small, or an open_clip ViT name (ViT-B-16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=204)
    p.add_argument("--mels", type=int, default=128)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    from open_clip.factory import _MODEL_CONFIGS

    from mmray.cost import count_params
    from mmray.methods import StepContext

    _MODEL_CONFIGS.setdefault("mmray-bench-small", SMALL_CLIP)
    clip = "mmray-bench-small" if args.clip == "small" else args.clip
    device = pick_device(args.device)
    t0 = time.perf_counter()
    variants = {e: build(clip, e, args.frames, args.mels, args.classes, device)[1]
                for e in ("reprogram", "separate")}
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": {"audio": torch.randn(args.batch, 1, args.frames, args.mels, generator=g)},
             "present": {"audio": torch.ones(args.batch, dtype=torch.bool)},
             "label": torch.randint(0, args.classes, (args.batch,), generator=g),
             "id": [str(i) for i in range(args.batch)]}
    batch = {**batch, "inputs": {"audio": batch["inputs"]["audio"].to(device)},
             "present": {"audio": batch["present"]["audio"].to(device)},
             "label": batch["label"].to(device)}
    ctx = StepContext(device=device)
    opts = {e: torch.optim.AdamW(m.param_groups(0.2), lr=1e-4) for e, m in variants.items()}
    times: dict[str, list[float]] = {e: [] for e in variants}
    cuda = device.type == "cuda"
    for i in range(args.warmup + args.steps):  # interleaved: machine load hits both alike
        for e in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            variants[e].train()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            variants[e].train_step(batch, opts[e], ctx)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[e].append(time.perf_counter() - start)

    rows = {}
    for e, m in variants.items():
        rows[e] = {"trainable_params": count_params(m, trainable_only=True),
                   "total_params": count_params(m),
                   "flops_per_sample": m.cost["reprogram/flops_audio"],
                   "step_s_median": statistics.median(times[e]), "step_s_min": min(times[e])}
    r, s = rows["reprogram"], rows["separate"]
    result = {
        "clip": clip, "device": str(device), "batch": args.batch, "audio": [1, args.frames, args.mels],
        "torch_threads": torch.get_num_threads(), "variants": rows,
        "trainable_ratio": round(r["trainable_params"] / s["trainable_params"], 4),
        "flops_ratio": round(r["flops_per_sample"] / s["flops_per_sample"], 4),
        "step_time_ratio": round(statistics.median(a / b for a, b in
                                                   zip(times["reprogram"], times["separate"])), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    table = "".join(
        f"| {e} | {v['trainable_params'] / 1e6:.3f} | {v['total_params'] / 1e6:.2f} | "
        f"{v['flops_per_sample'] / 1e9:.3f} | {1000 * v['step_s_median']:.0f} | "
        f"{1000 * v['step_s_min']:.0f} |\n" for e, v in rows.items())
    md = (f"CLIP {clip}, audio (1, {args.frames}, {args.mels}), batch {args.batch}, {device}, "
          f"{result['torch_threads']} threads, {args.steps} interleaved steps\n\n"
          "| encoder | trainable params (M) | total params (M) | GFLOPs / sample (audio encoder) "
          "| train step median (ms) | min (ms) |\n|---|---|---|---|---|---|\n" + table +
          f"\nreprogram / separate: trainable parameters {result['trainable_ratio']:.3f}, "
          f"FLOPs {result['flops_ratio']:.3f}, step time {result['step_time_ratio']:.3f} "
          "(paired median)\n")
    write_results(args.out, "reprogram_cost", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
