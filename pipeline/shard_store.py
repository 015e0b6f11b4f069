"""The shard store: shard plans, atomic shard writes, completion markers, resume.

Shared by every job that writes WebDataset shards (``shard`` for images, ``encode`` for latents).
The contract, on any pyarrow / fsspec filesystem:

- A shard is written as ``shard-NNNNNN.tar.tmp-<random>`` and becomes ``shard-NNNNNN.tar`` by one
  rename (webdataset's ``ShardWriter`` writes to the final name, so a crash would leave a
  valid-looking partial shard). Its ``shard-NNNNNN.stats.json`` is written *after* the rename:
  its presence, and only its presence, means the shard is complete. A retried task rewrites the
  same names, so retries never duplicate data.
- ``_plan.json`` is written before any shard: config, config hash, source fingerprint, shard
  count. A rerun with the same plan skips complete shards; a different plan is an error unless
  the caller asks to overwrite (which deletes the old shards first).
- Stats carry the accounting ``inputs = written + sum(skipped) + duplicates`` and the shard's
  index rows (columnar), from which ``pipeline/manifest.py`` assembles ``_index.parquet`` in
  shard order, so the index of a resumed run equals the index of a clean run.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from latentpipe.preprocessing.tar_format import (
    end_of_archive,
    group_members,
    read_ranges,
    sample_bytes,
    scan_tar,
)

SCHEMA_VERSION = 1
PLAN = "_plan.json"
INDEX = "_index.parquet"
MANIFEST = "_manifest.json"
MAX_ERRORS = 100  # skip details kept per shard (all skips are counted)
SHARD_RE = re.compile(r"^shard-(\d{6,})\.(tar|stats\.json)$")


class OutputMismatchError(ValueError):
    """The output folder holds a different plan (config or source) than this run's."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


@dataclass(frozen=True)
class ShardPlan:
    """Inputs ``[i*S, (i+1)*S)`` go to shard ``i``: stable for a given input listing."""

    num_inputs: int
    samples_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_inputs // self.samples_per_shard)

    def range(self, i: int) -> tuple[int, int]:
        start = i * self.samples_per_shard
        return start, min(start + self.samples_per_shard, self.num_inputs)


@dataclass
class ShardStats:
    """What one shard task did. ``index`` holds the written samples' rows, columnar."""

    shard: int
    input_range: list[int] = field(default_factory=lambda: [0, 0])
    inputs: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)   # first MAX_ERRORS skips, with details
    index: dict[str, list[Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str, **detail: Any) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"reason": reason, **detail})

    def check(self) -> None:
        """Raise if a sample went unaccounted: inputs = written + skipped + duplicates."""
        total = self.written + sum(self.skipped.values()) + self.duplicates
        if total != self.inputs:
            raise AssertionError(f"shard {self.shard}: {self.inputs} inputs but {total} accounted "
                                 f"({self.written} written, {self.skipped} skipped, {self.duplicates} duplicates)")

    def count(self, reasons: Callable[[str], bool]) -> int:
        return sum(n for r, n in self.skipped.items() if reasons(r))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["name"] = shard_name(self.shard)
        d["schema_version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardStats:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path, a pyarrow URI (s3://, gs://, hdfs://) or any fsspec URL."""
    if "://" not in url:
        return pafs.LocalFileSystem(), os.path.abspath(url)
    try:
        fs, path = pafs.FileSystem.from_uri(url)
        return fs, path
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        ffs, path = fsspec.core.url_to_fs(url)
        return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), path


