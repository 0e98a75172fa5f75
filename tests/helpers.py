"""Builders that several test files share. Test files import them from here (and Ray process
helpers from ray_procs), never from one another.

- specs and batches for the methods, in plain torch: a toy audio-image task and its variants, and
  image-text at the tiny CLIP's input sizes with missing-modality cases;
- fixture datasets in the real layouts: the data config at fixture sizes, the featurizer run on
  listed items the way preprocessing's actors run it (without Ray), a noise WAV;
- the scripts of pipelines/ loaded as modules (they are run by path, not installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np
import soundfile
import torch

from mmray.data.spec import DatasetSpec, ModalitySpec
from mmray.methods import StepContext
from mmray.methods.base import MethodConfig

ROOT = Path(__file__).resolve().parents[1]

# -- specs and batches ------------------------------------------------------------------------

SPEC = DatasetSpec("toy", {"audio": ModalitySpec("audio", (1, 12, 8)),
                           "image": ModalitySpec("image", (3, 8, 8))}, num_classes=3)
SPEC3 = DatasetSpec("toy3", {**SPEC.modalities, "text": ModalitySpec("text", (6,), vocab_size=50)},
                    num_classes=3)
ML_SPEC = DatasetSpec("ml", SPEC.modalities, num_classes=4, multilabel=True)
# Image-text at the tiny CLIP's input sizes (32 px, 32 open_clip tokens): what MAP and REP need.
SPEC_IT = DatasetSpec("toy_it", {"image": ModalitySpec("image", (3, 32, 32)),
                                 "text": ModalitySpec("text", (32,), vocab_size=49408)}, num_classes=3)
CPU = StepContext(device=torch.device("cpu"))
CLIP_PATCHES = 17  # class token + 16 patches of the tiny CLIP


def checked_method_config(*args, **kwargs) -> MethodConfig:
    """A MethodConfig checked as a loaded config is (`check_method_config`): its preset
    resolved and every option filled in; the check must pass."""
    from mmray.methods import check_method_config

    cfg = MethodConfig(*args, **kwargs)
    errors: list[str] = []
    check_method_config(cfg, "method", errors)
    assert not errors, errors
    return cfg


def make_batch(spec: DatasetSpec, b: int = 6, seed: int = 0) -> dict:
    """Random inputs of every modality of `spec`, all present, and random labels."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for m, s in spec.modalities.items():
        if s.kind == "text":
            inputs[m] = torch.randint(0, s.vocab_size, (b, *s.shape), generator=g)
        else:
            inputs[m] = torch.randn(b, *s.shape, generator=g)
    label = (torch.randint(0, 2, (b, spec.num_classes), generator=g).float() if spec.multilabel
             else torch.randint(0, spec.num_classes, (b,), generator=g))
    return {"inputs": inputs, "present": {m: torch.ones(b, dtype=torch.bool) for m in spec.modalities},
            "label": label, "id": [f"s{i}" for i in range(b)]}


def clip_batch(present_image=(1, 1, 0), present_text=(1, 0, 1), seed: int = 0) -> dict:
    """SPEC_IT inputs for three samples: complete, text missing, image missing (by default).
    Missing inputs are filled as the missing tables fill them: an all-ones image, the tokens of an
    empty string."""
    g = torch.Generator().manual_seed(seed)
    b = len(present_image)
    img = torch.randn(b, 3, 32, 32, generator=g)
    txt = torch.zeros(b, 32, dtype=torch.long)
    txt[:, 0], txt[:, 1:6], txt[:, 6] = 49406, torch.randint(1, 40000, (b, 5), generator=g), 49407
    pi, pt = torch.tensor(present_image).bool(), torch.tensor(present_text).bool()
    img[~pi] = 1.0
    txt[~pt] = torch.tensor([49406, 49407] + [0] * 30)
    return {"inputs": {"image": img, "text": txt}, "present": {"image": pi, "text": pt},
            "label": torch.tensor([0, 1, 2][:b]), "id": [f"s{i}" for i in range(b)]}


def clip_missing_batches() -> list[dict]:
    """Three float64 image-text batches of 6 whose missing patterns cover every case (the
    reference-port tests of MAP and REP step on them)."""
    out = []
    for step, (img, txt) in enumerate([((1, 1, 0, 1, 0, 1), (1, 0, 1, 1, 1, 0)),
                                       ((0, 1, 1, 1, 0, 1), (1, 1, 0, 1, 1, 1)),
                                       ((1, 0, 1, 1, 1, 1), (0, 1, 1, 1, 0, 1))]):
        b = clip_batch(img, txt, seed=10 + step)
        b["inputs"]["image"] = b["inputs"]["image"].double()
        b["label"] = torch.tensor([(i + step) % SPEC_IT.num_classes for i in range(len(img))])
        out.append(b)
    return out


