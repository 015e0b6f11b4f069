"""``ray.init`` for our commands: a cluster by address when one is given, else a local one on loopback.

A local cluster (no address, no ``RAY_ADDRESS``) binds every port to 127.0.0.1: Ray's own
single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what it uses on macOS/Windows)
makes the node address loopback, so the GCS, raylet, workers, object manager, runtime-env,
dashboard and metrics agents listen on 127.0.0.1 only; the dashboard is off. Joining a cluster
(``address``/``RAY_ADDRESS``) is the explicit multi-node choice and changes nothing here.
"""

from __future__ import annotations

import os
import re
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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WHERE = re.compile(r"\s*(ray::[\w.]+\(\))")
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure)): ?(.*)$")


def _last_exception_line(text: str) -> str | None:
    """``Type: message`` of the last exception in a formatted traceback (the one that ended it)."""
    lines = _ANSI.sub("", text).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if m := _EXC_LINE.match(lines[i]):
            return f"{m.group(1)}: {m.group(2)}".rstrip(": ")
    return None


def ray_root_cause(e: BaseException) -> str | None:
    """One line naming the exception that really failed a Ray task or actor (``OSError: [Errno 28] No
    space left on device``), where it ran; None for an exception that is not Ray's."""
    try:
        from ray import exceptions as rx
    except ImportError:
        return None
    if not isinstance(e, rx.RayError):
        return None
    where = ""
    while isinstance(e, rx.RayTaskError):
        if m := _WHERE.match(_ANSI.sub("", str(e))):  # "ray::write_shard() (pid=..., ip=...)"
            where = f"in {m.group(1)}: "
        cause = e.cause
        if isinstance(cause, BaseException) and type(cause) is not rx.RayError:
            e = cause
            continue
        found = _last_exception_line(e.traceback_str)
        return where + (found or f"{type(e).__name__}: {_first_line(e)}")
    if isinstance(e, rx.RayActorError) and getattr(e, "actor_init_failed", False):
        found = _last_exception_line(e.error_msg)
        return f"an actor failed to start: {found or _first_line(e)}"
    if isinstance(e, rx.RayActorError):
        detail = [ln.strip() for ln in _ANSI.sub("", e.error_msg).splitlines()[1:] if ln.strip()
                  and not ln.startswith("\t")]
        return f"{type(e).__name__}: {_first_line(e)}" + (f" ({detail[-1]})" if detail else "")
    return where + f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else ""
