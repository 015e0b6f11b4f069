"""No orphaned ranks: every rank and launcher agent dies with the ``latentpipe train`` that started it.

Two mechanisms, because a rank's parent is not always our launcher:

- ``PR_SET_PDEATHSIG`` (Linux ``prctl(2)``): the kernel sends SIGKILL to a process when its parent
  exits. Set in every launcher agent we start (torchrun, the DeepSpeed runner: ``preexec_fn``) and
  in every rank (whose parent is torchrun's agent or DeepSpeed's ``launch.py``).
- A watchdog thread in every rank polling the launcher's PID (``LATENTPIPE_LAUNCHER``, set by the
  launcher for its ranks), for ranks whose parent outlives the launcher (Ray workers are children
  of the raylet; DeepSpeed's ``launch.py`` survives its runner). It only watches a launcher on this
  host; a rank on another node relies on its own launcher (one per node) or on Ray's job cleanup.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

log = logging.getLogger("latentpipe.train")
LAUNCHER_ENV = "LATENTPIPE_LAUNCHER"  # "PID@HOST@START": the launcher process the ranks watch
_PR_SET_PDEATHSIG = 1
_POLL_S = 1.0


# Resolved at import, so that a ``preexec_fn`` (run between fork and exec) calls no dynamic loader.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux; False elsewhere).

    Usable as a ``preexec_fn`` (between fork and exec): the setting survives ``exec``."""
    if _prctl is None:
        return False
    parent = os.getppid()
    if _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the setting took effect
        os.kill(os.getpid(), sig)
    return True


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def launcher_env() -> dict[str, str]:
    """The environment entry that lets ranks watch this process (the launcher)."""
    me = os.getpid()
    return {LAUNCHER_ENV: f"{me}@{socket.gethostname()}@{_start_time(me)}"}


def watch_launcher(value: str | None = None) -> threading.Thread | None:
    """Start a daemon thread that kills this rank once the launcher named by ``LATENTPIPE_LAUNCHER``
    (on this host) is gone; None when there is nothing to watch."""
    value = value if value is not None else os.environ.get(LAUNCHER_ENV)
    if not value:
        return None
    pid_s, host, start_s = value.split("@", 2)
    pid = int(pid_s)
    if host != socket.gethostname() or pid == os.getpid():
        return None
    started = None if start_s == "None" else float(start_s)

    def alive() -> bool:
        now = _start_time(pid)
        return now is not None and (started is None or abs(now - started) < 1.0)  # not a reused PID

    def run() -> None:
        stop = threading.Event()
        while alive():
            stop.wait(_POLL_S)
        log.error("launcher PID %d is gone: this rank (PID %d) exits", pid, os.getpid())
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=run, name="latentpipe-launcher-watchdog", daemon=True)
    t.start()
    return t


_SHM_BUFFER = re.compile(r"deepspeed_allreduce_buffer_(\d+)_127\.0\.0\.1_(\d+)_\d+")


def remove_stale_buffers(shm: Path = Path("/dev/shm")) -> list[Path]:
    """Delete DeepSpeed's CPU all-reduce buffers left in ``shm`` by this user's killed single-machine runs.

    Every rank of a multi-rank CPU run maps ``deepspeed_allreduce_buffer_<uid>_<store addr>_<port>_<rank>``
    (~70 MB) and unlinks it on a clean exit; a SIGKILLed rank cannot, and the memory stays taken
    until reboot. A buffer is stale when nothing listens on its run's loopback store port any more:
    ``latentpipe train`` hosts that store for the whole run, so a live run's buffers are never
    touched. Returns the removed files.
    """
    import psutil

    try:
        names = [p for p in shm.iterdir() if _SHM_BUFFER.fullmatch(p.name)]
    except OSError:
        return []
    if not names:
        return []
    live = {c.laddr.port for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0", "::")}
    removed, size = [], 0
    for p in names:
        m = _SHM_BUFFER.fullmatch(p.name)
        assert m is not None
        if int(m.group(1)) == os.getuid() and int(m.group(2)) not in live:
            try:
                n = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            removed.append(p)
            size += n
    if removed:
        log.warning("removed %d DeepSpeed buffers (%.0f MB of shared memory) left in %s by killed runs",
                    len(removed), size / 1e6, shm)
    return removed


def guard_rank() -> None:
    """In a rank: die with the parent (the launcher agent) and with the ``latentpipe train`` launcher."""
    die_with_parent()
    watch_launcher()
