"""Training throughput and peak GPU memory of ViT-B/16 M2PT and CLIP ViT-B/16 REP, bf16 autocast,
against a bare PyTorch loop of the same model on the same GPU.

    python bench/gpu_throughput.py [--size vitb|tiny] [--batch 64] [--steps 20] [--out bench/results]

For each model, two ways of taking the same training steps on random batches already on the
device (the data pipeline is not part of this measure), timed over one epoch of --steps steps after a
warm-up epoch, so per-epoch work (metrics, M2PT's merge check) is counted once per epoch as in
training:
- bare: forward under bf16 autocast, cross-entropy on the fused logits, backward, AdamW step;
- mmray: `mmray.train.loop.train_epoch`, the code every Ray Train worker runs (the method's own
  `train_step`: REP's and M2PT's losses, gradient norms, logging, the scheduler).
Models: M2PT with a ViT-B/16 target (`vit_base_patch16_224`) and a ViT-B/16 auxiliary, every
block's four linears re-parameterized; the plain ViT-B/16 alone (bare loop only: what M2PT's
pathway adds in training); REP on open_clip ViT-B-16 with both towers frozen. Weights are random: speed and
memory do not depend on them. Reported: samples/s over the timed epoch and peak memory
allocated (torch.cuda.max_memory_allocated). Needs a CUDA GPU for the figures it exists for;
`--size tiny --device cpu` runs the same code on tiny models to check it (no memory figure).

Writes gpu_throughput.json and gpu_throughput.md into --out.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from common import pick_device, write_results

SIZES = {  # (image px, text tokens, classes, M2PT timm name, CLIP name)
    "vitb": (224, 77, 101, "vit_base_patch16_224", "ViT-B-16"),
    "tiny": (32, 32, 4, "mmray_vit_tiny", "mmray-tiny"),
}


def models(size: str):
    """(name, method) pairs: M2PT, the plain ViT it re-parameterizes, and REP."""
    from mmray.data.spec import DatasetSpec, ModalitySpec
    from mmray.encoders import ModelConfig
    from mmray.methods import MethodConfig, build_method

    px, tokens, classes, vit, clip = SIZES[size]
    image = {"image": ModalitySpec("image", (3, px, px))}
    spec_i = DatasetSpec("image", image, classes)
    spec_it = DatasetSpec("image-text", {**image, "text": ModalitySpec("text", (tokens,), vocab_size=49408)},
                          classes)
    m2pt = build_method(spec_i, ModelConfig(), MethodConfig("m2pt", options={
        "timm_name": vit, "aux_random": True}))
    return [
        ("m2pt", m2pt),
        ("plain vit (the target alone)", PlainViT(m2pt.merged_model(), spec_i)),
        ("rep", build_method(spec_it, ModelConfig(open_clip_model=clip), MethodConfig("rep"))),
    ]


class PlainViT(torch.nn.Module):
    """The target timm ViT without the pathway (M2PT merged at λ = 0): bare loop only."""

    def __init__(self, vit: torch.nn.Module, spec):
        super().__init__()
        self.vit, self.spec = vit, spec

    def forward(self, batch: dict):
        return SimpleNamespace(logits=self.vit(batch["inputs"]["image"]))

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


def random_batch(spec, b: int, device: torch.device) -> dict:
    inputs = {m: (torch.randint(1, 49407, (b, *s.shape), device=device) if s.kind == "text"
                  else torch.randn(b, *s.shape, device=device)) for m, s in spec.modalities.items()}
    return {"inputs": inputs, "present": {m: torch.ones(b, dtype=torch.bool, device=device) for m in inputs},
            "label": torch.randint(0, spec.num_classes, (b,), device=device),
            "id": [str(i) for i in range(b)]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(epoch, device: torch.device) -> tuple[float, float | None]:
    """(seconds of one timed epoch after a warm-up epoch, peak memory in GiB or None on CPU)."""
    epoch()  # warm-up: kernels chosen, allocator and optimizer state in place
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    epoch()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def bare_epoch(method, batch, opt, amp: bool, steps: int):
    def epoch():
        for _ in range(steps):
            with torch.autocast(batch["label"].device.type, dtype=torch.bfloat16, enabled=amp):
                logits = method(batch).logits
            loss = F.cross_entropy(logits.float(), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epoch


def mmray_epoch(method, batch, opt, device: torch.device, steps: int):
    from mmray.train.experiment import TrainConfig
    from mmray.train.loop import RunState, make_context, train_epoch

    state = RunState(method, opt, None)
    ctx = make_context(TrainConfig(mixed_precision=True), device)
    ctx.batches_per_epoch = steps
    return lambda: train_epoch(state, [batch] * steps, ctx)  # per-epoch work counted once


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="vitb")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch (one warm-up, one timed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and args.size == "vitb":
        print("No CUDA GPU here: this benchmark measures GPU training. Run it on a GPU machine, "
              "or check its code path with --size tiny --device cpu.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    rows, result = [], {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                        "size": args.size, "batch": args.batch, "models": {}}
    for name, method in models(args.size):
        method.to(device).train()
        batch = random_batch(method.spec, args.batch, device)
        figures = {}
        for how in ("bare", "mmray") if not isinstance(method, PlainViT) else ("bare",):
            opt = torch.optim.AdamW(method.param_groups(0.01), lr=1e-4)
            epoch = (bare_epoch(method, batch, opt, cuda, args.steps) if how == "bare"
                     else mmray_epoch(method, batch, opt, device, args.steps))
            seconds, peak = timed(epoch, device)
            figures[how] = {"samples_per_s": args.batch * args.steps / seconds, "peak_gib": peak}
        result["models"][name] = figures
        bare, ours = figures["bare"], figures.get("mmray")
        mem = {h: (f"{f['peak_gib']:.2f}" if f["peak_gib"] is not None else "n/a") for h, f in figures.items()}
        rows.append(f"| {name} | {bare['samples_per_s']:.1f} | "
                    + (f"{ours['samples_per_s']:.1f} | {ours['samples_per_s'] / bare['samples_per_s']:.3f}"
                       if ours else "– | –")
                    + f" | {mem['bare']} | {mem.get('mmray', '–')} |")
        method.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
    md = (f"Training steps, bf16 autocast, batch {args.batch}, device {result['device']} "
          f"({args.size})\n\n| model | bare samples/s | mmray samples/s | mmray / bare | "
          "bare peak GiB | mmray peak GiB |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_results(args.out, "gpu_throughput", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