class OutputDir:
    """A folder of shards with atomic writes; picklable by URL (Ray tasks rebuild it)."""

    def __init__(self, url: str) -> None:
        self.url = url if "://" in url else os.path.abspath(url)  # Ray workers have another cwd
        self.fs, self.root = _filesystem(self.url)
        self.root = self.root.rstrip("/")

    def __reduce__(self) -> tuple[type[OutputDir], tuple[str]]:
        return OutputDir, (self.url,)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def makedirs(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def exists(self, name: str) -> bool:
        return bool(self.fs.get_file_info(self.path(name)).type == pafs.FileType.File)

    def size(self, name: str) -> int:
        return int(self.fs.get_file_info(self.path(name)).size or 0)

    def names(self) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.File)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return bytes(f.read())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name).decode("utf-8"))

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically: a temporary name, then one rename."""
        tmp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(self.path(tmp)) as f:
            f.write(data)
        self.fs.move(self.path(tmp), self.path(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())

    def remove_temporaries(self) -> int:
        """Delete ``*.tmp-*`` files left by killed writers (call only when no writer runs)."""
        stale = [n for n in self.names() if ".tmp-" in n]
        for n in stale:
            self.fs.delete_file(self.path(n))
        return len(stale)

    # --------------------------------------------------------------------------- shards

    def tar(self, shard: int) -> AtomicTar:
        return AtomicTar(self, f"{shard_name(shard)}.tar")

    def stats_name(self, shard: int) -> str:
        return f"{shard_name(shard)}.stats.json"

    def read_stats(self, shard: int) -> ShardStats | None:
        name = self.stats_name(shard)
        try:
            return ShardStats.from_dict(self.read_json(name)) if self.exists(name) else None
        except (ValueError, TypeError, OSError):
            return None  # a damaged marker means an incomplete shard

    def write_stats(self, stats: ShardStats) -> None:
        """The completion marker: call only after the tar was committed."""
        stats.check()
        self.write_json(self.stats_name(stats.shard), stats.to_dict())

    def invalidate(self, shard: int) -> None:
        """Mark a shard incomplete (before rewriting it in place)."""
        self.delete(self.stats_name(shard))

    def complete_shards(self) -> set[int]:
        done = set()
        for n in self.names():
            m = SHARD_RE.match(n)
            if m and m.group(2) == "stats.json":
                done.add(int(m.group(1)))
        return done


class AtomicTar:
    """A WebDataset tar written under a temporary name and renamed into place by ``commit``.

    The bytes are ``latentpipe.preprocessing.tar_format.sample_bytes`` per sample, then the end-of-archive
    marker: exactly what ``tarfile`` writes in USTAR format with mtime 0, so the same samples
    give byte-identical tars.
    """

    def __init__(self, out: OutputDir, name: str) -> None:
        self.out, self.name = out, name
        self.tmp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"
        self._stream = out.fs.open_output_stream(out.path(self.tmp), buffer_size=1 << 20)
        self.offset = 0
        self.count = 0
        self._done = False

    def write(self, sample: Mapping[str, Any]) -> None:
        """``{"__key__": key, "jpg": bytes, "txt": bytes | str, ...}``; the key must not contain a dot."""
        data = sample_bytes(sample)
        self._stream.write(data)
        self.offset += len(data)
        self.count += 1

    def commit(self) -> int:
        """Close, rename into place; returns the tar size in bytes."""
        self._stream.write(end_of_archive(self.offset))
        self._stream.close()
        self.out.fs.move(self.out.path(self.tmp), self.out.path(self.name))
        self._done = True
        return self.out.size(self.name)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            try:
                self._stream.close()
            finally:
                self.out.delete(self.tmp)

    def __enter__(self) -> AtomicTar:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()  # no-op after commit


def rewrite_without(out: OutputDir, shard: int, drop: set[str]) -> int:
    """Rewrite ``shard``'s tar without the samples whose key is in ``drop``; returns its new size.

    The caller must ``invalidate`` the shard first and write its stats after: a crash in between
    leaves an incomplete shard that the next run redoes, never a silently inconsistent one.
    Members are copied as bytes, never decoded and never written to disk by name. The tar was
    written by ``AtomicTar`` and is complete (its marker exists): damage here is an error.
    """
    name = f"{shard_name(shard)}.tar"
    with out.fs.open_input_file(out.path(name)) as f, out.tar(shard) as dst:
        scan = scan_tar(f, out.size(name))
        samples, loose = group_members(scan.members)
        if scan.damage is not None or loose or any(s.problems for s in samples):
            raise ValueError(f"{out.path(name)}: {scan.damage or 'unexpected members'} {scan.detail}".strip())
        for s in samples:
            if s.key not in drop:
                exts = sorted(s.members)
                data = read_ranges(f, [(s.members[e].offset, s.members[e].size) for e in exts])
                dst.write({"__key__": s.key, **dict(zip(exts, data))})
        return dst.commit()


def prepare_output(out: OutputDir, plan: Mapping[str, Any], overwrite: bool) -> None:
    """Check or write ``_plan.json``. ``plan`` must hold ``config_hash`` and ``source_fingerprint``.

    A different existing plan raises ``OutputMismatchError`` unless ``overwrite``, which deletes
    the old shards, index and manifest first. Leftover temporaries are removed either way.
    """
    out.makedirs()
    if out.exists(PLAN):
        old = out.read_json(PLAN)
        same = all(old.get(k) == plan.get(k) for k in ("config_hash", "source_fingerprint", "num_shards"))
        if not same and not overwrite:
            what = [k for k in ("config_hash", "source_fingerprint", "num_shards") if old.get(k) != plan.get(k)]
            raise OutputMismatchError(
                f"{out.url} holds shards made with another {' and '.join(what).replace('_', ' ')} "
                f"(old {', '.join(str(old.get(k)) for k in what)}); pass --overwrite to replace them")
    if overwrite:
        clear_output(out)
    out.remove_temporaries()
    out.write_json(PLAN, {"schema_version": SCHEMA_VERSION, **plan})


def clear_output(out: OutputDir) -> None:
    for n in out.names():
        if SHARD_RE.match(n) or n in (PLAN, INDEX, MANIFEST) or ".tmp-" in n:
            out.fs.delete_file(out.path(n))


def shards_to_run(out: OutputDir, num_shards: int, redo: Callable[[ShardStats], bool] | None = None) -> list[int]:
    """Shards without a completion marker, plus complete ones for which ``redo(stats)`` is true."""
    done = out.complete_shards()
    todo = []
    for i in range(num_shards):
        if i not in done:
            todo.append(i)
        elif redo is not None:
            st = out.read_stats(i)
            if st is None or redo(st):
                todo.append(i)
    return todo


__all__ = [
    "INDEX", "MANIFEST", "PLAN", "SCHEMA_VERSION", "SHARD_RE", "AtomicTar", "OutputDir", "OutputMismatchError",
    "ShardPlan", "ShardStats", "clear_output", "prepare_output", "rewrite_without", "shard_name", "shards_to_run",
]
