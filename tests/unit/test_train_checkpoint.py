"""Checkpoint folders: only complete (marker + final name) ones count; keep-last-K; RNG state round trip;
per-file digests and the fallback they drive; weights-only reads that refuse code."""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentpipe.training import safe_load
from latentpipe.training.checkpoint import (
    MARKER,
    STATE,
    CheckpointError,
    check,
    latest_complete,
    list_complete,
    load_rng,
    save_checkpoint,
    save_rng,
    select_resume,
    step_dir,
    verify,
)
from latentpipe.training.safe_load import CheckpointFileError, UnsafeCheckpointError, weights_only_loads


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


# -- digests, fallback, weights-only reads ---------------------------------------------------------


class Exploit:
    """Unpickling this runs ``open(marker, "w")``: the marker file appears if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _save_pt(root: Path, step: int, keep: int = 10) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        torch.save({"module": {"w": torch.full((64,), float(step))}}, tmp / "model" / "states.pt")
        save_rng(tmp / "rng", 0)

    return save_checkpoint(root, step, {"world_size": 1, "parts": ["model"]}, write, keep)


def test_marker_records_every_file_digest_and_verify_names_the_bad_file(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    path = _save_pt(root, 3)
    marker = json.loads((path / MARKER).read_text())
    assert sorted(marker["files"]) == ["model/states.pt", "rng/rank-00000.json", STATE]
    info = latest_complete(root)
    assert info is not None and verify(info) is None and check(info) is None
    pt = path / "model" / "states.pt"
    data = pt.read_bytes()
    pt.write_bytes(data[:-100])
    assert verify(info) == f"{pt}: {len(data) - 100} bytes, {len(data)} when saved (truncated)"
    pt.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert verify(info) == f"{pt}: sha256 differs from the one recorded when it was saved (corrupted or changed)"
    pt.write_bytes(data)
    (path / "model" / "extra.pt").write_bytes(b"x")
    assert verify(info) == f"{path / 'model' / 'extra.pt'}: not part of the checkpoint when it was saved"
    (path / "model" / "extra.pt").unlink()
    (path / "rng" / "rank-00000.json").unlink()
    assert verify(info) == f"{path / 'rng' / 'rank-00000.json'}: missing"


def test_resume_falls_back_to_the_newest_intact_checkpoint_then_fails_naming_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ck"
    for s in (1, 2, 3):
        _save_pt(root, s)
    assert select_resume(root).step == 3
    bad3 = step_dir(root, 3) / "model" / "states.pt"
    bad3.write_bytes(bad3.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="latentpipe.train"):
        assert select_resume(root).step == 2
    assert f"{bad3}: " in caplog.text and "truncated" in caplog.text
    assert step_dir(root, 3).with_name("step-000003.damaged").is_dir()  # aside: no longer counted
    assert [c.step for c in list_complete(root)] == [1, 2]
    shutil.move(str(step_dir(root, 3).with_name("step-000003.damaged")), str(step_dir(root, 3)))
    for s in (1, 2):
        f = step_dir(root, s) / "model" / "states.pt"
        data = f.read_bytes()
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=rf"^--resume: no intact checkpoint under .*: {re.escape(str(bad3))}: "
                                              r".*truncated.*\(and 2 older damaged\)$"):
        select_resume(root)


def test_weights_only_loads_refuse_code_in_checkpoint_files(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    pt = tmp_path / "model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Exploit(marker)}, pt)
    torch.load(pt, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    why = r"refused to load \(it holds more than tensors: Unsupported global: GLOBAL io.open\)$"
    with pytest.raises(UnsafeCheckpointError, match=rf"^{re.escape(str(pt))}: {why}"):
        safe_load.load(str(pt))
    # What DeepSpeed and ds_to_universal call, weights_only=False and all:
    with weights_only_loads(), pytest.raises(UnsafeCheckpointError, match=re.escape(str(pt))):
        torch.load(pt, map_location="cpu", weights_only=False)
    assert torch.load is safe_load._torch_load  # restored on exit
    raw = tmp_path / "optim_states.pt"
    raw.write_bytes(pickle.dumps(Exploit(marker)))  # a raw pickle, not a torch zip file
    with weights_only_loads(), pytest.raises(CheckpointFileError, match=re.escape(str(raw))):
        torch.load(raw, weights_only=False)
    rng = tmp_path / "rng"
    rng.mkdir()
    (rng / "rank-00000.json").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointFileError, match=rf"^{re.escape(str(rng / 'rank-00000.json'))}: not an RNG state"):
        load_rng(rng, 0)
    assert not marker.exists()
    ok = tmp_path / "ok.pt"
    torch.save({"module": {"w": torch.ones(2)}}, ok)
    with weights_only_loads():
        assert torch.equal(torch.load(ok, weights_only=False)["module"]["w"], torch.ones(2))
