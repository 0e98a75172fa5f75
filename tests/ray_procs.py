"""A real Ray head started with `ray start --head` on 127.0.0.1, stopped without touching others.

`ray stop` stops every Ray process on the machine, including the embedded Ray that the test
session itself is a driver of (its loss kills the pytest process). So the head is started in a
session of its own: its daemons share the process group of `ray start`, and the workers they
spawn (which take process groups of their own) are their descendants. Stopping signals exactly
that group and everything below it, found through /proc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def group_and_descendants(pgid: int) -> set[int]:
    table = _proc_table()
    found = {pid for pid, (_, group) in table.items() if group == pgid}
    while True:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the group and its descendants, then SIGKILL whatever is left after `grace_s`."""
    pids = group_and_descendants(pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            if not pids:
                return
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, trial_slots: int = 2,
             autoscaling: dict | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (dashboard address, environment for the CLI) of a fresh head; stop it afterwards.

    `autoscaling`: an autoscaler config for Ray's fake multi-node provider (`fake_autoscaling`
    builds one); the head then runs the autoscaler, which starts and stops worker nodes as
    raylets on this machine, below the head's daemons (so stopping the head stops them too)."""
    temp = tempfile.mkdtemp(prefix="mmray-head-", dir="/tmp")  # socket paths must stay short
    gcs, dash, agent = free_port(), free_port(), free_port()
    # The job's `python` must be this environment's, so the head starts with it first on PATH.
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    extra = []
    if autoscaling is not None:
        import json

        config = Path(temp) / "autoscaling.json"
        # The provider connects its nodes to this head's GCS (by default it assumes port 6379).
        autoscaling = {**autoscaling, "provider": {**autoscaling["provider"],
                                                   "gcs_address": f"127.0.0.1:{gcs}"}}
        config.write_text(json.dumps(autoscaling))
        extra = [f"--autoscaling-config={config}"]
        # RAY_FAKE_CLUSTER: the provider refuses to start without it; the update interval is
        # the autoscaler's loop (5 s by default), so it reacts within a second or two.
        env_head = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    else:
        env_head = env
    proc = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # The agent's default port (52365) is fixed: a second Ray on the machine (the tests'
         # embedded one) would already hold it, and the head would never take a job.
         f"--dashboard-agent-listen-port={agent}", f"--num-cpus={num_cpus}",
         f'--resources={{"trial_slot": {trial_slots}}}', f"--temp-dir={temp}",
         "--disable-usage-stats", *extra],
        env=env_head, capture_output=True, text=True, timeout=120, start_new_session=True)
    pgid = _group_of_daemons(temp)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        yield f"http://127.0.0.1:{dash}", env
    finally:
        if pgid is not None:
            stop_group(pgid)


def fake_autoscaling(head: dict, workers: dict, idle_timeout_minutes: float) -> dict:
    """An autoscaler config for Ray's fake multi-node provider (the fields `ray up` would read;
    Ray's own `fake_multi_node/example.yaml` is the model): `head` the head's resources as the
    autoscaler should count them, `workers` the worker node types (resources, min/max_workers)."""
    types = {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
             **{name: {"node_config": {}, **t} for name, t in workers.items()}}
    return {
        "cluster_name": "fake", "max_workers": sum(t["max_workers"] for t in workers.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
        "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _group_of_daemons(temp: str) -> int | None:
    """The process group of the head's gcs_server (its command line names the temp dir)."""
    for pid in _proc_table():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "gcs_server" in cmd and temp in cmd:
            return os.getpgid(pid)
    return None


def submit_job(address: str, env: dict, entrypoint: list[str], cwd: Path, runtime_env: dict,
               timeout_s: float = 600, upload: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit` of `entrypoint` with `cwd` as the working dir; waits for the job to end.
    `upload=False`: no working dir is uploaded (the entrypoint names its files by absolute path)."""
    import json

    cmd = [str(BIN / "ray"), "job", "submit", "--address", address,
           *(["--working-dir", "."] if upload else []),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite store and proxied artifacts under `folder`);
    yields its URI once /health answers (bounded wait), stops it afterwards."""
    import urllib.request

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        stop_group(proc.pid)
