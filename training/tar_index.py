"""Random access into WebDataset tars: an index of member names and byte ranges.

A WebDataset shard is a plain POSIX tar whose consecutive members ``<key>.<ext>`` form one
sample. Reading it front to back (``webdataset.WebDataset``) makes a resumable, rank-exact
order expensive; instead each tar is indexed once from its headers (Python's ``tarfile``
reads only the 512-byte headers and seeks over the data) and a sample is then a handful
of byte ranges, read with one ``seek`` + ``read`` (the idea of webdataset's ``wids``).

Damage is found while indexing and reported, never raised: a tar cut short (no
end-of-archive blocks, a member running past the end of the file, a garbled header) keeps
its intact members, drops the sample that was being written when it broke, and counts
``tar_truncated`` / ``sample_truncated``. An unreadable tar counts ``tar_unreadable``.

Indexes are cached (``$LATENTPIPE_CACHE`` or ``~/.cache/latentpipe``, keyed by the tar's
path, size and mtime) as ``.npz`` files read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from webdataset.tariterators import base_plus_ext

log = logging.getLogger("latentpipe.data")

BLOCK = 512
INDEX_VERSION = 1


@dataclass
class TarIndex:
    """The regular-file members of one tar that lie wholly inside the file.

    Attributes:
        path: the tar's path or URL.
        names: member names, in tar order.
        offsets: byte offset of each member's data, int64 [M].
        sizes: byte size of each member's data, int64 [M].
        problems: damage found while indexing, reason -> count.
    """

    path: str
    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    problems: Counter[str] = field(default_factory=Counter)


def open_binary(path: str) -> IO[bytes]:
    """Open a local path or an fsspec URL (``s3://...``) for seekable binary reads."""
    if "://" in path and not path.startswith("file://"):
        import fsspec  # only for remote stores

        return fsspec.open(path, "rb").open()  # type: ignore[no-any-return]
    return open(path.removeprefix("file://"), "rb")


def _file_size(f: IO[bytes]) -> int:
    f.seek(0, io.SEEK_END)
    return f.tell()


def scan_tar(path: str) -> TarIndex:
    """Index ``path`` from its headers; damage is counted in ``problems``, never raised."""
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    problems: Counter[str] = Counter()
    truncated = False
    try:
        with open_binary(path) as f:
            size = _file_size(f)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tf:
                while True:
                    try:
                        ti = tf.next()
                    except tarfile.TarError as e:  # a garbled header or data cut short
                        log.warning("%s: damaged after %d members: %s", path, len(names), e)
                        truncated = True
                        break
                    if ti is None:
                        break
                    if ti.offset_data + ti.size > size:
                        truncated = True
                        break
                    if ti.isfile():
                        names.append(ti.name)
                        offsets.append(ti.offset_data)
                        sizes.append(ti.size)
                    elif not ti.isdir():
                        problems["member_not_a_file"] += 1
                end = tf.offset  # where the end-of-archive blocks must start
                if not truncated:
                    f.seek(end)
                    end_blocks = f.read(2 * BLOCK)
                    truncated = len(end_blocks) < 2 * BLOCK or end_blocks.count(0) != len(end_blocks)
    except (OSError, tarfile.TarError) as e:
        log.warning("%s: unreadable tar: %s", path, e)
        problems["tar_unreadable"] += 1
        return TarIndex(path, [], np.zeros(0, np.int64), np.zeros(0, np.int64), problems)
    if truncated:
        problems["tar_truncated"] += 1
        # The last sample may have lost members after the cut: it is kept only when it has
        # the extensions of the sample before it.
        split = [base_plus_ext(n) for n in names]
        tail = len(split)  # split[tail:] is the last sample, split[head:tail] the one before
        while tail > 0 and split[tail - 1][0] == split[-1][0]:
            tail -= 1
        head = tail
        while head > 0 and split[head - 1][0] == split[tail - 1][0]:
            head -= 1
        if tail > 0 and {e for _, e in split[tail:]} != {e for _, e in split[head:tail]}:
            del names[tail:], offsets[tail:], sizes[tail:]
            problems["sample_truncated"] += 1
    return TarIndex(path, names, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), problems)


