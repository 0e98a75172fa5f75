"""MAP and REP end to end: their configs' recipe through the real pipeline (synthetic image-text
files -> shards -> run_local) on the tiny CLIP, with checkpoints that leave CLIP out."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmray.train.experiment import load_experiment
from mmray.train.loop import warmup_linear

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["map", "rep"])
def test_method_config_trains_end_to_end(name, tiny_data_it, tmp_path):
    from mmray.train.loop import run_local

    _, prepared = tiny_data_it
    cfg = load_experiment(CONFIGS / "methods" / f"{name}.yaml", ["train.epochs=4", "train.batch_size=16"])
    assert cfg.method.name == name and cfg.train.scheduler == "linear"
    history = run_local(cfg, prepared.version_dir, tmp_path / "ckpt")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert all(math.isfinite(history[-1][k]) for k in ("val/acc", "test/acc", "train/grad/image",
                                                        "train/grad/text"))
    # the recipe's schedule: 10% warm-up of 4 epochs, then linear decay, each epoch at its
    # midpoint's value (each epoch logs the lr it trained with)
    assert [h["lr"] for h in history] == pytest.approx(
        [0.01 * warmup_linear(e + 0.5, 4, 0.4) for e in range(4)])
    state = torch.load(tmp_path / "ckpt" / "state.pt", map_location="cpu", weights_only=False)
    assert state["method"] and not any(k.startswith("encoders.") for k in state["method"])
