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

Also (the issue's multi-GPU point 6):
- a late-fusion pair, a ViT-B/16 image encoder (timm `vit_base_patch16_224`) plus open_clip
  ViT-B-16's text tower as the second modality, trained by the Normal method: bare vs mmray
  samples/s (goal: mmray >= 0.9x bare);
- model FLOPs utilisation (MFU) of every model: the FLOPs of one bare training step (forward and
  backward, counted by torch.utils.flop_counter on the same batch) x steps/s, over the GPU's
  dense bf16 peak from PEAK_BF16_TFLOPS (goal >= 35% for the ViT pair); --peak-tflops overrides
  the table for a GPU it does not name;
- trials sharing a GPU (`train.gpus_per_worker=0.25`): --share-trials processes (default 4), each
  training a ResNet-18 audio-visual model (OGM-GE's CREMA-D setup: 1x257x188 spectrograms,
  224 px frames) on the same GPU, all at once vs one after another. Ray's fractional GPUs are
  this situation: its fraction only schedules, the processes share the GPU as here. Reported:
  the summed samples/s of each way and their ratio.

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
# The trials that share a GPU: (image px, spectrogram shape, classes, timm encoder).
SHARE_SIZES = {
    "vitb": (224, (1, 257, 188), 6, "resnet18"),  # OGM-GE on CREMA-D
    "tiny": (32, (1, 32, 32), 4, "resnet18"),
}
# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from NVIDIA's datasheets: H100 SXM 989
# (H100 PCIe 756), H200 SXM 989 (the H100's compute), A100 312, L40S 362, L4 121, A10 125 (AWS's
# A10G is taken at the A10's figure). Matched in this order against
# torch.cuda.get_device_name(): the first name it contains wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0), ("A10", 125.0),
]


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the named GPU, or None when the table does not name it."""
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


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
    pair = build_method(spec_it, ModelConfig(encoder="timm", timm_name=vit, text_encoder="open_clip",
                                             open_clip_model=clip, feature_dim=512),
                        MethodConfig("normal"))
    return [
        ("vit-b/16 + clip text (normal)", pair),
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


def step_flops(method, batch, amp: bool) -> float:
    """FLOPs of one bare training step (forward and backward; the optimizer's few elementwise
    FLOPs are not model FLOPs), counted by torch.utils.flop_counter on `batch`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(batch["label"].device.type, dtype=torch.bfloat16, enabled=amp):
            logits = method(batch).logits
        F.cross_entropy(logits.float(), batch["label"]).backward()
    method.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def mmray_epoch(method, batch, opt, device: torch.device, steps: int):
    from mmray.train.experiment import TrainConfig
    from mmray.train.loop import RunState, make_context, train_epoch

    state = RunState(method, opt, None)
    ctx = make_context(TrainConfig(precision="bf16"), device)
    ctx.batches_per_epoch = steps
    return lambda: train_epoch(state, [batch] * steps, ctx)  # per-epoch work counted once


def share_model(size: str):
    """One small trial's model: ResNet-18 audio and image encoders, late fusion (Normal)."""
    from mmray.data.spec import DatasetSpec, ModalitySpec
    from mmray.encoders import ModelConfig
    from mmray.methods import MethodConfig, build_method

    px, audio, classes, timm_name = SHARE_SIZES[size]
    spec = DatasetSpec("audio-image", {"audio": ModalitySpec("audio", audio),
                                       "image": ModalitySpec("image", (3, px, px))}, classes)
    return build_method(spec, ModelConfig(encoder="timm", timm_name=timm_name, feature_dim=512),
                        MethodConfig("normal"))


def share_trial(size: str, device: str, batch_size: int, steps: int, barrier, results) -> None:
    """One trial's process: build, warm up, wait for the others at `barrier` (None: train alone),
    then time `steps` mmray training steps; puts (start, end, samples) on `results`."""
    torch.manual_seed(0)
    dev = torch.device(device)
    method = share_model(size).to(dev).train()
    batch = random_batch(method.spec, batch_size, dev)
    opt = torch.optim.AdamW(method.param_groups(0.01), lr=1e-4)
    epoch = mmray_epoch(method, batch, opt, dev, steps)
    epoch()  # warm-up
    _sync(dev)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    epoch()
    _sync(dev)
    results.put((t0, time.perf_counter(), batch_size * steps))


