"""A shard folder's documents: ``_index.parquet``, ``_manifest.json``, summed accounting, the summary table.

Written by the shard and encode jobs once every shard of ``pipeline/shard_store.py`` is complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from latentpipe.pipeline.shard_store import INDEX, MANIFEST, SCHEMA_VERSION, OutputDir, ShardStats


def write_index(out: OutputDir, stats: Sequence[ShardStats], schema: pa.Schema) -> int:
    """``_index.parquet``: every shard's index rows in shard order; returns the row count."""
    tables = [pa.table({name: st.index.get(name, []) for name in schema.names}, schema=schema)
              for st in sorted(stats, key=lambda s: s.shard)]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    out.write_bytes(INDEX, buf.getvalue().to_pybytes())
    return int(table.num_rows)


def totals(stats: Iterable[ShardStats]) -> dict[str, Any]:
    """Summed accounting over shards."""
    t: dict[str, Any] = {"inputs": 0, "written": 0, "skipped": {}, "duplicates": 0, "bytes": 0, "seconds": 0.0}
    for st in stats:
        for k in ("inputs", "written", "duplicates", "bytes"):
            t[k] += getattr(st, k)
        t["seconds"] += st.seconds
        for r, n in st.skipped.items():
            t["skipped"][r] = t["skipped"].get(r, 0) + n
    t["skipped"] = dict(sorted(t["skipped"].items()))
    t["seconds"] = round(t["seconds"], 3)
    return t


def write_manifest(out: OutputDir, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``_manifest.json`` (schema_version and creation time added); the dataset is final once it exists."""
    doc = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **manifest}
    out.write_json(MANIFEST, doc)
    return doc


def summary_table(stats: Sequence[ShardStats], wall_seconds: float) -> str:
    """A plain-text end-of-run table: totals and every skip reason."""
    t = totals(stats)
    rows = [("shards", f"{len(stats)}"), ("inputs", f"{t['inputs']:,}"), ("written", f"{t['written']:,}"),
            ("duplicates", f"{t['duplicates']:,}")]
    rows += [(f"skipped: {r}", f"{n:,}") for r, n in t["skipped"].items()]
    rows += [("bytes written", f"{t['bytes']:,}"), ("wall time", f"{wall_seconds:,.1f} s"),
             ("samples/s", f"{t['written'] / max(wall_seconds, 1e-9):,.1f}")]
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    body = [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
    return "\n".join([line, *body, line])


__all__ = ["summary_table", "totals", "write_index", "write_manifest"]
