"""Checkpoint folders: only complete (marker + final name) ones count; keep-last-K; RNG state round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import (
    MARKER,
    STATE,
    latest_complete,
    list_complete,
    load_rng,
    save_checkpoint,
    save_rng,
    step_dir,
)


def _save(root: Path, step: int, keep: int = 10) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(b"x" * 10)

    return save_checkpoint(root, step, {"world_size": 1, "parts": ["model"]}, write, keep)


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    assert latest_complete(root) is None
    _save(root, 2)
    _save(root, 4)
    # A save killed half-way: a .tmp folder, and a folder renamed without its marker.
    half = step_dir(root, 6).with_name("step-000006.tmp")
    half.mkdir()
    (half / STATE).write_text(json.dumps({"schema_version": 1, "step": 6}))
    nomarker = step_dir(root, 8)
    nomarker.mkdir()
    (nomarker / STATE).write_text(json.dumps({"schema_version": 1, "step": 8}))
    # A marker that disagrees with the state, and a garbled state.
    bad = step_dir(root, 10)
    bad.mkdir()
    (bad / STATE).write_text(json.dumps({"schema_version": 1, "step": 9}))
    (bad / MARKER).write_text(json.dumps({"step": 10}))
    garbled = step_dir(root, 12)
    garbled.mkdir()
    (garbled / STATE).write_text("{not json")
    (garbled / MARKER).write_text(json.dumps({"step": 12}))
    latest = latest_complete(root)
    assert latest is not None and latest.step == 4 and latest.state["parts"] == ["model"]
    assert [c.step for c in list_complete(root)] == [2, 4]


def test_keep_last_prunes_old_and_stale(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    (root / "step-000001.tmp").mkdir(parents=True)  # left by a crash
    for s in range(1, 6):
        _save(root, s, keep=2)
    assert [c.step for c in list_complete(root)] == [4, 5]
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]
    assert (root / "step-000005" / "model" / "weights.bin").read_bytes() == b"x" * 10
    _save(root, 5, keep=2)  # re-saving a step replaces it
    assert [c.step for c in list_complete(root)] == [4, 5]


def test_rng_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_rng(tmp_path, 0)
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert load_rng(tmp_path, 0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])
    assert not load_rng(tmp_path, 1)  # no state saved for a rank that did not exist
