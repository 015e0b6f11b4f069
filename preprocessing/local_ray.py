"""``ray.init`` for our commands: a cluster by address when one is given, else a local one on loopback.

A local cluster (no address, no ``RAY_ADDRESS``) binds every port to 127.0.0.1: Ray's own
single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what it uses on macOS/Windows)
makes the node address loopback, so the GCS, raylet, workers, object manager, runtime-env,
dashboard and metrics agents listen on 127.0.0.1 only; the dashboard is off. Joining a cluster
(``address``/``RAY_ADDRESS``) is the explicit multi-node choice and changes nothing here.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_local(address: str | None) -> bool:
    """True when ``ray.init(address)`` would start a new local cluster."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, **kwargs: Any) -> bool:
    """``ray.init`` unless Ray is initialized already; True when this call started it (shut it down)."""
    if not is_local(address):
        import ray

        if ray.is_initialized():
            return False
        ray.init(address=address, **kwargs)
        return True
    # Read by ray._private.ray_constants at import and by every process the local cluster starts.
    os.environ[_SINGLE_MACHINE] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the same switch, for a driver that imported Ray before

    if ray.is_initialized():
        return False
    ray.init(address=None, include_dashboard=False, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, **kwargs)
    return True
