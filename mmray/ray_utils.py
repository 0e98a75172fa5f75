"""Starting or joining Ray, the one way every pipeline does it.

With no `RAY_ADDRESS` (and no address given) an embedded local Ray is started, sized to this
machine, with one `trial_slot` custom resource per concurrent trial: Tune trial drivers reserve a
slot instead of a CPU, so two drivers cannot take both CPUs of a small machine and starve their
own Train workers (a deadlock seen on 2 cores). On a cluster the head declares `trial_slot`.
"""

from __future__ import annotations

import os

import ray

TRIAL_SLOT = "trial_slot"


def init_ray(address: str | None = None, num_cpus: int | None = None, trial_slots: int | None = None,
             temp_dir: str | None = None) -> dict:
    """Join the cluster at `address`/$RAY_ADDRESS, or start a local Ray; returns its resources."""
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"runtime_env": {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}}
    if address:
        # Under `ray job submit` resources are the cluster's: passing num_cpus here raises.
        ray.init(address=address, log_to_driver=True, **env)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, resources={TRIAL_SLOT: trial_slots or cpus},
                 # The dashboard serves the State API, which Ray Train uses to free a stopped
                 # trial's placement group; bound to loopback.
                 include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=temp_dir,
                 log_to_driver=True, **env)
    return ray.cluster_resources()
