"""Reading shards back: the manifest, whole splits for the plain loop, Ray Datasets for workers,
and `collate`, which turns columns into the batch contract every method consumes:

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


def read_split(version_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """A whole split as numpy columns (in file order), for the plain torch loop and benchmarks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = spec_of(load_manifest(version_dir))
    table = pa.concat_tables([pq.read_table(p) for p in shard_files(version_dir, split)])
    cols: dict[str, np.ndarray] = {"id": np.asarray(table.column("id").to_pylist(), dtype=object)}
    label = table.column("label").to_pylist()
    cols["label"] = np.asarray(label, dtype=np.float32 if spec.multilabel else np.int64)
    for m, ms in spec.modalities.items():
        flat = table.column(m).combine_chunks()
        # Ray writes fixed-shape tensors as an extension type over fixed-size lists.
        storage = flat.storage if hasattr(flat, "storage") else flat
        values = storage.flatten().to_numpy(zero_copy_only=False)
        cols[m] = values.reshape(len(table), *ms.shape)
    for name in table.column_names:
        if name.startswith("present_"):
            cols[name] = np.asarray(table.column(name).to_pylist(), dtype=bool)
    return cols


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


def ray_dataset(version_dir: str | Path, split: str):
    """A split as a Ray Dataset for Train workers.

    The single-operator Parquet reader, with zero-CPU read tasks: Train workers hold the CPUs of
    a small machine, and a read task that waits for a CPU would wait forever (seen on 2 cores
    with two concurrent trials). Reading shards is light next to training. Zero-CPU tasks are not
    bounded by CPUs, though: Ray would start a worker process for every file at once (on 2
    cores, 38 MB in 13 files took 8.6 s that way, 3.3 s with at most 2 at a time), so at most as
    many read tasks run at once as the cluster has CPUs.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False  # its file-listing task reserves a whole CPU, with no override
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # deterministic order -> exact resumes
    files = [str(p) for p in shard_files(version_dir, split)]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ray.data.read_parquet(files, num_cpus=0, concurrency=min(cpus, len(files)))
