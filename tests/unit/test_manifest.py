"""Shard-output machinery shared by the shard and encode jobs: atomic tars, markers, plans, resume."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentpipe.pipeline.manifest import summary_table, totals, write_index
from latentpipe.pipeline.shard_store import (
    PLAN,
    OutputDir,
    OutputMismatchError,
    ShardPlan,
    ShardStats,
    prepare_output,
    rewrite_without,
    shards_to_run,
)


def _samples(n: int) -> list[dict[str, object]]:
    return [{"__key__": f"{i:09d}", "jpg": os.urandom(i * 3701 % 20000), "txt": f"caption é {i}", "json": b"{}"}
            for i in range(n)]


def _tarfile_bytes(samples: list[dict[str, object]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                v = s[ext]
                data = v.encode() if isinstance(v, str) else v
                assert isinstance(data, bytes)
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "bigdata", "bigdata"
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_atomic_tar_is_invisible_until_commit_and_byte_identical_to_tarfile(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    samples = _samples(30)
    with out.tar(7) as t:
        for s in samples:
            t.write(s)
        assert not (tmp_path / "shard-000007.tar").exists()
        assert [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        size = t.commit()
    data = (tmp_path / "shard-000007.tar").read_bytes()
    assert data == _tarfile_bytes(samples) and size == len(data)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    import webdataset as wds  # the trainer's reader sees the same samples

    got = list(wds.WebDataset(str(tmp_path / "shard-000007.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    assert got[3]["txt"] == "caption é 3".encode()


def test_aborted_tar_leaves_nothing_and_bad_keys_are_refused(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    with pytest.raises(RuntimeError), out.tar(0) as t:
        t.write(_samples(1)[0])
        raise RuntimeError("crash mid-shard")
    assert os.listdir(tmp_path) == []
    with out.tar(0) as t:
        for bad in ("a.b", "dir/x", ""):
            with pytest.raises(ValueError):
                t.write({"__key__": bad, "txt": b"x"})


def test_stats_accounting_and_markers(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    st = ShardStats(2, [10, 15], inputs=5, written=2, duplicates=1)
    st.skip("corrupt", index=11)
    with pytest.raises(AssertionError, match="5 inputs but 4 accounted"):
        out.write_stats(st)
    st.skip("timeout", index=12)
    out.write_stats(st)
    assert out.complete_shards() == {2}
    back = out.read_stats(2)
    assert back is not None and back.skipped == {"corrupt": 1, "timeout": 1} and back.errors[0]["index"] == 11
    (tmp_path / "shard-000003.stats.json").write_text("{broken")
    assert out.read_stats(3) is None  # unreadable: the job deletes it at finalize (then it is redone)
    assert shards_to_run(out, 4) == [0, 1]  # presence is the marker: no full read of every stats file
    assert shards_to_run(out, 4, redo=lambda s: "timeout" in s.skipped) == [0, 1, 2, 3]
    t = totals([st, ShardStats(0, inputs=3, written=3)])
    assert t["inputs"] == 8 and t["written"] == 5 and t["skipped"] == {"corrupt": 1, "timeout": 1}
    table = summary_table([st], 2.0)
    assert "skipped: timeout" in table and "inputs" in table


def test_plan_mismatch_needs_overwrite(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "images"))
    plan = {"config_hash": "a", "source_fingerprint": "f", "num_shards": 2}
    prepare_output(out, plan, overwrite=False)
    with out.tar(0) as t:
        t.write(_samples(1)[0])
        t.commit()
    (tmp_path / "images" / "shard-000001.tar.tmp-deadbeef").write_bytes(b"partial")
    prepare_output(out, plan, overwrite=False)  # same plan: keeps shards, drops temporaries
    assert out.names() == [PLAN, "shard-000000.tar"]
    with pytest.raises(OutputMismatchError, match="config hash.*--overwrite"):
        prepare_output(out, {**plan, "config_hash": "b"}, overwrite=False)
    with pytest.raises(OutputMismatchError, match="source fingerprint"):
        prepare_output(out, {**plan, "source_fingerprint": "g"}, overwrite=False)
    prepare_output(out, {**plan, "config_hash": "b"}, overwrite=True)
    assert out.names() == [PLAN] and out.read_json(PLAN)["config_hash"] == "b"


def test_rewrite_without_and_index(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    samples = _samples(6)
    with out.tar(1) as t:
        for s in samples:
            t.write(s)
        t.commit()
    size = rewrite_without(out, 1, {"000000002", "000000004"})
    kept = [s for s in samples if s["__key__"] not in ("000000002", "000000004")]
    assert (tmp_path / "shard-000001.tar").read_bytes() == _tarfile_bytes(kept) and size > 0
    schema = pa.schema([("key", pa.string()), ("shard", pa.int64())])
    stats = [ShardStats(1, index={"key": ["c"], "shard": [1]}), ShardStats(0, index={"key": ["a", "b"], "shard": [0, 0]})]
    assert write_index(out, stats, schema) == 3
    assert pq.read_table(tmp_path / "_index.parquet").column("key").to_pylist() == ["a", "b", "c"]


def test_plan_ranges_and_an_fsspec_filesystem() -> None:
    plan = ShardPlan(25, 10)
    assert plan.num_shards == 3 and [plan.range(i) for i in range(3)] == [(0, 10), (10, 20), (20, 25)]
    out = OutputDir("memory://latentpipe-test/images")  # the generic (non-local) code path
    out.makedirs()
    with out.tar(0) as t:
        t.write(_samples(1)[0])
        t.commit()
    out.write_stats(ShardStats(0, inputs=1, written=1))
    assert out.complete_shards() == {0} and out.read_bytes("shard-000000.tar")[:9] == b"000000000"