def _cache_file(path: str, cache_dir: Path) -> Path | None:
    """The cache file for a local tar (by absolute path, size, mtime); None for URLs."""
    if "://" in path and not path.startswith("file://"):
        return None
    p = Path(path.removeprefix("file://")).resolve()
    try:
        st = p.stat()
    except OSError:
        return None
    ident = f"v{INDEX_VERSION}|{p}|{st.st_size}|{st.st_mtime_ns}"
    return cache_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.npz"


def default_cache_dir() -> Path:
    """``$LATENTPIPE_CACHE/tar_index`` or ``~/.cache/latentpipe/tar_index``."""
    root = os.environ.get("LATENTPIPE_CACHE") or os.path.join(Path.home(), ".cache", "latentpipe")
    return Path(root) / "tar_index"


def _save(idx: TarIndex, dest: Path) -> None:
    """Write atomically (a unique temp file renamed into place): ranks may race here."""
    reasons = sorted(idx.problems)
    arrays: dict[str, Any] = {
        "names": np.asarray(idx.names, dtype=np.str_),
        "offsets": idx.offsets,
        "sizes": idx.sizes,
        "reasons": np.asarray(reasons, dtype=np.str_),
        "counts": np.asarray([idx.problems[r] for r in reasons], np.int64),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, dest)


def _load(path: str, src: Path) -> TarIndex:
    with np.load(src, allow_pickle=False) as z:
        problems = Counter({str(r): int(c) for r, c in zip(z["reasons"], z["counts"])})
        return TarIndex(path, [str(n) for n in z["names"]], z["offsets"].astype(np.int64),
                        z["sizes"].astype(np.int64), problems)


def index_tar(path: str, cache_dir: Path | None = None) -> TarIndex:
    """The index of ``path``, from the cache when the tar is unchanged, else scanned (and cached)."""
    cache = _cache_file(path, cache_dir or default_cache_dir())
    if cache is not None and cache.is_file():
        try:
            return _load(path, cache)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable tar index cache %s: %s", cache, e)
    idx = scan_tar(path)
    if cache is not None and "tar_unreadable" not in idx.problems:
        try:
            _save(idx, cache)
        except OSError as e:  # a read-only home is fine: we just rescan next time
            log.debug("cannot cache tar index at %s: %s", cache, e)
    return idx


def group_samples(idx: TarIndex) -> tuple[list[str], list[dict[str, tuple[int, int]]], Counter[str]]:
    """Group members into samples by key (webdataset's ``base_plus_ext`` split).

    Returns (keys, members, problems): ``members[i]`` maps extension -> (offset, size) for
    ``keys[i]``. Keys appear in tar order. A repeated ``<key>.<ext>`` member keeps the
    first one and counts ``member_duplicate``; names without an extension count
    ``member_without_extension``.
    """
    keys: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    where: dict[str, int] = {}
    problems: Counter[str] = Counter()
    for name, off, size in zip(idx.names, idx.offsets.tolist(), idx.sizes.tolist()):
        key, ext = base_plus_ext(name)
        if key is None:
            problems["member_without_extension"] += 1
            continue
        i = where.get(key)
        if i is None:
            where[key] = i = len(keys)
            keys.append(key)
            members.append({})
        if ext in members[i]:
            problems["member_duplicate"] += 1
            continue
        members[i][ext] = (off, size)
    return keys, members, problems


def read_ranges(f: IO[bytes], ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """Read byte ranges ``(offset, size)``; one read when they are close together.

    A sample's members are consecutive in its tar, separated by 512-byte headers, so
    one span read replaces one read per member.
    """
    rs = list(ranges)
    if not rs:
        return []
    lo = min(o for o, _ in rs)
    hi = max(o + s for o, s in rs)
    payload = sum(s for _, s in rs)
    if hi - lo <= payload + 4 * BLOCK * len(rs):
        f.seek(lo)
        span = f.read(hi - lo)
        if len(span) != hi - lo:
            raise OSError(f"short read: {len(span)} of {hi - lo} bytes at {lo}")
        return [span[o - lo:o - lo + s] for o, s in rs]
    out = []
    for o, s in rs:
        f.seek(o)
        b = f.read(s)
        if len(b) != s:
            raise OSError(f"short read: {len(b)} of {s} bytes at {o}")
        out.append(b)
    return out
