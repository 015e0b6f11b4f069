"""Random access into WebDataset tars: shard lists, member byte ranges, the sample index.

A WebDataset shard is a plain POSIX tar whose consecutive members ``<key>.<ext>`` form one
sample. Reading it front to back (``webdataset.WebDataset``) makes a resumable, rank-exact
order expensive; instead each tar is indexed once from its headers (Python's ``tarfile``
reads only the 512-byte headers and seeks over the data) and a sample is then a handful
of byte ranges, read with one ``seek`` + ``read`` (the idea of webdataset's ``wids``).

Damage is found while indexing and reported, never raised, in the vocabulary of
``preprocessing/tar_format.py`` (which also owns the member scan and the key rule): a tar cut
short keeps its intact members, drops the sample that was being written when it broke, and
counts ``tar_truncated`` / ``sample_truncated``; an unreadable tar counts ``tar_unreadable``.

``build_index`` groups members into samples (webdataset's key rule), keeps the samples that
have every field the training kind needs and counts the rest (``sample_missing:<ext>``,
``member_ignored:<ext>`` for extensions that are never read, ``sample_duplicate_key``, and the
first member problem of a sample, e.g. ``member_duplicate``).

Indexes are cached (``$LATENTPIPE_CACHE`` or ``~/.cache/latentpipe``, keyed by the tar's
path, size and mtime) as ``.npz`` files read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import IO, Any

import numpy as np
from braceexpand import braceexpand

from latentpipe.preprocessing.config import ConfigError
from latentpipe.preprocessing.tar_format import (
    IMAGE_EXTS,
    MEMBER_NOT_A_FILE,
    SAMPLE_DUPLICATE_KEY,
    SAMPLE_TRUNCATED,
    TAR_UNREADABLE,
    Member,
    Sample,
    TarScan,
    drop_cut_sample,
    group_members,
    scan_tar,
    split_key,
)

log = logging.getLogger("latentpipe.data")

INDEX_VERSION = 1
LATENT_REQUIRED = ("latent.npy", "text.npy")
LATENT_OPTIONAL = ("tokens.npy", "pooled.npy")
KNOWN_UNREAD = ("json",)  # part of the format, not used for training: never read


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


def scan_shard(path: str) -> TarIndex:
    """Index ``path`` from its headers; damage is counted in ``problems``, never raised."""
    problems: Counter[str] = Counter()
    try:
        with open_binary(path) as f:
            scan = scan_tar(f, _file_size(f))
    except OSError as e:
        scan = TarScan([], TAR_UNREADABLE, f"{type(e).__name__}: {e}")
    if scan.damage is not None:
        log.warning("%s: %s after %d members: %s", path, scan.damage, len(scan.members), scan.detail)
        problems[scan.damage] += 1
    if scan.damage == TAR_UNREADABLE:
        return TarIndex(path, [], np.zeros(0, np.int64), np.zeros(0, np.int64), problems)
    problems[MEMBER_NOT_A_FILE] += sum(not m.is_file and not m.is_dir for m in scan.members)
    files = [m for m in scan.members if m.is_file]
    samples, _ = group_members(files)
    cut = drop_cut_sample(samples, scan.damage)
    if cut is not None:  # the last sample may have lost members after the cut
        problems[SAMPLE_TRUNCATED] += 1
        while files and split_key(files[-1].name)[0] == cut.key:
            files.pop()
    return TarIndex(path, [m.name for m in files], np.asarray([m.offset for m in files], np.int64),
                    np.asarray([m.size for m in files], np.int64), +problems)


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


# numpy parses each .npy header with ast.literal_eval; in this suite CPython 3.11.7 once raised
# "SystemError: AST constructor recursion depth mismatch" there while build_index's threads read
# cached indexes at once (its AST validator's depth count is per-thread state): one reader at a
# time. Reading a cached index is small next to scanning a tar, which stays parallel.
_NPZ_READ = threading.Lock()


def _load(path: str, src: Path) -> TarIndex:
    with _NPZ_READ, np.load(src, allow_pickle=False) as z:
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
    idx = scan_shard(path)
    if cache is not None and "tar_unreadable" not in idx.problems:
        try:
            _save(idx, cache)
        except OSError as e:  # a read-only home is fine: we just rescan next time
            log.debug("cannot cache tar index at %s: %s", cache, e)
    return idx


def group_samples(idx: TarIndex) -> tuple[list[Sample], Counter[str]]:
    """The samples of one indexed tar (``latentpipe.preprocessing.tar_format.group_members``) and the count
    of members that belong to none."""
    return group_members(Member(n, o, z, i, True) for i, (n, o, z) in
                         enumerate(zip(idx.names, idx.offsets.tolist(), idx.sizes.tolist())))


def resolve_shards(spec: str) -> tuple[list[str], Counter[str], dict[str, Any] | None]:
    """Shard tars named by ``spec``, problems found, and the folder's ``_manifest.json``.

    A folder: its ``shard-*.tar`` that have their ``.stats.json`` completion marker
    (others count ``shard_incomplete``). A glob or brace pattern: the tars it names, as
    given (a named tar that does not exist counts ``shard_missing``). URLs (``s3://``) as
    brace patterns only.
    """
    problems: Counter[str] = Counter()
    if not spec:
        raise ConfigError("data.shards: no shards given (a folder of shard-*.tar or a pattern)")
    if "://" not in spec and Path(spec).is_dir():
        folder = Path(spec)
        tars = sorted(folder.glob("shard-*.tar"))
        done = [t for t in tars if t.with_name(t.name[:-4] + ".stats.json").is_file()]
        if len(done) < len(tars):
            problems["shard_incomplete"] += len(tars) - len(done)
            log.warning("%s: %d of %d shards have no .stats.json (incomplete), not used",
                        folder, len(tars) - len(done), len(tars))
        if not done:
            sub = [str(p) for p in (folder / "images", *sorted(folder.glob("latents/*"))) if p.is_dir()]
            hint = f" (shard folders below it: {', '.join(sub)})" if sub else ""
            raise ConfigError(f"data.shards: no complete shard-*.tar in {folder}{hint}")
        paths = [str(t) for t in done]
    else:
        paths = []
        for p in braceexpand(spec):
            if "://" in p:
                paths.append(p)
            elif any(c in p for c in "*?["):
                paths.extend(sorted(glob(p)))
            elif Path(p).is_file():
                paths.append(p)
            else:
                problems["shard_missing"] += 1
                log.warning("shard %s does not exist, not used", p)
        if not paths:
            raise ConfigError(f"data.shards: {spec!r} names no existing tar")
    manifest = None
    parents = {os.path.dirname(p) for p in paths}
    if len(parents) == 1 and "://" not in paths[0]:
        mf = Path(parents.pop()) / "_manifest.json"
        if mf.is_file():
            manifest = json.loads(mf.read_text(encoding="utf-8"))
    return paths, problems, manifest


@dataclass
class SampleIndex:
    """Where every usable sample lives. ``fields[j]`` is the extension stored in column j.

    Attributes:
        shards: tar paths; ``shard[i]`` indexes into it, int32 [N].
        keys: sample keys, bytes (utf-8) [N].
        offsets, sizes: byte range of each field's member, int64 [N, F].
        image_ext: images only: index into IMAGE_EXTS of the image member, int8 [N].
    """

    shards: list[str]
    fields: tuple[str, ...]
    shard: np.ndarray
    keys: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    image_ext: np.ndarray


def build_index(paths: list[str], kind: str, problems: Counter[str]) -> SampleIndex:
    """Index every tar, drop incomplete samples (counted in ``problems``)."""
    grouped = []
    # Threads: scanning is a chain of small seeks + reads, latency-bound on shared storage.
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        indexes = list(pool.map(index_tar, paths))
    for idx in indexes:
        problems.update(idx.problems)
        samples, loose = group_samples(idx)
        problems.update(loose)
        grouped.append(samples)
    if kind == "images":
        fields: tuple[str, ...] = ("image", "txt")
    else:  # an optional field present anywhere is required everywhere (one encoder per folder)
        present = {e for ss in grouped for sm in ss for e in sm.members}
        fields = (*LATENT_REQUIRED, *(e for e in LATENT_OPTIONAL if e in present), "txt")
    known = set(fields) | set(KNOWN_UNREAD) | (set(IMAGE_EXTS) if kind == "images" else set())
    seen: set[str] = set()
    shard_ids: list[int] = []
    keys_out: list[str] = []
    rows: list[list[tuple[int, int]]] = []
    exts: list[int] = []
    for s, samples in enumerate(grouped):
        for sample in samples:
            key = sample.key
            m = {e: (mb.offset, mb.size) for e, mb in sample.members.items()}
            for e in m:
                if e not in known:
                    problems[f"member_ignored:{e}"] += 1
            if sample.problems:
                problems[sample.problems[0]] += 1
                continue
            ext = 0
            if kind == "images":
                imgs = [i for i, e in enumerate(IMAGE_EXTS) if e in m]
                if not imgs:
                    problems["sample_missing:image"] += 1
                    continue
                if len(imgs) > 1:
                    problems["member_ignored:extra_image"] += len(imgs) - 1
                ext = imgs[0]
                m = {**m, "image": m[IMAGE_EXTS[ext]]}
            missing = [f for f in fields if f not in m]
            if missing:
                problems[f"sample_missing:{missing[0]}"] += 1
                continue
            if key in seen:
                problems[SAMPLE_DUPLICATE_KEY] += 1
                continue
            seen.add(key)
            shard_ids.append(s)
            keys_out.append(key)
            rows.append([m[f] for f in fields])
            exts.append(ext)
    arr = np.asarray(rows, np.int64).reshape(len(rows), len(fields), 2)  # [N, F, (offset, size)]
    return SampleIndex(
        shards=paths, fields=fields, shard=np.asarray(shard_ids, np.int32),
        keys=np.char.encode(np.asarray(keys_out, dtype=np.str_), "utf-8") if keys_out else np.zeros(0, "S1"),
        offsets=arr[:, :, 0].copy(), sizes=arr[:, :, 1].copy(), image_ext=np.asarray(exts, np.int8),
    )
