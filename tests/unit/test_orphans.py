"""DeepSpeed's shared-memory buffers left by killed single-machine runs are removed; a live run's are not."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from latentpipe.training.orphans import remove_stale_buffers


def _buffer(shm: Path, port: int, rank: int, uid: int | None = None) -> Path:
    p = shm / f"deepspeed_allreduce_buffer_{os.getuid() if uid is None else uid}_127.0.0.1_{port}_{rank}"
    p.write_bytes(b"\0" * 4096)
    return p


def test_only_buffers_of_dead_stores_of_this_user_go(tmp_path: Path) -> None:
    with socket.socket() as live, socket.socket() as gone:
        live.bind(("127.0.0.1", 0))
        live.listen()
        gone.bind(("127.0.0.1", 0))  # a port nothing listens on once closed
        dead_port = gone.getsockname()[1]
        gone.close()
        kept = [_buffer(tmp_path, live.getsockname()[1], r) for r in (0, 1)]  # a running job's
        kept.append(_buffer(tmp_path, dead_port, 0, uid=os.getuid() + 1))  # another user's
        kept.append(tmp_path / "unrelated_file")
        kept[-1].write_text("x")
        stale = [_buffer(tmp_path, dead_port, r) for r in (0, 1)]
        assert sorted(remove_stale_buffers(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_buffers(tmp_path / "missing") == []
