"""``folder`` sources: a tree of images with caption sidecars (``a.jpg`` + ``a.txt`` or ``a.json``)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator

import fsspec

from latentpipe.preprocessing.sources.base import (
    BAD_SIDECAR,
    DUPLICATE_NAME,
    RawSample,
    Source,
    SourceConfig,
    SourceError,
    caption_from_json,
    is_local,
    json_object,
    read_file,
)
from latentpipe.preprocessing.tar_format import (
    IMAGE_EXTS,
)


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
        if not is_local(self.fs):
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
            sample.data, sample.error, sample.detail = read_file(self.fs, f"{self.root}/{rel}", self.max_bytes, size)
            obj = None
            if js is not None:
                raw, _, _ = read_file(self.fs, f"{self.root}/{js}", 1 << 24)
                obj = json_object(raw) if raw is not None else None
                if obj is None and sample.error is None and txt is None:
                    sample.error, sample.detail = BAD_SIDECAR, f"{js} is not a JSON object"
                if obj is not None:
                    sample.meta["source_meta"] = obj
            if txt is not None:
                sample.caption, _, _ = read_file(self.fs, f"{self.root}/{txt}", 1 << 20)
            else:
                sample.caption = caption_from_json(obj, self.caption_field)
            yield sample
