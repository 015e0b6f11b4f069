"""The parts every source kind shares: the config, the raw sample, the ``Source`` contract, skip reasons
and file reading.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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


def is_local(fs: Any) -> bool:
    return "file" in getattr(fs, "protocol", ()) or "local" in getattr(fs, "protocol", ())


def read_file(fs: Any, path: str, max_bytes: int, size: int | None = None) -> tuple[bytes | None, str | None, str]:
    """File bytes, or (None, reason, detail). ``size`` from the listing saves a stat."""
    try:
        if size is None:
            size = os.stat(path).st_size if is_local(fs) else int(fs.size(path))
        if size > max_bytes:
            return None, TOO_LARGE, f"{size} bytes"
        if is_local(fs):  # fsspec's generic path costs as much as decoding a small JPEG
            with open(path, "rb") as f:
                return f.read(max_bytes + 1), None, ""
        return fs.cat_file(path), None, ""
    except FileNotFoundError:
        return None, MISSING_FILE, path
    except (PermissionError, IsADirectoryError) as e:
        return None, UNREADABLE_FILE, f"{type(e).__name__}: {path}"
    except OSError as e:
        return None, READ_ERROR, f"{type(e).__name__}: {e}"


def json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def caption_from_json(obj: dict[str, Any] | None, field_name: str) -> str | None:
    value = None if obj is None else obj.get(field_name)
    return value if isinstance(value, str) else None




def full_url(fs: Any, path: str) -> str:
    """A URL any process can open: absolute for local paths (Ray workers have another cwd)."""
    return path if "file" in fs.protocol or "local" in fs.protocol else str(fs.unstrip_protocol(path))
