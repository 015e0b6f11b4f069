"""The WebDataset tar format in one place: members, the key rule, the end check, damage names.

A WebDataset shard is a POSIX tar whose consecutive members ``<key>.<ext>`` form one sample.
Every reader of tars (``preprocessing/sources/tars.py``, ``pipeline/encode.py``,
``pipeline/shard_store.py``, ``training/tar_index.py``) lists members with ``scan_tar`` (headers
only, data skipped by seeking) or ``stream_tar`` (pipes and compressed tars), groups them with
``group_members`` and names damage with the constants below; ``sample_bytes`` writes them.

Python's ``tarfile`` (like webdataset's iterator over it) takes a tar cut at a header boundary,
or garbled from some header on, for a complete archive: ``scan_tar`` also checks that the
end-of-archive marker (two zero blocks) follows the last member. Torch-free on purpose:
importing webdataset imports torch, seconds of start-up per CPU worker.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

BLOCK = 512                 # tar block; headers and padding
RECORD = 20 * BLOCK         # tarfile pads archives to a multiple of this
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # preference order in a sample

# Damage vocabulary: one name per kind, shared by every reader and every report.
TAR_UNREADABLE = "tar_unreadable"          # not a tar, or it cannot be opened or read at all
TAR_TRUNCATED = "tar_truncated"            # ends before its end-of-archive marker (cut, or garbled from a header on)
SAMPLE_TRUNCATED = "sample_truncated"      # the sample the cut went through (fewer members than the one before)
SAMPLE_DUPLICATE_KEY = "sample_duplicate_key"  # a key seen before, not adjacent to its first sample
MEMBER_DUPLICATE = "member_duplicate"      # a second ``<key>.<ext>`` in one sample
MEMBER_NOT_A_FILE = "member_not_a_file"    # a link, device or FIFO member (never followed)
MEMBER_UNSAFE_NAME = "member_unsafe_name"  # an absolute name, "..", a backslash or a NUL
MEMBER_WITHOUT_EXTENSION = "member_without_extension"  # belongs to no sample

READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)  # what reading a damaged tar raises

# webdataset.tariterators.base_plus_ext, copied (webdataset imports torch); tests check parity.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """``(key, ext)`` of a member name by webdataset's rule: the key ends at the first dot of the
    base name (``"dir/a.seg.png"`` -> ``("dir/a", "seg.png")``); ``(None, None)`` without a dot.
    The extension is lower-cased (``A.JPG`` is a ``jpg``)."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def unsafe_name(name: str) -> bool:
    """A name that would escape a folder if extracted (we never extract, but we never trust it)."""
    return (name.startswith(("/", "\\")) or "\x00" in name or "\\" in name
            or any(part == ".." for part in name.split("/")) or bool(re.match(r"^[A-Za-z]:", name)))


@dataclass(frozen=True)
class Member:
    """One tar member: its data is ``size`` bytes at byte ``offset``; ``ordinal`` counts members."""

    name: str
    offset: int
    size: int
    ordinal: int
    is_file: bool
    is_dir: bool = False


@dataclass
class TarScan:
    """Members read from a tar's headers; ``damage`` (a name above) and ``detail`` when it is damaged."""

    members: list[Member]
    damage: str | None = None
    detail: str = ""


def _member(ti: tarfile.TarInfo, ordinal: int) -> Member:
    return Member(ti.name, ti.offset_data, ti.size, ordinal, ti.isreg(), ti.isdir())


def scan_tar(f: IO[bytes], size: int) -> TarScan:
    """Members of the seekable, uncompressed tar ``f`` of ``size`` bytes, from its headers alone.

    A member running past the end of the file, a garbled header or a missing end-of-archive
    marker makes ``TAR_TRUNCATED`` and keeps the members before it; a file that is no tar at
    all (or cannot be read) makes ``TAR_UNREADABLE`` with no members. Never raises for damage.
    """
    members: list[Member] = []
    try:
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tf:
            while True:
                try:
                    ti = tf.next()
                except tarfile.TarError as e:  # a garbled header after intact members
                    return TarScan(members, TAR_TRUNCATED, f"after {len(members)} members: {e}")
                if ti is None:
                    break
                if ti.offset_data + ti.size > size:
                    return TarScan(members, TAR_TRUNCATED, f"{ti.name} runs past the end ({size} bytes)")
                members.append(_member(ti, len(members)))
            end = tf.offset  # where the end-of-archive marker must start
        f.seek(end)
        marker = f.read(2 * BLOCK)
    except READ_ERRORS as e:
        return TarScan([], TAR_UNREADABLE, f"{type(e).__name__}: {e}")
    if len(marker) < 2 * BLOCK or any(marker):
        return TarScan(members, TAR_TRUNCATED, f"no end-of-archive marker at byte {end} of {size}")
    return TarScan(members)


def stream_tar(f: IO[bytes], wanted: Iterable[int] = (),
               max_bytes: int | None = None) -> Iterator[tuple[Member, bytes | None]]:
    """Members of a tar read front to back (pipes, gzip/bz2/xz), with the data of the ``wanted``
    ordinals up to ``max_bytes`` each (other data is skipped unread). Damage raises one of
    ``READ_ERRORS`` after the intact members were yielded; stops after the last wanted member."""
    want = set(wanted)
    last = max(want, default=-1)
    with tarfile.open(fileobj=f, mode="r|*") as tf:
        for ordinal, ti in enumerate(tf):
            data = None
            if ordinal in want and ti.isreg() and (max_bytes is None or ti.size <= max_bytes):
                ex = tf.extractfile(ti)
                data = ex.read() if ex is not None else None
            yield _member(ti, ordinal), data
            if want and ordinal >= last:
                return


