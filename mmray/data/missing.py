"""Missing-modality tables (METHODS.md §6): which samples of a split miss which modality.

A table is sampled once per (split, rate η, type, seed) and stored beside the shards,

    <version_dir>/missing/<split>-<type>-<η>-seed<seed>.parquet    (id, present_<m> per modality)

so every method, every trial and every rerun reads the same pattern. Sampling: the split's ids,
sorted, are permuted by a generator seeded with (seed, split); the first round(η·n) of that order
miss something. For a modality type they miss that modality; for `both` / `any` the k-th of them
misses modality k mod M of the dataset's M modalities (half image, half text for an image-text
pair), so none misses every modality. The order does not depend on η, so the samples missing at
η = 0.3 also miss at 0.5 (robustness curves compare nested patterns), and the rate is met up to
rounding, not just in expectation.

Filling (`apply`): a missing modality's `present_<m>` is False and its input is replaced: images
by ones (after normalisation, as MAP/REP fill them), text by the tokens of an empty string under
the dataset's tokenizer, every other kind by zeros. Methods zero the features of absent
modalities themselves.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmray.config import bounds
from mmray.data.features import TextFeatures
from mmray.data.spec import DatasetSpec


@dataclass
class MissingConfig:
    """Missing-modality simulation (METHODS.md §6): which samples miss which modality.

    A table per (split, rate, type, seed) is sampled once and stored beside the shards, so every
    method and every rerun sees the same pattern. A missing modality is filled (images with
    ones, text with the tokens of an empty string, other kinds with zeros), its `present` mask is
    False, and every method zeroes its features.
    """

    # η of the train split.
    train_rate: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # η of the val and test splits.
    test_rate: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    # A modality name: that modality is missing in η of the samples. both / any: η of the
    # samples miss exactly one modality, spread evenly over the modalities (half image, half
    # text for an image-text pair: "both" in the MAP/REP papers); no sample misses all.
    type: str = "both"
    # Seed of the tables (the same seed gives the same table for every method).
    seed: int = 0
    # Robustness: after the last epoch the test split is also evaluated at each of these rates
    # for each type in eval_types (default: `type`), logged as test_miss_<type>_<rate>/<metric>.
    eval_rates: list[float] = field(default_factory=list)
    eval_types: list[str] = field(default_factory=list)

    def validate(self, path: str, errors: list[str]) -> None:
        for i, r in enumerate(self.eval_rates):
            if not 0.0 <= r <= 1.0:
                errors.append(f"{path}.eval_rates[{i}]: {r} is outside [0, 1]")
        for i, t in enumerate([self.type, *self.eval_types]):
            if not t or not t.replace("_", "").isalnum():
                where = f"{path}.type" if i == 0 else f"{path}.eval_types[{i - 1}]"
                errors.append(f"{where}: {t!r} must be both, any or a modality name")


BALANCED = ("both", "any")


@dataclass(frozen=True)
class MissingSpec:
    """One table's parameters: rate η, type (a modality, both or any) and seed."""

    rate: float
    type: str
    seed: int = 0

    @property
    def tag(self) -> str:
        """`<type>_<η>`, the name robustness metrics carry (test_miss_<tag>/<metric>)."""
        return f"{self.type}_{self.rate:g}"


def split_specs(cfg: MissingConfig) -> dict[str, MissingSpec | None]:
    """The table each split trains or evaluates with (None: nothing missing)."""
    train = MissingSpec(cfg.train_rate, cfg.type, cfg.seed) if cfg.train_rate > 0 else None
    test = MissingSpec(cfg.test_rate, cfg.type, cfg.seed) if cfg.test_rate > 0 else None
    return {"train": train, "val": test, "test": test}


def robustness_specs(cfg: MissingConfig) -> list[MissingSpec]:
    """The extra test evaluations: eval_rates × eval_types (default: the configured type)."""
    types = cfg.eval_types or [cfg.type]
    return [MissingSpec(r, t, cfg.seed) for t in types for r in cfg.eval_rates]