def missing_type_codes(b: dict) -> list[int]:
    """The MAP/REP references' missing_type per sample: 0 complete, 1 text missing, 2 image missing."""
    return [0 if i and t else 1 if i else 2
            for i, t in zip(b["present"]["image"].tolist(), b["present"]["text"].tolist(), strict=True)]


def block_inputs(method, role: str, b: dict) -> list[torch.Tensor]:
    """The token sequence entering each residual block of a CLIP method's `role` tower."""
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0]) and None)
             for blk in method.tower(role).resblocks()]
    try:
        method.eval()
        with torch.no_grad():
            method(b)
    finally:
        for h in hooks:
            h.remove()
    return seen


# -- fixture datasets -------------------------------------------------------------------------


def data_config(dataset: str, root: Path, tmp_path: Path, *overrides: str):
    """The data config of `dataset` read from fixture files under `root`, shards under
    `tmp_path`/shards, in one read task (a fixture is a few files); `overrides` last."""
    from mmray.train.experiment import load_experiment

    return load_experiment(None, [
        f"data.dataset={dataset}", f"data.root={root}", f"data.data_dir={tmp_path / 'shards'}",
        "data.parallelism=1", *overrides]).data


def smoke_experiment(folder: Path, *overrides: str):
    """The experiment that `--smoke` runs (tiny model, few samples and epochs), on raw files under
    `folder`/raw and shards under `folder`/shards; `overrides` last."""
    from mmray.pipeline_support import SMOKE_OVERRIDES
    from mmray.train.experiment import load_experiment

    return load_experiment(None, [*SMOKE_OVERRIDES, f"data.root={folder / 'raw'}",
                                  f"data.data_dir={folder / 'shards'}", *overrides])


def ids_by_split(items) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for it in items:
        out.setdefault(it.split, []).append(it.id)
    return out


def featurize(source, data, items) -> dict:
    """The featurizer on `items`, as one batch of the rows that preprocessing's actors get: per
    modality a file path or an inline value, whichever the item has."""
    from mmray.data.preprocess import Featurizer

    spec = source.spec(data)
    batch = {"id": np.array([i.id for i in items], dtype=object),
             "split": np.array([i.split for i in items], dtype=object),
             "label": np.array([i.label for i in items], dtype=np.float32 if spec.multilabel else None)}
    for m in spec.modalities:
        batch[f"file_{m}"] = np.array([i.files.get(m, "") for i in items], dtype=object)
        batch[f"inline_{m}"] = np.array([i.inline.get(m, "") for i in items], dtype=object)
    return decoded(Featurizer(spec.to_dict(), asdict(data))(batch), spec, data)


def decoded(out: dict, spec, data) -> dict:
    """The featurizer's stored values as training reads them (the eval transform); rows that
    failed stay zeros."""
    from mmray.data import codec
    from mmray.data.ingest import Decoder

    manifest = {"spec": spec.to_dict(), "params": {"image": asdict(data.image), "audio": asdict(data.audio),
                                                   "encodings": codec.encodings(spec.modalities, data)}}
    ok = np.asarray(out["error"] == "", dtype=bool)
    dec = Decoder(manifest)({k: np.asarray(v)[ok] for k, v in out.items()})
    full = dict(out)
    for m, ms in spec.modalities.items():
        col = np.zeros((len(ok), *ms.shape), dtype=np.int64 if ms.kind == "text" else np.float32)
        col[ok] = dec[m]
        full[m] = col
    return full


def write_noise_wav(path: Path, rng: np.random.Generator, seconds: float, sample_rate: int) -> Path:
    """Quiet white noise as 16-bit PCM, the format the datasets ship."""
    noise = 0.1 * rng.standard_normal(int(sample_rate * seconds))
    soundfile.write(path, noise, sample_rate, subtype="PCM_16")
    return path


# -- pipelines --------------------------------------------------------------------------------


def load_pipeline(name: str) -> ModuleType:
    """pipelines/<name>.py as a module, to call its functions in this process."""
    path = ROOT / "pipelines" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pipelines_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- torch ------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block. One thread for loops of many tiny
    steps (with the cores busy, the thread pool spin-waits: 30x slower here) and for values
    pinned to the last bits (reductions split over threads round differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Recorder(torch.optim.SGD):
    """SGD with lr 0 that records every gradient it is asked to apply (`seen`, one list per
    step in parameter-group order): what a method's step applies, the weights left alone."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[list[torch.Tensor | None]] = []

    def step(self, closure=None):
        self.seen.append([None if p.grad is None else p.grad.clone()
                          for g in self.param_groups for p in g["params"]])
        return super().step(closure)
