"""What the benchmarks in bench/ share: the device they run on and how their results are written."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    """auto: CUDA when visible, else CPU; cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def write_results(out_dir: str | Path, name: str, result: dict, md: str) -> None:
    """<name>.json and <name>.md into `out_dir` (what bench/summary.py gathers); prints the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(md)
    print(md)
