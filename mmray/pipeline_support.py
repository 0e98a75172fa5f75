"""What the pipeline scripts share: argument parsing of configs and overrides, data preparation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmray.config import ConfigError
from mmray.data.sources import DataConfig


def config_parser(description: str, default_config: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.epochs=2 method.fusion=sum")
    p.add_argument("--smoke", action="store_true",
                   help="tiny data and model in a temporary folder; finishes in seconds")
    return p


def fail(err: Exception) -> int:
    """Print a config or input error for a person (no traceback) and return the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def prepare_data(data: DataConfig):
    """Write the synthetic dataset if it is the source and absent, then preprocess (cached)."""
    from mmray.data.preprocess import preprocess

    if data.dataset == "synthetic":
        from mmray.data.sources.synthetic import generate

        generate(data.synthetic, data.root)
    return preprocess(data)


SMOKE_OVERRIDES = [
    "data.synthetic.num_samples=48", "data.synthetic.audio_seconds=0.25", "data.audio.seconds=0.25",
    # 32 px: the tiny CLIP's input size, so configs built on it (MAP, REP) shrink too.
    "data.synthetic.image_size=32", "data.image.size=32", "model.width=4", "model.feature_dim=8",
    "train.epochs=1", "train.batch_size=16",
]


def smoke_overrides(workdir: str | Path) -> list[str]:
    """Overrides that shrink any config to seconds and keep every file under `workdir`."""
    w = Path(workdir)
    w.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{w / 'mlflow.db'}"
    return [*SMOKE_OVERRIDES, f"data.root={w / 'raw'}", f"data.data_dir={w / 'shards'}"]


__all__ = ["ConfigError", "config_parser", "fail", "prepare_data", "smoke_overrides"]
