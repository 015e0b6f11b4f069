"""Atomic, complete-or-absent training checkpoints with keep-last-K (torchtitan-style markers).

Layout of ``<dir>/step-000123/``::

    <part>/...               DeepSpeed's own checkpoint of each engine (save_checkpoint(tag=<part>))
    ema/rank-R.safetensors   this rank's EMA fragments (training/ema.py), if the EMA has started
    rng/rank-R.json          python / numpy / torch (/ cuda) RNG states of rank R
    trainer_state.json       step, world size, data-stream state, counters, EMA state
    COMPLETE                 written by rank 0 after every rank finished and the files are synced:
                             the step and every other file's size and sha256

All ranks write into ``step-000123.tmp/``; after a barrier rank 0 fsyncs the files, hashes
each once (streamed), writes ``COMPLETE``, renames the folder into place and prunes old
ones. A checkpoint counts only with the marker under its final name, so a save killed
half-way (a ``.tmp`` folder, or a folder without marker) is never chosen. DeepSpeed's
``latest`` file is not written or used.

Resume (``select_resume``) takes the newest complete checkpoint whose files all match their
digests (no file missing, truncated, changed or added); a damaged one is skipped with a
warning naming the file, and when none is intact the error names the newest one's bad file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
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

from latentpipe.training import safe_load
from latentpipe.training.safe_load import CheckpointFileError

log = logging.getLogger("latentpipe.train")

MARKER = "COMPLETE"
STATE = "trainer_state.json"
SCHEMA_VERSION = 1
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    state: dict[str, Any]
    files: dict[str, list[Any]] | None = None  # relative path -> [size, sha256]; None: written without digests


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _read_marker(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(state, dict):
        return None
    if marker.get("step") != state.get("step") or state.get("schema_version") != SCHEMA_VERSION:
        return None
    return marker, state


def list_complete(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first (folders without a valid marker are ignored)."""
    out: list[CheckpointInfo] = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if not m or not p.is_dir():
            continue
        read = _read_marker(p)
        if read is not None and read[1]["step"] == int(m.group(1)):
            files = read[0].get("files")
            out.append(CheckpointInfo(int(m.group(1)), p, read[1], files if isinstance(files, dict) else None))
    return sorted(out, key=lambda c: c.step)


def latest_complete(root: Path) -> CheckpointInfo | None:
    found = list_complete(root)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file below ``folder`` but the marker, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MARKER)


def digests(folder: Path) -> dict[str, list[Any]]:
    """relative path -> [size, sha256] of every file of a checkpoint folder (each read once, streamed)."""
    return {rel: [(folder / rel).stat().st_size, _sha256(folder / rel)] for rel in _files(folder)}


def verify(info: CheckpointInfo) -> str | None:
    """The first problem of a complete checkpoint's files against its digests ("<file>: why"), or None."""
    if info.files is None:
        return None
    for rel, (size, sha) in sorted(info.files.items()):
        path = info.path / rel
        if not path.is_file():
            return f"{path}: missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path}: {actual} bytes, {size} when saved ({'truncated' if actual < size else 'grown'})"
        if _sha256(path) != sha:
            return f"{path}: sha256 differs from the one recorded when it was saved (corrupted or changed)"
    extra = sorted(set(_files(info.path)) - set(info.files))
    return f"{info.path / extra[0]}: not part of the checkpoint when it was saved" if extra else None


def check(info: CheckpointInfo) -> str | None:
    """``verify``, then a read of every file the trainer reads back, as it reads it: ``.pt`` files
    weights-only (memory-mapped), safetensors headers, JSON. The first problem, or None."""
    from safetensors import safe_open

    problem = verify(info)
    if problem is not None:
        return problem
    for rel in _files(info.path):
        path = info.path / rel
        try:
            if path.suffix == ".pt":
                safe_load.load(str(path), "cpu", mmap=True)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    fh.metadata()
            elif path.suffix == ".json" or path.name == STATE:
                json.loads(path.read_text(encoding="utf-8"))
        except CheckpointFileError as e:
            return str(e)
        except Exception as e:  # safetensors' header errors, UnicodeDecodeError, JSONDecodeError
            return f"{path}: unreadable ({type(e).__name__}: {str(e).strip()[:120]})"
    return None


class CheckpointError(CheckpointFileError):
    """No usable checkpoint (the message names the bad file)."""


def select_resume(root: Path) -> CheckpointInfo:
    """The newest complete checkpoint whose files match their digests.

    A damaged one is skipped with a warning naming its bad file and, once an older intact one
    is found, renamed to ``step-N.damaged`` (so the resumed run saves that step anew); raises ``CheckpointError`` when there is none, naming the newest one's bad file.
    """
    found = list_complete(root)
    if not found:
        raise CheckpointError(f"--resume: no complete checkpoint under {root}")
    problems: list[str] = []
    damaged: list[Path] = []
    for info in reversed(found):
        problem = verify(info)
        if problem is None:
            if info.files is None:
                log.warning("checkpoint %s has no digests (saved by an older latentpipe): not verified", info.path)
            for path in damaged:  # kept for inspection, no longer counted (the run saves those steps anew)
                path.rename(path.with_name(path.name + ".damaged"))
                log.warning("moved the damaged checkpoint aside to %s.damaged", path)
            if problems:
                log.warning("resuming from the older checkpoint %s", info.path)
            return info
        log.warning("checkpoint %s is damaged, not used: %s", info.path, problem)
        problems.append(problem)
        damaged.append(info.path)
    raise CheckpointError(f"--resume: no intact checkpoint under {root}: {problems[0]}"
                          + (f" (and {len(problems) - 1} older damaged)" if len(problems) > 1 else ""))


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
        marker = {"step": step, "files": digests(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True), encoding="utf-8")
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
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
        set_rng_state(state)
    except (ValueError, TypeError, KeyError, IndexError) as e:  # not our JSON (e.g. a pickle in its place)
        raise CheckpointFileError(f"{p}: not an RNG state ({type(e).__name__}: {str(e)[:120]})") from None
    return True


__all__ = [
    "MARKER",
    "CheckpointError",
    "check",
    "digests",
    "select_resume",
    "verify",
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
