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

import glob as globmod
import re

import fsspec

from latentpipe.preprocessing.sources.base import (
    BAD_SIDECAR,
    CAPTION_COLUMNS,
    CAPTION_EXTS,
    CORRUPT_TABLE,
    DUPLICATE_NAME,
    IMAGE_COLUMNS,
    MISSING_FILE,
    NO_IMAGE,
    READ_ERROR,
    TABLE_EXTS,
    TAR_EXTS,
    TOO_LARGE,
    UNREADABLE_FILE,
    UNSAFE_URL,
    RawSample,
    Source,
    SourceConfig,
    SourceError,
    full_url,
)
from latentpipe.preprocessing.sources.folder import FolderSource
from latentpipe.preprocessing.sources.synthetic import SyntheticSource
from latentpipe.preprocessing.sources.table import TableSource
from latentpipe.preprocessing.sources.tars import TarSource


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
            out.extend(full_url(fs, p) for p in found)
        elif not fs.exists(path):
            raise SourceError(f"source not found: {pattern}")
        else:
            out.append(full_url(fs, path))
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
    "BAD_SIDECAR",
    "CAPTION_COLUMNS",
    "CAPTION_EXTS",
    "CORRUPT_TABLE",
    "DUPLICATE_NAME",
    "FolderSource",
    "IMAGE_COLUMNS",
    "MISSING_FILE",
    "NO_IMAGE",
    "READ_ERROR",
    "RawSample",
    "Source",
    "SourceConfig",
    "SourceError",
    "SyntheticSource",
    "TABLE_EXTS",
    "TAR_EXTS",
    "TOO_LARGE",
    "TableSource",
    "TarSource",
    "UNREADABLE_FILE",
    "UNSAFE_URL",
    "detect_kind",
    "expand",
    "open_source",
]
