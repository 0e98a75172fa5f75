"""Reading shards back: the manifest, the shard files, and `collate`, which turns columns into the
batch contract every method consumes (`mmray.data.ingest` reads and decodes the rows):

    {"inputs": {modality: (B, *shape) tensor}, "present": {modality: (B,) bool},
     "label": (B,) long or (B, C) float multi-hot, "id": list[str]}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mmray.data.spec import DatasetSpec

MANIFEST = "manifest.json"


def load_manifest(version_dir: str | Path) -> dict:
    path = Path(version_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {version_dir}: not a preprocessed dataset "
                                "(run pipelines/preprocess.py)") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def spec_of(manifest: dict) -> DatasetSpec:
    return DatasetSpec.from_dict(manifest["spec"])


def shard_files(version_dir: str | Path, split: str) -> list[Path]:
    files = sorted((Path(version_dir) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no shards for split {split!r} in {version_dir}")
    return files


def collate(columns: dict[str, np.ndarray], spec: DatasetSpec,
            device: torch.device | None = None) -> dict:
    """Numpy columns of one batch -> the batch contract, on `device`."""
    n = len(columns["id"])
    inputs, present = {}, {}
    for m, ms in spec.modalities.items():
        arr = np.asarray(columns[m])
        dtype = torch.long if ms.kind == "text" else torch.float32
        arr = arr.reshape(n, *ms.shape)
        # Ray and Arrow hand out read-only buffers: torch would share memory it must not write,
        # so those are copied (once, with any dtype change); writable arrays are wrapped.
        inputs[m] = (torch.as_tensor(arr, dtype=dtype, device=device) if arr.flags.writeable
                     else torch.tensor(arr, dtype=dtype, device=device))
        mask = columns.get(f"present_{m}")
        present[m] = (torch.ones(n, dtype=torch.bool, device=device) if mask is None
                      else torch.as_tensor(np.asarray(mask, dtype=bool), device=device))
    label_dtype = torch.float32 if spec.multilabel else torch.long
    # A copy: Arrow hands out read-only buffers, which torch cannot wrap safely.
    label = np.array(list(columns["label"]) if spec.multilabel else columns["label"])
    return {"inputs": inputs, "present": present,
            "label": torch.as_tensor(label, dtype=label_dtype, device=device),
            "id": [str(i) for i in columns["id"]]}


def iter_batches(columns: dict[str, np.ndarray], spec: DatasetSpec, batch_size: int,
                 shuffle_seed: int | None = None, device: torch.device | None = None) -> Iterator[dict]:
    """Batches of an in-memory split; a seeded permutation when `shuffle_seed` is given."""
    n = len(columns["id"])
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield collate({k: v[idx] for k, v in columns.items()}, spec, device)
