"""Atomic, complete-or-absent training checkpoints with keep-last-K (torchtitan-style markers).

Layout of ``<dir>/step-000123/``::

    <part>/...               DeepSpeed's own checkpoint of each engine (save_checkpoint(tag=<part>))
    ema/rank-R.safetensors   this rank's EMA fragments (training/ema.py), if the EMA has started
    rng/rank-R.json          python / numpy / torch (/ cuda) RNG states of rank R
    trainer_state.json       step, world size, data-stream state, counters, EMA state
    COMPLETE                 written by rank 0 after every rank finished and the files are synced

All ranks write into ``step-000123.tmp/``; after a barrier rank 0 fsyncs the files, writes
``COMPLETE``, renames the folder into place and prunes old ones. A checkpoint counts only
with the marker under its final name, so a save killed half-way (a ``.tmp`` folder, or a
folder without marker) is never chosen. DeepSpeed's ``latest`` file is not written or used.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"
STATE = "trainer_state.json"
SCHEMA_VERSION = 1
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    state: dict[str, Any]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(state, dict):
        return None
    if marker.get("step") != state.get("step") or state.get("schema_version") != SCHEMA_VERSION:
        return None
    return state


def list_complete(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first (folders without a valid marker are ignored)."""
    out: list[CheckpointInfo] = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if not m or not p.is_dir():
            continue
        state = _read_marker(p)
        if state is not None and state["step"] == int(m.group(1)):
            out.append(CheckpointInfo(int(m.group(1)), p, state))
    return sorted(out, key=lambda c: c.step)


def latest_complete(root: Path) -> CheckpointInfo | None:
    found = list_complete(root)
    return found[-1] if found else None


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(root: Path, step: int, state: dict[str, Any], write: Callable[[Path], None],
                    keep_last: int) -> Path:
    """Collective: every rank calls ``write(tmp_folder)`` to add its files; rank 0 then seals it.

    ``state`` (rank 0's) goes to ``trainer_state.json``. Returns the final folder.
    """
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    write(tmp)
    _barrier()
    if _rank() == 0:
        payload = {"schema_version": SCHEMA_VERSION, "step": step, "time": time.time(), **state}
        (tmp / STATE).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step}), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale ``.tmp`` folders."""
    complete = list_complete(root)
    for old in complete[:-keep_last]:
        old.path.rename(old.path.with_name(old.path.name + ".del"))  # no longer counts, then remove
        shutil.rmtree(old.path.with_name(old.path.name + ".del"), ignore_errors=True)
    for p in root.iterdir():
        if p.name.endswith((".tmp", ".del")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# -- RNG state (JSON: never unpickled) -----------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    py = random.getstate()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[x for x in np_state[2:]]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


def save_rng(folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank:05d}.json").write_text(json.dumps(rng_state()), encoding="utf-8")


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has no file for this rank."""
    p = folder / f"rank-{rank:05d}.json"
    if not p.is_file():
        return False
    set_rng_state(json.loads(p.read_text(encoding="utf-8")))
    return True


__all__ = [
    "MARKER",
    "STATE",
    "CheckpointInfo",
    "latest_complete",
    "list_complete",
    "load_rng",
    "prune",
    "rng_state",
    "save_checkpoint",
    "save_rng",
    "set_rng_state",
    "step_dir",
]
