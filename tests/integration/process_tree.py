"""A process and its descendants, seen through psutil: which are alive, and what they listen on."""

from __future__ import annotations

import contextlib

import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants now (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (zombies count as gone: they hold no resources but a PID)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of these processes."""
    names = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            names[p.pid] = p.name()
    return [(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in names]
