"""Readers that turn each input kind into a stable, indexed sequence of raw samples.

A ``Source`` is built once (on the Ray driver) from the ``--source`` spec. Building it lists
the input and fixes its order, which is the *shard plan*: input ``i`` always has the same
position, so shard ``k`` always covers inputs ``[k*S, (k+1)*S)`` (planning by input rows, as
img2dataset does). ``Source.read(start, stop)`` yields exactly one ``RawSample`` per input in
that range, in order, in any process; inputs the reader already knows are bad carry an
``error`` reason instead of data, so accounting never loses one.

Kinds (``detect_kind`` picks one from the spec; ``source.kind=`` forces it):

- ``folder``: a tree of images with caption sidecars (``a.jpg`` + ``a.txt`` or ``a.json``).
- ``table``: parquet / CSV / JSONL file(s); the image column holds bytes, a Hugging Face image
  struct ``{bytes, path}``, a local or fsspec path, or an http(s) URL.
- ``tars``: WebDataset tars (glob or brace pattern, or ``pipe:CMD`` when allowed). Members are
  located by offset at plan time and read by offset: never extracted by name, and only image,
  ``.txt`` and ``.json`` members are ever read (``.pkl``, ``.pth``, ``.npy``, ... are ignored).
- ``synthetic:N``: the built-in captioned scenes.

Paths go through fsspec, so ``s3://``, ``gs://``, ... work like local paths.
"""

from __future__ import annotations

import abc
import glob as globmod
import hashlib
import json
import os
import posixpath
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar, Literal

import fsspec
import pyarrow as pa

from latentpipe.preprocessing.synthetic import encode_image, make_scene
from latentpipe.preprocessing.tar_format import (
    IMAGE_EXTS,
    READ_ERRORS,
    SAMPLE_TRUNCATED,
    TAR_TRUNCATED,
    TAR_UNREADABLE,
    Member,
    TarScan,
    drop_cut_sample,
    group_members,
    image_ext,
    scan_tar,
    stream_tar,
)

CAPTION_EXTS = ("txt", "text", "caption")
TABLE_EXTS = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".ndjson")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
IMAGE_COLUMNS = ("image", "url", "path", "file", "jpg", "png", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "TEXT", "prompt")

# Skip reasons produced by readers; tar damage uses the names of ``latentpipe.preprocessing.tar_format``.
DUPLICATE_NAME = "duplicate_name"    # folder: a.jpg and a.png share one caption
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
READ_ERROR = "read_error"          # an I/O error that may go away (counted as transient)
TOO_LARGE = "too_large"
NO_IMAGE = "no_image"
UNSAFE_URL = "unsafe_url"
BAD_SIDECAR = "bad_sidecar"
CORRUPT_TABLE = "corrupt_table"


class SourceError(ValueError):
    """A source that cannot be planned at all (missing, unreadable, wrong columns): one line."""


@dataclass
class SourceConfig:
    """Where the input is and how to read it."""

    spec: str = ""                       # folder, table file(s), tar glob/brace, pipe:CMD, synthetic:N
    kind: Literal["auto", "folder", "table", "tars", "synthetic"] = "auto"
    image_column: str = ""               # table: "" = first of image, url, path, file, jpg, png, img
    caption_column: str = ""             # table: "" = first of caption, text, txt, TEXT, prompt
    caption_field: str = "caption"       # key of the caption in .json sidecars / members
    meta_columns: list[str] = field(default_factory=list)  # table columns copied into <key>.json
    allow_pipe: bool = False             # allow "pipe:CMD" tar specs (runs a shell command)
    synthetic_seed: int = 0
    synthetic_size: int = 64             # px of generated scenes before processing


@dataclass
class RawSample:
    """One input: bytes or a URL to fetch, a raw caption, JSON-safe metadata, or an error."""

    index: int                           # global input index (position in the plan)
    source_id: str                       # where it came from, for <key>.json and error reports
    data: bytes | None = None
    url: str | None = None
    caption: str | bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None             # skip reason known to the reader
    detail: str = ""


