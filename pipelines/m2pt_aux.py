"""Train an auxiliary ViT for M2PT on one modality of a dataset and save its timm state dict.

    python pipelines/m2pt_aux.py --config configs/base.yaml --modality audio \
        --out data/aux/m2pt_aux_audio.pt data.synthetic.seed=1 data.root=data/raw/synthetic_aux

The ViT has the shape M2PT's target will have (method.options.timm_name and model_kwargs when
the config's method is m2pt, else M2PT's defaults), built for the modality's tensor (a
spectrogram is a 1-channel image) with a head for the dataset's classes, and is trained with CE
on the train split (train.epochs, train.batch_size, train.lr, train.weight_decay, AdamW). Only
its blocks are used by M2PT, so the auxiliary "was trained on another modality" for real.
With data.synthetic.seed differing from the target's dataset (and its own data.root) its data is
also irrelevant to the target's samples, as in the paper; on the same dataset it would have
seen the audio paired with the target's images.

Writes the state dict to --out (atomically) and `<out>.json` with the M2PT options that load it
(aux_weights, aux_kwargs, aux_modality) and its validation accuracy, and prints those options.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mmray.pipeline_support import ConfigError, config_parser, fail, prepare_data, smoke_overrides
from mmray.train.experiment import ExperimentConfig, load_experiment


def vit_options(cfg: ExperimentConfig):
    """M2PT's options from the config (or its defaults when the method is not m2pt)."""
    from mmray.methods.m2pt import Config

    return Config(**cfg.method.options) if cfg.method.name == "m2pt" else Config()


def train_aux(cfg: ExperimentConfig, version_dir: str | Path, modality: str):
    """(trained model, its timm kwargs, {"val_acc", "train_loss"}); plain torch, in-process."""
    from mmray.data.ingest import read_split
    from mmray.data.reader import iter_batches, load_manifest, spec_of
    from mmray.methods.m2pt import as_timm_kwargs, build_vit
    from mmray.train.loop import resolve_device, seed_everything

    spec = spec_of(load_manifest(version_dir))
    ms = spec.modalities.get(modality)
    if ms is None or len(ms.shape) != 3:
        raise ValueError(f"--modality {modality!r}: not a modality of dataset {spec.name!r} stored "
                         f"as a (C, H, W) tensor; choose one of "
                         f"{[m for m, s in spec.modalities.items() if len(s.shape) == 3]}")
    opts = vit_options(cfg)
    c, h, w = ms.shape
    kwargs = {**as_timm_kwargs(opts.model_kwargs), "img_size": (h, w), "in_chans": c,
              "num_classes": spec.num_classes}
    device = resolve_device(cfg.train)
    seed_everything(cfg.seed)
    model = build_vit(opts.timm_name, kwargs, "", f"auxiliary on {modality}").to(device)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    train = read_split(version_dir, "train")
    losses = []
    for epoch in range(t.epochs):
        model.train()
        for batch in iter_batches(train, spec, t.batch_size, shuffle_seed=cfg.seed * 1000 + epoch,
                                  device=device):
            loss = F.cross_entropy(model(batch["inputs"][modality]), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for batch in iter_batches(read_split(version_dir, "val"), spec, t.batch_size, device=device):
            correct += int((model(batch["inputs"][modality]).argmax(1) == batch["label"]).sum())
            n += len(batch["id"])
    stats = {"val_acc": correct / max(n, 1),
             "train_loss": float(torch.stack(losses[-10:]).mean()) if losses else float("nan")}
    return model.cpu(), kwargs, stats


def save(model: torch.nn.Module, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/base.yaml")
    p.add_argument("--modality", default="audio", help="modality to train on (default: audio)")
    p.add_argument("--out", default=None,
                   help="state dict path (default: data/aux/m2pt_aux_<modality>.pt)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmray-smoke-") as tmp:
        overrides = (smoke_overrides(tmp) if args.smoke else []) + list(args.overrides)
        out = Path(args.out or (Path(tmp) if args.smoke else Path("data/aux"))
                   / f"m2pt_aux_{args.modality}.pt")
        try:
            cfg = load_experiment(args.config, overrides)
            prepared = prepare_data(cfg.data)
            model, kwargs, stats = train_aux(cfg, prepared.version_dir, args.modality)
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
            return fail(e)
        save(model, out)
        aux_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
                      if k in ("img_size", "in_chans", "num_classes")}
        options = {"aux_weights": str(out.resolve()), "aux_kwargs": aux_kwargs,
                   "aux_modality": args.modality}
        meta = {"timm_name": vit_options(cfg).timm_name, "kwargs": aux_kwargs,
                "options": options, "dataset": cfg.data.dataset,
                "data_version": prepared.manifest["version"], **stats,
                "train": dataclasses.asdict(cfg.train)}
        Path(f"{out}.json").write_text(json.dumps(meta, indent=1))
        print(f"auxiliary ViT trained on {args.modality} ({stats['val_acc']:.3f} val acc): {out}")
        print("M2PT options: " + " ".join(
            f"method.options.{k}={json.dumps(v).replace(' ', '')}" for k, v in options.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