def shared_gpu(size: str, device: torch.device, n: int, batch_size: int, steps: int) -> dict:
    """Summed samples/s of `n` trial processes on one device, all at once vs one after another.
    Each is a process of its own, as Ray's trials are (spawned: CUDA does not survive a fork)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()

    def run(procs) -> list[tuple[float, float, int]]:
        for proc in procs:
            proc.start()
        out = [results.get(timeout=1800) for _ in procs]
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"a trial process exited with {proc.exitcode}")
        return out

    args = (size, str(device), batch_size, steps)
    barrier = ctx.Barrier(n)
    together = run([ctx.Process(target=share_trial, args=(*args, barrier, results)) for _ in range(n)])
    in_a_row = [r for _ in range(n)
                for r in run([ctx.Process(target=share_trial, args=(*args, None, results))])]
    # At once: all samples over the span from the first start to the last end (perf_counter is
    # the same monotonic clock in every process). In a row: all samples over the summed times.
    at_once = sum(r[2] for r in together) / (max(r[1] for r in together) - min(r[0] for r in together))
    sequential = sum(r[2] for r in in_a_row) / sum(r[1] - r[0] for r in in_a_row)
    return {"trials": n, "batch": batch_size, "steps": steps, "at_once_samples_per_s": at_once,
            "in_a_row_samples_per_s": sequential, "ratio": at_once / sequential}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="vitb")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch (one warm-up, one timed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the GPU's dense bf16 peak for MFU (default: from PEAK_BF16_TFLOPS)")
    p.add_argument("--share-trials", type=int, default=4,
                   help="trials sharing one GPU (gpus_per_worker = 1/N); 0 skips that part")
    p.add_argument("--share-batch", type=int, default=64)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and args.size == "vitb":
        print("No CUDA GPU here: this benchmark measures GPU training. Run it on a GPU machine, "
              "or check its code path with --size tiny --device cpu.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    name_of_device = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(name_of_device) if cuda else None)
    rows, result = [], {"device": name_of_device, "size": args.size, "batch": args.batch,
                        "peak_bf16_tflops": peak, "models": {}}
    for name, method in models(args.size):
        method.to(device).train()
        batch = random_batch(method.spec, args.batch, device)
        flops = step_flops(method, batch, cuda)
        figures = {}
        for how in ("bare", "mmray") if not isinstance(method, PlainViT) else ("bare",):
            opt = torch.optim.AdamW(method.param_groups(0.01), lr=1e-4)
            epoch = (bare_epoch(method, batch, opt, cuda, args.steps) if how == "bare"
                     else mmray_epoch(method, batch, opt, device, args.steps))
            seconds, peak_gib = timed(epoch, device)
            # MFU: the model's FLOPs (the bare step's) at this way's step rate, over the peak.
            mfu = flops * args.steps / seconds / (peak * 1e12) if peak else None
            figures[how] = {"samples_per_s": args.batch * args.steps / seconds, "peak_gib": peak_gib,
                            "mfu": mfu}
        result["models"][name] = {**figures, "flops_per_step": flops}
        bare, ours = figures["bare"], figures.get("mmray")
        mem = {h: (f"{f['peak_gib']:.2f}" if f["peak_gib"] is not None else "n/a") for h, f in figures.items()}
        mfu = {h: (f"{f['mfu']:.1%}" if f["mfu"] is not None else "n/a") for h, f in figures.items()}
        rows.append(f"| {name} | {bare['samples_per_s']:.1f} | "
                    + (f"{ours['samples_per_s']:.1f} | {ours['samples_per_s'] / bare['samples_per_s']:.3f}"
                       if ours else "– | –")
                    + f" | {mem['bare']} | {mem.get('mmray', '–')} | {flops / args.batch / 1e9:.3g}"
                    + f" | {mfu['bare']} | {mfu.get('mmray', '–')} |")
        method.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
    peak_note = f"{peak:g} TFLOPS dense bf16" if peak else "no bf16 peak known: MFU n/a"
    md = (f"Training steps, bf16 autocast, batch {args.batch}, device {result['device']} "
          f"({args.size}; {peak_note})\n\n| model | bare samples/s | mmray samples/s | mmray / bare | "
          "bare peak GiB | mmray peak GiB | GFLOPs/sample (fwd+bwd) | bare MFU | mmray MFU |\n"
          "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if args.share_trials:
        share = shared_gpu(args.size, device, args.share_trials, args.share_batch, args.steps)
        result["shared_gpu"] = share
        md += (f"\n{share['trials']} ResNet-18 audio-image trials (batch {share['batch']}) on one "
               f"device: {share['at_once_samples_per_s']:.1f} samples/s at once vs "
               f"{share['in_a_row_samples_per_s']:.1f} in a row ({share['ratio']:.2f}x)\n")
    write_results(args.out, "gpu_throughput", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