class Source(abc.ABC):
    """A planned input: ``num_inputs`` samples readable by index range from any process."""

    kind: ClassVar[str]
    num_inputs: int

    @abc.abstractmethod
    def _fingerprint_items(self) -> Iterable[str]: ...

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        """Exactly one sample per index in ``[start, stop)``, in order."""

    def fingerprint(self) -> str:
        """Hash of the listing (names, sizes, row counts): changes when the input changes."""
        h = hashlib.sha256(self.kind.encode())
        for item in self._fingerprint_items():
            h.update(item.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()[:16]


def _is_local(fs: Any) -> bool:
    return "file" in getattr(fs, "protocol", ()) or "local" in getattr(fs, "protocol", ())


def _read_file(fs: Any, path: str, max_bytes: int, size: int | None = None) -> tuple[bytes | None, str | None, str]:
    """File bytes, or (None, reason, detail). ``size`` from the listing saves a stat."""
    try:
        if size is None:
            size = os.stat(path).st_size if _is_local(fs) else int(fs.size(path))
        if size > max_bytes:
            return None, TOO_LARGE, f"{size} bytes"
        if _is_local(fs):  # fsspec's generic path costs as much as decoding a small JPEG
            with open(path, "rb") as f:
                return f.read(max_bytes + 1), None, ""
        return fs.cat_file(path), None, ""
    except FileNotFoundError:
        return None, MISSING_FILE, path
    except (PermissionError, IsADirectoryError) as e:
        return None, UNREADABLE_FILE, f"{type(e).__name__}: {path}"
    except OSError as e:
        return None, READ_ERROR, f"{type(e).__name__}: {e}"


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _caption_from_json(obj: dict[str, Any] | None, field_name: str) -> str | None:
    value = None if obj is None else obj.get(field_name)
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------- folder


class FolderSource(Source):
    """A folder tree: every image file is an input; ``<name>.txt`` or ``<name>.json`` holds its caption."""

    kind = "folder"

    def __init__(self, spec: str, cfg: SourceConfig, max_bytes: int) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(spec)
        self.root = self.root.rstrip("/")
        if not self.fs.isdir(self.root):
            raise SourceError(f"source folder not found: {spec}")
        self.caption_field, self.max_bytes = cfg.caption_field, max_bytes
        # stem (relative path without extension) -> {lower ext: (relative path, size)}
        stems: dict[str, dict[str, tuple[str, int]]] = {}
        for rel, size in self._list():
            if any(part.startswith(".") for part in rel.split("/")) or "." not in posixpath.basename(rel):
                continue
            stem, ext = rel.rsplit(".", 1)
            stems.setdefault(stem, {}).setdefault(ext.lower(), (rel, size))
        # (image rel, size, txt rel, json rel, error)
        self.items: list[tuple[str, int, str | None, str | None, str | None]] = []
        for stem in sorted(stems):
            by_ext = stems[stem]
            images = sorted(e for e in by_ext if e in IMAGE_EXTS)
            txt = by_ext["txt"][0] if "txt" in by_ext else None
            js = by_ext["json"][0] if "json" in by_ext else None
            for n, ext in enumerate(images):  # a.jpg + a.png share one sidecar: keep the first
                rel, size = by_ext[ext]
                self.items.append((rel, size, txt, js, None if n == 0 else DUPLICATE_NAME))
        self.num_inputs = len(self.items)

    def _list(self) -> Iterator[tuple[str, int]]:
        """(relative path, size) of every file below the root; locally by scandir (no stat of sidecars)."""
        if not _is_local(self.fs):
            for path, info in self.fs.find(self.root, detail=True).items():
                yield posixpath.relpath(path, self.root), int(info.get("size") or 0)
            return
        stack = [""]
        while stack:
            sub = stack.pop()
            with os.scandir(os.path.join(self.root, sub)) as it:
                for e in it:
                    rel = f"{sub}/{e.name}" if sub else e.name
                    if e.is_dir():
                        stack.append(rel)
                    elif e.is_file():  # only images need a size (the cap, the fingerprint)
                        yield rel, e.stat().st_size if e.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS else 0

    def _fingerprint_items(self) -> Iterable[str]:
        for rel, size, txt, js, _ in self.items:
            yield f"{rel}|{size}|{txt}|{js}"

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for index in range(start, stop):
            rel, size, txt, js, error = self.items[index]
            sample = RawSample(index, rel, error=error)
            if error is not None:
                sample.detail = f"another image has the same name as {rel}"
                yield sample
                continue
            sample.data, sample.error, sample.detail = _read_file(self.fs, f"{self.root}/{rel}", self.max_bytes, size)
            obj = None
            if js is not None:
                raw, _, _ = _read_file(self.fs, f"{self.root}/{js}", 1 << 24)
                obj = _json_object(raw) if raw is not None else None
                if obj is None and sample.error is None and txt is None:
                    sample.error, sample.detail = BAD_SIDECAR, f"{js} is not a JSON object"
                if obj is not None:
                    sample.meta["source_meta"] = obj
            if txt is not None:
                sample.caption, _, _ = _read_file(self.fs, f"{self.root}/{txt}", 1 << 20)
            else:
                sample.caption = _caption_from_json(obj, self.caption_field)
            yield sample


# ------------------------------------------------------------------------------------------ table


def _pick_column(names: list[str], wanted: str, candidates: tuple[str, ...], what: str, spec: str) -> str:
    if wanted:
        if wanted not in names:
            raise SourceError(f"{spec}: no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise SourceError(f"{spec}: no {what} column; set source.{what}_column= (columns: {', '.join(names)})")


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


class TableSource(Source):
    """Rows of parquet / CSV / JSONL files, in file then row order."""

    kind = "table"

    def __init__(self, paths: list[str], spec: str, cfg: SourceConfig, max_bytes: int) -> None:
        import pyarrow.csv as pcsv
        import pyarrow.json as pjson
        import pyarrow.parquet as pq

        self.max_bytes = max_bytes
        self.files: list[tuple[str, int, int]] = []   # (url, rows, bytes)
        self.inline: dict[int, pa.Table] = {}         # csv/jsonl tables, read once here
        schemas: list[list[str]] = []
        for i, url in enumerate(paths):
            fs, path = fsspec.core.url_to_fs(url)
            low = path.lower()
            try:
                with fs.open(path, "rb") as f:
                    if low.endswith((".parquet", ".pq")):
                        meta = pq.ParquetFile(f).metadata
                        rows, names = meta.num_rows, list(meta.schema.to_arrow_schema().names)
                    else:
                        if low.endswith((".csv", ".tsv")):
                            delim = "\t" if low.endswith(".tsv") else ","
                            table = pcsv.read_csv(f, parse_options=pcsv.ParseOptions(delimiter=delim))
                        else:
                            table = pjson.read_json(f)
                        rows, names = table.num_rows, table.column_names
                        self.inline[i] = table
                size = int(fs.size(path))
            except FileNotFoundError:
                raise SourceError(f"source table not found: {url}") from None
            except (OSError, pa.ArrowInvalid, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SourceError(f"cannot read table {url}: {first}") from None
            self.files.append((url, rows, size))
            schemas.append(names)
        names = schemas[0]
        for url, other in zip(paths[1:], schemas[1:]):
            if other != names:
                raise SourceError(f"{url}: columns differ from {paths[0]} ({other} vs {names})")
        self.image_col = _pick_column(names, cfg.image_column, IMAGE_COLUMNS, "image", spec)
        self.caption_col = _pick_column(names, cfg.caption_column, CAPTION_COLUMNS, "caption", spec)
        for m in cfg.meta_columns:
            _pick_column(names, m, (), "meta", spec)
        self.meta_cols = list(dict.fromkeys([*cfg.meta_columns, *(["license"] if "license" in names else [])]))
        self.columns = list(dict.fromkeys([self.image_col, self.caption_col, *self.meta_cols]))
        for i in self.inline:
            self.inline[i] = self.inline[i].select(self.columns)
        self.num_inputs = sum(rows for _, rows, _ in self.files)

    def _fingerprint_items(self) -> Iterable[str]:
        for url, rows, size in self.files:
            yield f"{url}|{rows}|{size}"
        yield f"{self.image_col}|{self.caption_col}"

    def _chunks(self, i: int, a: int, b: int) -> Iterator[tuple[int, int, pa.Table | Exception]]:
        """Rows ``[a, b)`` of file ``i`` as (first row, end row, table or the error reading it).

        Parquet is read one overlapping row group at a time, so a damaged group costs only its rows.
        """
        if i in self.inline:
            yield a, b, self.inline[i].slice(a, b - a)
            return
        import pyarrow.parquet as pq

        fs, path = fsspec.core.url_to_fs(self.files[i][0])
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            offset = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                lo, hi = max(a, offset), min(b, offset + n)
                if lo < hi:
                    try:
                        table: pa.Table | Exception = pf.read_row_group(g, columns=self.columns)
                    except (OSError, pa.ArrowException) as e:
                        table = e
                    yield lo, hi, table if isinstance(table, Exception) else table.slice(lo - offset, hi - lo)
                offset += n

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        offset = 0
        for i, (url, rows, _) in enumerate(self.files):
            a, b = max(start - offset, 0), min(stop - offset, rows)
            base = url.rsplit("/", 1)[0] if "/" in url else "."
            name = url.rsplit("/", 1)[-1]
            for lo, hi, table in (self._chunks(i, a, b) if a < b else ()):
                if isinstance(table, Exception):  # a damaged row group: its rows are skipped, counted
                    transient = isinstance(table, OSError) and table.errno is not None
                    for r in range(lo, hi):
                        yield RawSample(offset + r, f"{name}:{r}", error=READ_ERROR if transient else CORRUPT_TABLE,
                                        detail=f"{type(table).__name__}: {table}"[:300])
                    continue
                cols = {c: table.column(c).to_pylist() for c in self.columns}
                for r in range(hi - lo):
                    yield self._sample(offset + lo + r, f"{name}:{lo + r}", base, {c: cols[c][r] for c in cols})
            offset += rows

    def _sample(self, index: int, source_id: str, base: str, row: dict[str, Any]) -> RawSample:
        s = RawSample(index, source_id, caption=row[self.caption_col])
        if s.caption is not None and not isinstance(s.caption, (str, bytes)):
            s.caption = str(s.caption)
        s.meta.update({c: _json_safe(row[c]) for c in self.meta_cols})
        value = row[self.image_col]
        if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            s.data = value
        elif isinstance(value, str) and value.strip():
            ref = value.strip()
            scheme = ref.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", ref) else ""
            if scheme in ("http", "https"):
                s.url = ref
                s.meta["url"] = ref
            elif scheme in ("pipe", "data", "javascript") or (scheme and len(scheme) > 1 and "://" not in ref):
                s.error, s.detail = UNSAFE_URL, ref[:200]  # table cells never run commands
            else:
                path = ref if scheme or ref.startswith("/") else f"{base}/{ref}"
                try:
                    fs, p = fsspec.core.url_to_fs(path)
                except (ValueError, ImportError) as e:  # an unknown protocol or a missing fsspec driver
                    s.error, s.detail = UNSAFE_URL, f"{ref[:200]}: {e}"
                else:
                    s.data, s.error, s.detail = _read_file(fs, p, self.max_bytes)
        else:
            s.error, s.detail = NO_IMAGE, f"empty {self.image_col!r} cell"
        return s


# ------------------------------------------------------------------------------------------- tars

def _is_compressed(head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


class TarSource(Source):
    """Samples of WebDataset tars, grouped by key; members read by offset (or by ordinal when streamed)."""

    kind = "tars"

    def __init__(self, paths: list[str], cfg: SourceConfig, max_bytes: int) -> None:
        self.max_bytes, self.caption_field = max_bytes, cfg.caption_field
        self.tars: list[tuple[str, int, bool]] = []  # (url or pipe:cmd, size, streamed)
        # (tar index, key, image (ext, member) | None, caption member, json member, error, detail)
        self.items: list[tuple[int, str, tuple[str, Member] | None, Member | None, Member | None,
                               str | None, str]] = []
        for t, url in enumerate(paths):
            self._plan_tar(t, url)
        self.num_inputs = len(self.items)

    def _open(self, url: str) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
        if url.startswith("pipe:"):
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (opt-in)
            assert proc.stdout is not None
            return proc.stdout, proc
        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, "rb"), None

    def _plan_tar(self, t: int, url: str) -> None:
        size = 0
        try:
            f, proc = self._open(url)
        except OSError as e:  # unreadable (permissions, a vanished file): one counted input
            self.tars.append((url, 0, True))
            self._tar_error(t, TAR_UNREADABLE, f"{url}: {type(e).__name__}: {e}")
            return
        try:
            streamed = proc is not None or _is_compressed(f.read(6))
            if proc is None:
                f.seek(0)
            if streamed:
                members: list[Member] = []
                try:
                    members.extend(m for m, _ in stream_tar(f))
                    scan = TarScan(members)
                except READ_ERRORS as e:
                    scan = TarScan(members, TAR_TRUNCATED if members else TAR_UNREADABLE, f"{type(e).__name__}: {e}")
            else:
                fs, path = fsspec.core.url_to_fs(url)
                size = int(fs.size(path))
                scan = scan_tar(f, size)
        finally:
            f.close()
            if proc is not None:
                proc.kill()
                proc.wait()
        self.tars.append((url, size, streamed))
        samples, _ = group_members(scan.members)
        cut = drop_cut_sample(samples, scan.damage)
        for sm in samples:
            ext = image_ext(sm.members)
            cap = next((sm.members[e] for e in CAPTION_EXTS if e in sm.members), None)
            error = sm.problems[0] if sm.problems else (None if ext else NO_IMAGE)
            self.items.append((t, sm.key, (ext, sm.members[ext]) if ext else None, cap, sm.members.get("json"),
                               error, f"{sm.key}: {', '.join(sm.problems)}" if sm.problems else sm.key))
        if cut is not None:
            self.items.append((t, cut.key, None, None, None, SAMPLE_TRUNCATED, f"{cut.key}: cut with the tar"))
        if scan.damage is not None:
            self._tar_error(t, scan.damage, f"{url}: {scan.detail}")

    def _tar_error(self, t: int, reason: str, detail: str) -> None:
        """Damage of a whole tar: one counted input, so the accounting shows it."""
        self.items.append((t, f"<tar error {len(self.items)}>", None, None, None, reason, detail))

    def _fingerprint_items(self) -> Iterable[str]:
        for url, size, _ in self.tars:
            yield f"{url}|{size}"
        yield str(len(self.items))

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        index = start
        while index < stop:
            t = self.items[index][0]
            end = index
            while end < stop and self.items[end][0] == t:
                end += 1
            yield from self._read_tar(t, index, end)
            index = end

    def _read_tar(self, t: int, start: int, stop: int) -> Iterator[RawSample]:
        url, _, streamed = self.tars[t]
        wanted: dict[int, tuple[int, str]] = {}  # ordinal -> (item index, role)
        for i in range(start, stop):
            _, _, image, cap, js, error, _ = self.items[i]
            if error is None:
                for role, member in (("image", image[1] if image else None), ("caption", cap), ("json", js)):
                    if member is not None:
                        wanted[member.ordinal] = (i, role)
        got: dict[tuple[int, str], bytes] = {}
        failed: dict[int, tuple[str, str]] = {}
        try:
            f, proc = self._open(url)
        except OSError as e:
            f, proc = None, None
            failed = {i: (READ_ERROR, f"{type(e).__name__}: {e}") for i in range(start, stop)}
        if f is not None:
            try:
                got, failed = self._fetch_members(f, streamed, wanted, start, stop)
            finally:
                f.close()
                if proc is not None:
                    proc.kill()
                    proc.wait()
        for i in range(start, stop):
            _, key, image, cap, js, error, detail = self.items[i]
            s = RawSample(i, f"{url.rsplit('/', 1)[-1]}:{key}", error=error, detail=detail)
            if error is None and i in failed:
                s.error, s.detail = failed[i]
            if s.error is None and image is not None:
                s.data = got.get((i, "image"))
                if s.data is None:
                    s.error, s.detail = TAR_UNREADABLE, f"{key}.{image[0]}: member not found when read"
                obj = _json_object(got[(i, "json")]) if (i, "json") in got else None
                if obj is not None:
                    s.meta["source_meta"] = obj
                s.caption = got.get((i, "caption")) if cap is not None else _caption_from_json(obj, self.caption_field)
            yield s

    def _fetch_members(self, f: IO[bytes], streamed: bool, wanted: dict[int, tuple[int, str]], start: int,
                       stop: int) -> tuple[dict[tuple[int, str], bytes], dict[int, tuple[str, str]]]:
        """Bytes of the wanted members (images over the size cap are left out), and per-item read errors."""
        got: dict[tuple[int, str], bytes] = {}
        failed: dict[int, tuple[str, str]] = {}
        if not streamed:
            for i in range(start, stop):
                _, _, image, cap, js, error, _ = self.items[i]
                for role, member in (("image", image[1] if image else None), ("caption", cap), ("json", js)):
                    if member is None or error is not None or i in failed:
                        continue
                    off, size = member.offset, member.size
                    if role == "image" and size > self.max_bytes:
                        failed[i] = (TOO_LARGE, f"{size} bytes")
                        continue
                    try:
                        f.seek(off)
                        data = f.read(size)
                    except OSError as e:
                        failed[i] = (READ_ERROR, f"{type(e).__name__}: {e}")
                        continue
                    if len(data) != size:
                        failed[i] = (TAR_TRUNCATED, f"member at byte {off}: {len(data)} of {size} bytes")
                    got[(i, role)] = data
            return got, failed
        done = -1
        try:
            for m, blob in stream_tar(f, wanted, self.max_bytes):
                if m.ordinal in wanted:
                    i, role = wanted[m.ordinal]
                    if role == "image" and m.size > self.max_bytes:
                        failed[i] = (TOO_LARGE, f"{m.size} bytes")
                    elif blob is not None:
                        got[(i, role)] = blob
                done = m.ordinal
        except READ_ERRORS as e:
            for ordinal, (i, _) in wanted.items():
                if ordinal > done:
                    failed.setdefault(i, (TAR_TRUNCATED, f"{type(e).__name__}: {e}"))
        return got, failed


# -------------------------------------------------------------------------------------- synthetic


class SyntheticSource(Source):
    """``synthetic:N``: the built-in captioned scenes (PNG, lossless, with their attributes)."""

    kind = "synthetic"

    def __init__(self, n: int, seed: int, size: int) -> None:
        self.num_inputs, self.seed, self.size = n, seed, size

    def _fingerprint_items(self) -> Iterable[str]:
        yield f"{self.num_inputs}|{self.seed}|{self.size}"

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for index in range(start, stop):
            scene = make_scene(self.seed, index, self.size)
            yield RawSample(index, f"synthetic:{self.seed}:{index}", data=encode_image(scene.image, "png"),
                            caption=scene.caption, meta={"attributes": scene.attributes})


# -------------------------------------------------------------------------------------- dispatch


def _full(fs: Any, path: str) -> str:
    """A URL any process can open: absolute for local paths (Ray workers have another cwd)."""
    return path if "file" in fs.protocol or "local" in fs.protocol else str(fs.unstrip_protocol(path))


def expand(spec: str) -> list[str]:
    """Brace-expand then glob ``spec`` (fsspec-aware); every plain name must exist."""
    import braceexpand

    out: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        fs, path = fsspec.core.url_to_fs(pattern)
        if globmod.has_magic(path):
            found = sorted(fs.glob(path))
            if not found:
                raise SourceError(f"no files match {pattern}")
            out.extend(_full(fs, p) for p in found)
        elif not fs.exists(path):
            raise SourceError(f"source not found: {pattern}")
        else:
            out.append(_full(fs, path))
    return out


def detect_kind(spec: str) -> str:
    low = spec.lower()
    if low.startswith("synthetic:"):
        return "synthetic"
    if low.startswith("pipe:") or re.search(r"\.(tar|tgz|tar\.gz)(\}|$|\*)", low) or low.endswith(TAR_EXTS):
        return "tars"
    if low.endswith(TABLE_EXTS):
        return "table"
    fs, path = fsspec.core.url_to_fs(spec)
    if fs.isdir(path):
        return "folder"
    if not globmod.has_magic(path) and "{" not in spec and not fs.exists(path):
        raise SourceError(f"source not found: {spec}")
    raise SourceError(f"cannot tell what kind of source {spec!r} is: set source.kind= (folder, table, tars)")


def open_source(cfg: SourceConfig, max_bytes: int = 25_000_000) -> Source:
    """Plan the source named by ``cfg.spec``; ``SourceError`` (one line) when it cannot be read."""
    spec = cfg.spec.strip()
    if not spec:
        raise SourceError("no source given (--source)")
    kind = detect_kind(spec) if cfg.kind == "auto" else cfg.kind
    if kind == "synthetic":
        n = spec.split(":", 1)[1] if ":" in spec else ""
        if not n.isdigit():
            raise SourceError(f"expected synthetic:N with N a number, got {spec!r}")
        if not 32 <= cfg.synthetic_size <= 512:
            raise SourceError(f"source.synthetic_size must be 32..512, got {cfg.synthetic_size}")
        return SyntheticSource(int(n), cfg.synthetic_seed, cfg.synthetic_size)
    if kind == "folder":
        return FolderSource(spec, cfg, max_bytes)
    if spec.startswith("pipe:"):
        if kind != "tars":
            raise SourceError("pipe: sources can only be tars")
        if not cfg.allow_pipe:
            raise SourceError("refusing a pipe: source (it runs a shell command); pass --allow-pipe to allow it")
        return TarSource([spec], cfg, max_bytes)
    paths = expand(spec)
    if kind == "table":
        return TableSource(paths, spec, cfg, max_bytes)
    return TarSource(paths, cfg, max_bytes)


__all__ = [
    "FolderSource", "RawSample", "Source", "SourceConfig", "SourceError", "SyntheticSource", "TableSource",
    "TarSource", "detect_kind", "expand", "open_source",
]
