"""Shared fixtures. Ray is started once per session and only by the tests that need it."""

from __future__ import annotations

import shutil
import tempfile

import pytest

# Unix socket paths under Ray's temp dir must stay short (108 bytes), so not under tmp_path.
RAY_TMP = tempfile.mkdtemp(prefix="mmray-ray-", dir="/tmp")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, resources={"trial_slot": 2}, include_dashboard=True, dashboard_host="127.0.0.1",
                 _temp_dir=RAY_TMP, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(RAY_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    # Tests choose their own MLflow store; never write into one named by the caller's shell.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _tiny(tmp_path_factory, name: str, *extra: str):
    from mmray.pipeline_support import SMOKE_OVERRIDES, prepare_data
    from mmray.train.experiment import load_experiment

    root = tmp_path_factory.mktemp(name)
    cfg = load_experiment(None, [*SMOKE_OVERRIDES, "data.synthetic.num_samples=96", "train.epochs=3",
                             f"data.root={root / 'raw'}", f"data.data_dir={root / 'shards'}", *extra])
    return cfg, prepare_data(cfg.data)


@pytest.fixture(scope="session")
def tiny_data(ray_local, tmp_path_factory):
    """A tiny synthetic audio-image dataset, preprocessed once: (experiment config, Prepared)."""
    return _tiny(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_data3(ray_local, tmp_path_factory):
    """The same with a third modality, text."""
    return _tiny(tmp_path_factory, "tiny3", "data.synthetic.modalities=[audio, image, text]",
                 "data.synthetic.strength={audio: 0.9, image: 0.5, text: 0.3}")


@pytest.fixture(scope="session")
def tiny_data_it(ray_local, tmp_path_factory):
    """Image-text at the tiny CLIP's input sizes (32 px, 32 open_clip tokens): MAP and REP data."""
    return _tiny(tmp_path_factory, "tiny_it", "data.synthetic.modalities=[image, text]",
                 "data.synthetic.strength={image: 0.8, text: 0.8}", "data.synthetic.image_size=32",
                 "data.image.size=32", "data.text.tokenizer=open_clip", "data.text.max_tokens=32")
