"""Shared fixtures, and the two test tiers.

Ray is started once per session and only by the tests that need it; those are the `ray` tier
(`make test` runs it after the fast tier, `make test-fast` leaves it out). A test is in the `ray`
tier when it requests a fixture of RAY_FIXTURES, directly or through other fixtures (the hook below
marks it), or when its module starts Ray itself and says so with `pytestmark = pytest.mark.ray`.
The guard at the end fails any test that starts Ray without the marker, so a test cannot land in
the fast tier by mistake.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Unix socket paths under Ray's temp dir must stay short (108 bytes), so not under tmp_path.
RAY_TMP = tempfile.mkdtemp(prefix="mmray-ray-", dir="/tmp")

# Fixtures that start Ray. Every fixture that needs the session's Ray requests `ray_local`, so the
# set stays this small; a fixture that starts a Ray of its own (a `ray start` head, a Cluster)
# belongs here too, unless its module is marked as a whole.
RAY_FIXTURES = frozenset({"ray_local"})
# A test outside the ray tier that runs this long is hung, not slow (the slowest takes about 5 s
# on 2 idle cores).
FAST_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, resources={"trial_slot": 2}, include_dashboard=True, dashboard_host="127.0.0.1",
                 _temp_dir=RAY_TMP, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        elif item.get_closest_marker("ray") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))


# -- the guard: no Ray outside the ray tier ----------------------------------------------------

_RAY_FREE = pytest.StashKey[bool]()
_SIGNS_BEFORE = pytest.StashKey[set]()


def pytest_collection_finish(session):
    """A session that selected no `ray` test must start no Ray. Ray's default temp dir is pointed
    at an empty folder, so that a Ray started anywhere below this process (a pipeline run in a
    subprocess too) leaves its session folder there."""
    ray_free = not any(item.get_closest_marker("ray") for item in session.items)
    session.config.stash[_RAY_FREE] = ray_free
    if ray_free:
        os.environ["RAY_TMPDIR"] = RAY_TMP


def _ray_signs(config) -> set[str]:
    """What a started Ray leaves behind: an initialized `ray` module in this process, Ray daemons
    among this process's children, and (in a Ray-free session) session folders in RAY_TMP."""
    signs = set()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        signs.add("ray.init() in the test process")
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if Path(program).name in ("raylet", "gcs_server"):
                signs.add(f"Ray daemon {pid}: {program}")
    if config.stash.get(_RAY_FREE, False):
        signs |= {f"{RAY_TMP}/{name}" for name in os.listdir(RAY_TMP)}
    return signs


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_SIGNS_BEFORE] = _ray_signs(item.config)  # before any fixture is set up


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item.get_closest_marker("ray") is not None:
        return
    new = _ray_signs(item.config) - item.stash.get(_SIGNS_BEFORE, set())
    if new:
        pytest.fail(f"{item.nodeid} started Ray but is not in the `ray` tier ({sorted(new)}). "
                    f"Request one of {sorted(RAY_FIXTURES)} (directly or through a fixture), or "
                    "mark it `ray` (`pytestmark = pytest.mark.ray` where its module starts Ray "
                    "itself).", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    if session.config.stash.get(_RAY_FREE, False) and (signs := _ray_signs(session.config)):
        # Ray started outside any test (at import or collection): fail the session all the same.
        print(f"\nno `ray` test was selected, yet Ray was started: {sorted(signs)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(RAY_TMP, ignore_errors=True)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (tests/helpers.py: torch_threads)."""
    from helpers import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    # Tests choose their own MLflow store; never write into one named by the caller's shell.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _tiny(tmp_path_factory, name: str, *extra: str):
    from mmray.pipeline_support import prepare_data

    from helpers import smoke_experiment

    cfg = smoke_experiment(tmp_path_factory.mktemp(name), "data.synthetic.num_samples=96", "train.epochs=3",
                           *extra)
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
