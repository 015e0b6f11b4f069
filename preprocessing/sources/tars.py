"""``tars`` sources: WebDataset tars, located by offset at plan time and read by offset."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from typing import IO

import fsspec

from latentpipe.preprocessing.sources.base import (
    CAPTION_EXTS,
    NO_IMAGE,
    READ_ERROR,
    TOO_LARGE,
    RawSample,
    Source,
    SourceConfig,
    caption_from_json,
    json_object,
)
from latentpipe.preprocessing.tar_format import (
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
                obj = json_object(got[(i, "json")]) if (i, "json") in got else None
                if obj is not None:
                    s.meta["source_meta"] = obj
                s.caption = got.get((i, "caption")) if cap is not None else caption_from_json(obj, self.caption_field)
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
