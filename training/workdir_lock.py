"""One training per workdir: ``<workdir>/train.lock``, taken by ``latentpipe train`` before any rank starts.

The lock is an exclusive ``flock(2)`` on the file, held for the whole run, plus a JSON record of the
holder (PID, host, start time) and a heartbeat (the file's mtime, touched every ``HEARTBEAT_S``).
- Same host: the kernel releases a ``flock`` when its holder dies, so a lock file naming a dead PID
  on this host is stale and is taken over.
- Another host (a workdir on a shared filesystem, where ``flock`` may not reach across machines): the
  record is live while its heartbeat is younger than ``STALE_AFTER_S``, and taken over after that.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("latentpipe.train")
LOCK_NAME = "train.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class WorkdirInUseError(RuntimeError):
    """Another live run holds the workdir."""


def _describe(rec: dict[str, Any]) -> str:
    return f"PID {rec.get('pid')} on {rec.get('host')} since {rec.get('since')}"


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        rec = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for this process; ``WorkdirInUseError`` if a
    live run holds it ("workdir in use by PID N on HOST since T")."""

    def __init__(self, workdir: str | Path, name: str = LOCK_NAME) -> None:
        self.path = Path(workdir) / name
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process holds it (on this host, or where flock reaches)
                raise WorkdirInUseError(f"workdir {self.path.parent} in use by {_describe(_read(fd))}") from None
            rec = _read(fd)
            host = socket.gethostname()
            if rec and rec.get("host") != host:
                age = time.time() - os.fstat(fd).st_mtime
                if age < STALE_AFTER_S:
                    raise WorkdirInUseError(f"workdir {self.path.parent} in use by {_describe(rec)} "
                                            f"(heartbeat {age:.0f}s ago)")
                log.warning("%s: taking over a stale lock of %s (no heartbeat for %.0fs)", self.path,
                            _describe(rec), age)
            elif rec:
                log.warning("%s: taking over a stale lock of %s (that process is gone)", self.path, _describe(rec))
            since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            data = json.dumps({"pid": os.getpid(), "host": host, "since": since}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="latentpipe-workdir-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # the file stays (removing it would race a waiting opener)
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
