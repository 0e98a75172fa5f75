"""The suite's own rules: two tiers (tests/conftest.py) that `make test-fast` and `make test` run,
no test file imported by another (shared builders live in helper modules such as tests/helpers.py),
and no test that edits sys.path."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_file_imports_another_or_touches_sys_path():
    files = sorted(TESTS.rglob("*.py"))
    test_modules = {p.stem for p in files if p.name.startswith("test_") or p.name == "conftest.py"}
    wrong = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        name = path.relative_to(TESTS)
        wrong += [f"{name} imports {module}" for module in sorted(_imported_modules(tree) & test_modules)]
        wrong += [f"{name}:{node.lineno} uses sys.path" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr == "path"
                  and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not wrong, "shared builders belong in tests/helpers.py: " + "; ".join(wrong)


PROBE = '''
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def data(ray_local):
    return ray_local


def test_through_a_fixture(data):
    pass


def test_without_ray():
    pass


def test_leaves_a_ray_session_folder():  # as a pipeline run in a subprocess would
    (Path(os.environ["RAY_TMPDIR"]) / "session_latest").mkdir()


def test_leaves_a_ray_daemon(request):
    proc = subprocess.Popen(["raylet", "60"], executable=shutil.which("sleep"))
    request.config.add_cleanup(proc.kill)
'''


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_a_ray_fixture_marks_its_tests_and_the_fast_tier_fails_a_test_that_starts_ray(tmp_path):
    """The project's conftest in a folder of its own, on probe tests that start nothing real: a
    stand-in Ray daemon and a Ray session folder are what the guard looks for."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = ray: starts Ray\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    listed = _pytest(tmp_path, "--collect-only", "-q", "-m", "ray")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [ln for ln in listed.stdout.splitlines() if "::" in ln] == [
        "test_probe.py::test_through_a_fixture"]
    fast = _pytest(tmp_path, "-q", "-m", "not ray")
    assert fast.returncode == 1, fast.stdout + fast.stderr
    assert "3 passed, 1 deselected, 2 errors" in fast.stdout  # the errors are at teardown
    for name, sign in [("test_leaves_a_ray_session_folder", "session_latest"),
                       ("test_leaves_a_ray_daemon", "Ray daemon")]:
        line = next(ln for ln in fast.stdout.splitlines() if f"{name} started Ray" in ln)
        assert "is not in the `ray` tier" in line and sign in line
    assert "no `ray` test was selected, yet Ray was started" in fast.stderr  # and the session fails


@pytest.mark.skipif(shutil.which("make") is None, reason="make not found")
def test_make_test_runs_the_fast_tier_then_the_slow_then_the_ray_tier():
    def recipe(target: str) -> list[str]:
        out = subprocess.run(["make", "-n", target], cwd=TESTS.parent, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return [ln for ln in out.splitlines() if "-m pytest" in ln]

    fast = '.venv/bin/python -m pytest -q -m "not ray and not slow" tests || test $? -eq 5'
    assert recipe("test-fast") == [fast]
    assert recipe("test") == [fast, '.venv/bin/python -m pytest -q -m "slow and not ray" tests || test $? -eq 5',
                              ".venv/bin/python -m pytest -q -m ray tests || test $? -eq 5"]
