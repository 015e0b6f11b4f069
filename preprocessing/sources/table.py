"""``table`` sources: parquet / CSV / JSONL file(s) of image bytes, image structs, paths or URLs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa

from latentpipe.preprocessing.sources.base import (
    CAPTION_COLUMNS,
    CORRUPT_TABLE,
    IMAGE_COLUMNS,
    NO_IMAGE,
    READ_ERROR,
    UNSAFE_URL,
    RawSample,
    Source,
    SourceConfig,
    SourceError,
    read_file,
)


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
                    s.data, s.error, s.detail = read_file(fs, p, self.max_bytes)
        else:
            s.error, s.detail = NO_IMAGE, f"empty {self.image_col!r} cell"
        return s
