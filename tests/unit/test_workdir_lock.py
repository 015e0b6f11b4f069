"""The workdir lock: a live holder refuses a second run naming it; stale locks (a dead PID on this
host, an expired heartbeat from another host) are taken over; the holder's heartbeat moves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentpipe.training import workdir_lock
from latentpipe.training.workdir_lock import LOCK_NAME, STALE_AFTER_S, WorkdirInUseError, WorkdirLock

ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys; from latentpipe.training.workdir_lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()"


def _record(work: Path) -> dict[str, object]:
    return json.loads((work / LOCK_NAME).read_text())


def test_live_holder_refuses_then_its_death_frees_the_workdir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(WorkdirInUseError, match=rf"in use by PID {holder.pid} on {socket.gethostname()} since 20"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: its record stays, naming a dead PID
        holder.wait()
    assert _record(tmp_path)["pid"] == holder.pid
    with WorkdirLock(tmp_path):
        assert _record(tmp_path)["pid"] == os.getpid()
    assert f"PID {holder.pid}" in caplog.text and "that process is gone" in caplog.text
    with WorkdirLock(tmp_path):  # released: free again
        pass


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": 4242, "host": "node-elsewhere", "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(WorkdirInUseError, match="in use by PID 4242 on node-elsewhere since 2026-01-01T00:00:00"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 5
    os.utime(path, (old, old))  # its heartbeat stopped: that host died
    with WorkdirLock(tmp_path):
        rec = _record(tmp_path)
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()


def test_heartbeat_touches_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    with WorkdirLock(tmp_path):
        path = tmp_path / LOCK_NAME
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.monotonic() + 60  # a wait limit, not a measured threshold
        while path.stat().st_mtime < old + 500:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