@dataclass
class Sample:
    """Consecutive members sharing one key. ``problems``: member damage, in tar order."""

    key: str
    members: dict[str, Member] = field(default_factory=dict)  # ext -> its (first) member
    problems: list[str] = field(default_factory=list)


def group_members(members: Iterable[Member]) -> tuple[list[Sample], Counter[str]]:
    """Samples in tar order (webdataset's ``group_by_keys``: a new sample when the key changes),
    and the count of members that belong to no sample (``MEMBER_WITHOUT_EXTENSION``).

    A sample holding an unsafe name, a non-file member or a repeated extension records that in
    its ``problems`` (the first member of an extension is kept); a key seen before in this tar
    but not adjacent starts a new sample whose first problem is ``SAMPLE_DUPLICATE_KEY``.
    """
    samples: list[Sample] = []
    loose: Counter[str] = Counter()
    seen: set[str] = set()
    for m in members:
        if m.is_dir:
            continue
        key, ext = split_key(m.name)
        if key is None or ext is None:
            loose[MEMBER_WITHOUT_EXTENSION] += 1
            continue
        if not samples or samples[-1].key != key:
            samples.append(Sample(key, problems=[SAMPLE_DUPLICATE_KEY] if key in seen else []))
            seen.add(key)
        s = samples[-1]
        if unsafe_name(m.name):
            s.problems.append(MEMBER_UNSAFE_NAME)
        elif not m.is_file:
            s.problems.append(MEMBER_NOT_A_FILE)
        elif ext in s.members:
            s.problems.append(MEMBER_DUPLICATE)
        else:
            s.members[ext] = m
    return samples, loose


def drop_cut_sample(samples: list[Sample], damage: str | None) -> Sample | None:
    """After a cut (``damage`` set), drop and return the last sample unless it has every extension
    of the one before it (the cut may have taken its last members). A lone sample has nothing to
    compare with and is kept (readers still check the fields they need)."""
    if damage is None or len(samples) < 2 or set(samples[-1].members) >= set(samples[-2].members):
        return None
    return samples.pop()


def image_ext(exts: Iterable[str]) -> str | None:
    """The sample's image extension: the first of ``IMAGE_EXTS`` it has, or None."""
    have = set(exts)
    return next((e for e in IMAGE_EXTS if e in have), None)


def _ustar_template() -> bytearray:
    h = bytearray(BLOCK)
    h[100:124] = b"0000444\0" b"0000000\0" b"0000000\0"
    h[136:157] = b"00000000000\0" b"        " b"0"
    h[257:265] = b"ustar\x0000"
    h[265:272] = h[297:304] = b"bigdata"
    return h


_USTAR = _ustar_template()
_USTAR_SUM = sum(_USTAR)  # checksum of the fixed fields (the checksum field counted as spaces)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header ``tarfile`` writes for a regular file with mode 0444, uid/gid 0,
    mtime 0 and user/group "bigdata" (webdataset's TarWriter defaults), built directly."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"tar member name over 100 bytes or size over 8 GiB: {name!r}")
    h = _USTAR.copy()
    h[0:len(raw)] = raw
    size_field = b"%011o\0" % size
    h[124:136] = size_field
    h[148:156] = b"%06o\0 " % (_USTAR_SUM + sum(raw) + sum(size_field))
    return bytes(h)


def sample_bytes(sample: Mapping[str, Any]) -> bytes:
    """``{"__key__": key, "jpg": bytes, "txt": bytes | str, ...}`` as tar members, extensions in
    sorted order (webdataset's ``TarWriter`` layout); the key must hold no dot and no slash."""
    key = sample["__key__"]
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"bad sample key {key!r}")
    parts = []
    for ext in sorted(k for k in sample if not k.startswith("_")):
        value = sample[ext]
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        parts += [ustar_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % BLOCK)]
    return b"".join(parts)


def end_of_archive(offset: int) -> bytes:
    """The two zero blocks that end a tar whose members fill ``offset`` bytes, padded to a record."""
    end = offset + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end % RECORD))


def read_ranges(f: IO[bytes], ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """Read byte ranges ``(offset, size)``; one read when they are close together (a sample's
    members are consecutive, separated by 512-byte headers). A short read raises ``OSError``."""
    rs = list(ranges)
    if not rs:
        return []
    lo = min(o for o, _ in rs)
    hi = max(o + s for o, s in rs)
    if hi - lo <= sum(s for _, s in rs) + 4 * BLOCK * len(rs):
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


__all__ = [
    "BLOCK", "IMAGE_EXTS", "MEMBER_DUPLICATE", "MEMBER_NOT_A_FILE", "MEMBER_UNSAFE_NAME", "MEMBER_WITHOUT_EXTENSION",
    "READ_ERRORS", "RECORD", "SAMPLE_DUPLICATE_KEY", "SAMPLE_TRUNCATED", "TAR_TRUNCATED", "TAR_UNREADABLE", "Member", "Sample",
    "TarScan", "drop_cut_sample", "end_of_archive", "group_members", "image_ext", "read_ranges", "sample_bytes",
    "scan_tar", "split_key", "stream_tar", "unsafe_name",
]