def check(cfg: MissingConfig, spec: DatasetSpec) -> None:
    """Raise naming the key if a type is not both, any or a modality of the dataset."""
    accepted = [*BALANCED, *spec.modalities]
    for key, t in [("type", cfg.type), *((f"eval_types[{i}]", t) for i, t in enumerate(cfg.eval_types))]:
        if t not in accepted:
            raise ValueError(f"data.missing.{key}: {t!r} is not accepted for dataset {spec.name!r}; "
                             f"accepted: {', '.join(accepted)}")
        if t in BALANCED and len(spec.modalities) < 2:
            raise ValueError(f"data.missing.{key}: {t!r} needs 2 or more modalities")


def sample(ids: list[str], modalities: list[str], spec: MissingSpec, split: str) -> np.ndarray:
    """present (n, M) bool for `ids` (in the order given), as the module docstring describes."""
    order = sorted(ids)
    rng = np.random.default_rng([spec.seed, zlib.crc32(split.encode())])
    perm = rng.permutation(len(order))
    n_missing = int(round(spec.rate * len(order)))
    present = np.ones((len(order), len(modalities)), dtype=bool)
    for k, row in enumerate(perm[:n_missing]):
        m = k % len(modalities) if spec.type in BALANCED else modalities.index(spec.type)
        present[row, m] = False
    index = {sid: i for i, sid in enumerate(order)}
    return present[[index[sid] for sid in ids]]


def table_path(version_dir: str | Path, split: str, spec: MissingSpec) -> Path:
    return Path(version_dir) / "missing" / f"{split}-{spec.type}-{spec.rate:g}-seed{spec.seed}.parquet"


def ensure_table(version_dir: str | Path, split: str, spec: MissingSpec, dataset: DatasetSpec) -> Path:
    """The stored table, sampled and written (atomically) the first time it is asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmray.data.reader import shard_files

    path = table_path(version_dir, split, spec)
    if path.is_file():
        return path
    ids = [str(i) for f in shard_files(version_dir, split)
           for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    mods = list(dataset.modalities)
    present = sample(ids, mods, spec, split)
    table = pa.table({"id": ids, **{f"present_{m}": present[:, j] for j, m in enumerate(mods)}})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several workers may ask at once: each writes a private file and renames it into place;
    # the tables are equal, so whichever rename lands last changes nothing.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class MissingTable:
    """A stored table, applied to numpy batch columns by sample id."""

    def __init__(self, path: str | Path, dataset: DatasetSpec, fills: dict[str, np.ndarray]):
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        self.modalities = list(dataset.modalities)
        self.index = {sid: i for i, sid in enumerate(t.column("id").to_pylist())}
        self.present = np.stack([np.asarray(t.column(f"present_{m}").to_pylist(), dtype=bool)
                                 for m in self.modalities], axis=1)
        self.fills = fills
        self.path = Path(path)

    def apply(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A copy of the columns with present_<m> set and missing inputs filled."""
        try:
            rows = [self.index[str(sid)] for sid in columns["id"]]
        except KeyError as e:
            raise KeyError(f"sample id {e.args[0]!r} is not in the missing table {self.path}; "
                           "it was sampled for other shards (delete the missing/ folder)") from None
        out = dict(columns)
        for j, m in enumerate(self.modalities):
            present = self.present[rows, j]
            out[f"present_{m}"] = present
            if not present.all():
                x = np.array(columns[m], copy=True)
                x[~present] = self.fills[m]
                out[m] = x
        return out


def fill_values(manifest: dict, dataset: DatasetSpec) -> dict[str, np.ndarray]:
    """What a missing modality's input becomes, per modality, under the shards' parameters."""
    from mmray.data.features import tokenize

    fills = {}
    for m, ms in dataset.modalities.items():
        if ms.kind == "image":
            fills[m] = np.ones(ms.shape, dtype=np.float32)
        elif ms.kind == "text":
            fills[m] = tokenize("", TextFeatures(**manifest["params"]["text"]))
        else:
            fills[m] = np.zeros(ms.shape, dtype=np.float32)
    return fills


def load(version_dir: str | Path, manifest: dict, split: str, spec: MissingSpec | None) -> MissingTable | None:
    """The table for `split` under `spec` (created if needed), or None when nothing is missing."""
    if spec is None:
        return None
    from mmray.data.reader import spec_of

    dataset = spec_of(manifest)
    path = ensure_table(version_dir, split, spec, dataset)
    return MissingTable(path, dataset, fill_values(manifest, dataset))
