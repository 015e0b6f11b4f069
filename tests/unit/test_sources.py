"""Readers (folder, table, tars, synthetic) and the polite URL fetcher against a real 127.0.0.1 server."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from latentpipe.preprocessing import sources as src
from latentpipe.preprocessing import tar_format
from latentpipe.preprocessing.fetch import FetchConfig, Fetcher, is_transient, retry_after_seconds
from latentpipe.preprocessing.sources import RawSample, Source, SourceConfig, SourceError, open_source
from latentpipe.preprocessing.synthetic import encode_image, make_scene
from tests.integration.http_fixture import http_server


def _jpg(i: int) -> bytes:
    return encode_image(make_scene(1, i, 32).image, "jpg")


def _all(s: Source) -> list[RawSample]:
    out = list(s.read(0, s.num_inputs))
    assert [x.index for x in out] == list(range(s.num_inputs))
    return out


def _ranges_agree(s: Source, cut: int) -> None:
    """Reading in two ranges gives exactly what one read gives (shards are ranges)."""
    whole = [(x.index, x.data, x.caption, x.error) for x in _all(s)]
    parts = [(x.index, x.data, x.caption, x.error) for x in [*s.read(0, cut), *s.read(cut, s.num_inputs)]]
    assert whole == parts


# -------------------------------------------------------------------------------------- folder


def test_folder_sidecars_and_bad_files(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(_jpg(0))
    (d / "a.txt").write_text("caption a")
    (d / "b.png").write_bytes(_jpg(1))  # a JPEG named .png: content decides later
    (d / "b.json").write_text(json.dumps({"caption": "caption b", "license": "cc-by"}))
    (d / "sub" / "c.JPG").write_bytes(_jpg(2))  # no sidecar at all
    (d / "dup.jpg").write_bytes(_jpg(3))
    (d / "dup.webp").write_bytes(_jpg(4))       # same name, another extension
    (d / "dup.txt").write_text("dup")
    (d / "empty.jpg").write_bytes(b"")
    (d / "badjson.jpg").write_bytes(_jpg(5))
    (d / "badjson.json").write_text("{not json")
    (d / "latin1.jpg").write_bytes(_jpg(6))
    (d / "latin1.txt").write_bytes(b"caf\xe9")
    (d / ".hidden.jpg").write_bytes(_jpg(7))
    (d / "notes.md").write_text("not an input")
    s = open_source(SourceConfig(spec=str(d)))
    assert s.kind == "folder"
    got = {x.source_id: x for x in _all(s)}
    assert sorted(got) == ["a.jpg", "b.png", "badjson.jpg", "dup.jpg", "dup.webp", "empty.jpg", "latin1.jpg",
                           "sub/c.JPG"]
    assert got["a.jpg"].caption == b"caption a" and got["a.jpg"].data == _jpg(0)
    assert got["b.png"].caption == "caption b" and got["b.png"].meta["source_meta"]["license"] == "cc-by"
    assert got["sub/c.JPG"].caption is None and got["sub/c.JPG"].error is None
    assert got["dup.jpg"].error is None and got["dup.webp"].error == src.DUPLICATE_NAME
    assert got["empty.jpg"].data == b""
    assert got["badjson.jpg"].error == src.BAD_SIDECAR
    assert got["latin1.jpg"].caption == b"caf\xe9"  # decoding (and rejecting) is the caption policy's job
    _ranges_agree(s, 3)


def test_folder_size_cap_and_fingerprint(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpg(0))
    (tmp_path / "a.txt").write_text("x")
    s = open_source(SourceConfig(spec=str(tmp_path)), max_bytes=10)
    assert _all(s)[0].error == src.TOO_LARGE
    fp = s.fingerprint()
    assert open_source(SourceConfig(spec=str(tmp_path))).fingerprint() == fp
    (tmp_path / "b.jpg").write_bytes(_jpg(1))
    assert open_source(SourceConfig(spec=str(tmp_path))).fingerprint() != fp


# --------------------------------------------------------------------------------------- table


def test_parquet_bytes_hf_struct_and_row_groups(tmp_path: Path) -> None:
    imgs = [_jpg(i) for i in range(7)]
    t = pa.table({"image": [{"bytes": b, "path": None} for b in imgs[:6]] + [{"bytes": None, "path": None}],
                  "text": [f"c{i}" for i in range(6)] + [None], "license": ["cc0"] * 7})
    pq.write_table(t, tmp_path / "hf.parquet", row_group_size=3)
    s = open_source(SourceConfig(spec=str(tmp_path / "hf.parquet")))
    rows = _all(s)
    assert [r.data for r in rows[:6]] == imgs[:6] and rows[2].caption == "c2"
    assert rows[6].error == src.NO_IMAGE and rows[0].meta == {"license": "cc0"}
    assert rows[4].source_id == "hf.parquet:4"
    _ranges_agree(s, 4)  # a range that starts inside a row group


def test_damaged_parquet_row_group_costs_only_its_rows(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [_jpg(i) for i in range(9)], "caption": ["c"] * 9}), tmp_path / "rg.parquet",
                   row_group_size=3)
    col = pq.ParquetFile(tmp_path / "rg.parquet").metadata.row_group(1).column(0)
    data = bytearray((tmp_path / "rg.parquet").read_bytes())
    data[col.data_page_offset + 20:col.data_page_offset + 200] = b"\xab" * 180  # footer intact, group 1 broken
    (tmp_path / "rg.parquet").write_bytes(bytes(data))
    rows = _all(open_source(SourceConfig(spec=str(tmp_path / "rg.parquet"))))
    assert [r.error for r in rows] == [None] * 3 + [src.CORRUPT_TABLE] * 3 + [None] * 3
    assert [r.data for r in rows[6:]] == [_jpg(i) for i in range(6, 9)]


def test_multiple_parquet_files_by_glob(tmp_path: Path) -> None:
    for f in range(2):
        pq.write_table(pa.table({"jpg": [_jpg(f * 3 + i) for i in range(3)], "caption": ["x"] * 3}),
                       tmp_path / f"part-{f}.parquet")
    s = open_source(SourceConfig(spec=str(tmp_path / "part-*.parquet")))
    assert s.num_inputs == 6 and [r.data for r in _all(s)] == [_jpg(i) for i in range(6)]
    _ranges_agree(s, 2)


def test_csv_paths_urls_and_unsafe_values(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpg(0))
    (tmp_path / "abs.jpg").write_bytes(_jpg(1))
    lines = ["path,caption,extra",
             "img/a.jpg,relative to the table,1",
             f"{tmp_path / 'abs.jpg'},absolute,2",
             "img/missing.jpg,gone,3",
             "https://example.invalid/x.jpg,a url,4",
             "pipe:rm -rf /,never run,5",
             ",no image,6"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    s = open_source(SourceConfig(spec=str(tmp_path / "t.csv"), image_column="path", meta_columns=["extra"]))
    r = _all(s)
    assert r[0].data == _jpg(0) and r[0].caption == "relative to the table" and r[0].meta == {"extra": 1}
    assert r[1].data == _jpg(1)
    assert r[2].error == src.MISSING_FILE
    assert r[3].url == "https://example.invalid/x.jpg" and r[3].data is None and r[3].error is None
    assert r[4].error == src.UNSAFE_URL
    assert r[5].error == src.NO_IMAGE


def test_jsonl_and_bad_tables(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"url": f"http://h/{i}.jpg", "caption": f"c{i}"})
                                                for i in range(3)) + "\n")
    s = open_source(SourceConfig(spec=str(tmp_path / "t.jsonl")))
    assert [r.url for r in _all(s)] == [f"http://h/{i}.jpg" for i in range(3)]
    with pytest.raises(SourceError, match="no image column 'pic'"):
        open_source(SourceConfig(spec=str(tmp_path / "t.jsonl"), image_column="pic"))
    (tmp_path / "nocap.csv").write_text("url\nhttp://h/1.jpg\n")
    with pytest.raises(SourceError, match="no caption column"):
        open_source(SourceConfig(spec=str(tmp_path / "nocap.csv")))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="cannot read table"):
        open_source(SourceConfig(spec=str(tmp_path / "broken.parquet")))
    with pytest.raises(SourceError, match="not found"):
        open_source(SourceConfig(spec=str(tmp_path / "nope.parquet")))


# ---------------------------------------------------------------------------------------- tars


def _write_tar(path: Path, keys: range, extra: dict[str, bytes] | None = None) -> None:
    with wds.TarWriter(str(path), encoder=False) as w:
        for i in keys:
            w.write({"__key__": f"s{i:03d}", "jpg": _jpg(i), "txt": f"cap {i}".encode(),
                     "json": json.dumps({"caption": "ignored: .txt wins", "id": i}).encode()})


def _add_member(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = (len(data), kind) if kind == tarfile.REGTYPE else (0, kind)
    if kind == tarfile.SYMTYPE:
        ti.linkname = "/etc/passwd"
    tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_tars_by_brace_and_glob(tmp_path: Path) -> None:
    _write_tar(tmp_path / "in-000.tar", range(0, 4))
    _write_tar(tmp_path / "in-001.tar", range(4, 7))
    for spec in (str(tmp_path / "in-{000..001}.tar"), str(tmp_path / "in-*.tar")):
        s = open_source(SourceConfig(spec=spec))
        assert s.kind == "tars" and s.num_inputs == 7
        r = _all(s)
        assert [x.data for x in r] == [_jpg(i) for i in range(7)]
        assert r[5].caption == b"cap 5" and r[5].meta["source_meta"]["id"] == 5
        assert r[5].source_id == "in-001.tar:s005"
        _ranges_agree(s, 3)  # a range that spans both tars


def test_tar_hostile_members_stay_data(tmp_path: Path) -> None:
    p = tmp_path / "hostile.tar"
    with tarfile.open(p, "w") as tf:
        _add_member(tf, "ok.jpg", _jpg(0))
        _add_member(tf, "ok.txt", b"fine")
        _add_member(tf, "ok.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")  # never read, never unpickled
        _add_member(tf, "../../escape.jpg", _jpg(1))
        _add_member(tf, "/abs/root.jpg", _jpg(2))
        _add_member(tf, "link.jpg", b"", tarfile.SYMTYPE)
        _add_member(tf, "twice.jpg", _jpg(3))
        _add_member(tf, "twice.jpg", _jpg(4))
        _add_member(tf, "model.pth", b"PK\x03\x04 torch zip")
        _add_member(tf, "again.jpg", _jpg(5))
        _add_member(tf, "ok.jpg", _jpg(6))  # a key seen before, not adjacent
    s = open_source(SourceConfig(spec=str(p)))
    got: dict[str, RawSample] = {}
    for x in _all(s):
        got.setdefault(x.source_id.split(":", 1)[1], x)  # first sample of each key
    assert got["ok"].data == _jpg(0) and got["ok"].caption == b"fine" and got["ok"].error is None
    assert got["../../escape"].error == tar_format.MEMBER_UNSAFE_NAME and got["../../escape"].data is None
    assert got["/abs/root"].error == tar_format.MEMBER_UNSAFE_NAME
    assert got["link"].error == tar_format.MEMBER_NOT_A_FILE
    assert got["twice"].error == tar_format.MEMBER_DUPLICATE
    assert got["model"].error == src.NO_IMAGE and got["model"].data is None
    assert got["again"].error is None
    assert [x.error for x in _all(s)].count(tar_format.SAMPLE_DUPLICATE_KEY) == 1  # the second "ok"
    assert all(b"pwned" not in (x.data or b"") for x in _all(s))
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_truncated_and_malformed_tars(tmp_path: Path) -> None:
    _write_tar(tmp_path / "good.tar", range(0, 5))
    whole = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(whole[:3072] + b"\x01" * 40000)
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "notatar.tar").write_bytes(b"hello world" * 100)
    cut = _all(open_source(SourceConfig(spec=str(tmp_path / "cut.tar"))))
    # the sample the cut went through, then the tar itself
    assert [x.error for x in cut if x.error] == [tar_format.SAMPLE_TRUNCATED, tar_format.TAR_TRUNCATED]
    assert sum(x.error is None for x in cut) >= 1  # what was readable before the cut is kept
    bad = _all(open_source(SourceConfig(spec=str(garbage))))
    assert bad[-1].error == tar_format.TAR_TRUNCATED  # garbled from a header on: no end-of-archive marker
    for name in ("zero.tar", "notatar.tar"):
        r = _all(open_source(SourceConfig(spec=str(tmp_path / name))))
        assert [x.error for x in r] == [tar_format.TAR_UNREADABLE]


def test_compressed_tar_and_pipe(tmp_path: Path) -> None:
    _write_tar(tmp_path / "a.tar", range(0, 5))
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as out, tarfile.open(tmp_path / "a.tar") as inp:
        for m in inp:
            out.addfile(m, inp.extractfile(m))
    gz = open_source(SourceConfig(spec=str(tmp_path / "a.tar.gz")))
    assert [x.data for x in _all(gz)] == [_jpg(i) for i in range(5)]
    _ranges_agree(gz, 2)
    spec = f"pipe:cat {tmp_path / 'a.tar'}"
    with pytest.raises(SourceError, match="--allow-pipe"):
        open_source(SourceConfig(spec=spec))
    piped = open_source(SourceConfig(spec=spec, allow_pipe=True))
    assert [x.caption for x in _all(piped)] == [f"cap {i}".encode() for i in range(5)]


# ----------------------------------------------------------------------------- synthetic, dispatch


def test_synthetic_and_dispatch_errors(tmp_path: Path) -> None:
    s = open_source(SourceConfig(spec="synthetic:5", synthetic_size=32))
    r = _all(s)
    assert len(r) == 5 and r[0].data and r[0].meta["attributes"]["objects"] and isinstance(r[0].caption, str)
    _ranges_agree(s, 2)
    with pytest.raises(SourceError, match="synthetic:N"):
        open_source(SourceConfig(spec="synthetic:many"))
    with pytest.raises(SourceError, match="no source"):
        open_source(SourceConfig(spec=""))
    with pytest.raises(SourceError, match="not found"):
        open_source(SourceConfig(spec=str(tmp_path / "missing")))
    with pytest.raises(SourceError, match="no files match"):
        open_source(SourceConfig(spec=str(tmp_path / "*.tar")))
    (tmp_path / "x.bin").write_bytes(b"?")
    with pytest.raises(SourceError, match="source.kind"):
        open_source(SourceConfig(spec=str(tmp_path / "x.bin")))


# ------------------------------------------------------------------------------------ fetching


def test_retry_after_and_transient_reasons() -> None:
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("garbage") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (retry_after_seconds(date) or 0) <= 31
    assert all(is_transient(r) for r in ("timeout", "connection_error", "http_500", "http_503", "http_429"))
    assert not any(is_transient(r) for r in ("http_404", "http_403", "too_large", "corrupt"))


def test_fetch_against_a_real_server() -> None:
    cfg = FetchConfig(threads=8, per_host=8, timeout=1.0, deadline=2.0, retries=1, backoff=0.05,
                      max_bytes=1_000_000, user_agent="latentpipe-test/1")
    with http_server() as (base, state), Fetcher(cfg) as f:
        paths = ["img/a.jpg", "404/x", "500/x", "html/x", "slow/x", "trickle/x", "big/x", "bignolen/x",
                 "flaky503/x.jpg", "flaky429/y.jpg"]
        results = dict(zip(paths, (r for _, r in f.map_ordered([f"{base}/{p}" for p in paths], lambda u: u))))
        assert results["img/a.jpg"].data and results["img/a.jpg"].data[:2] == b"\xff\xd8"
        assert results["html/x"].data and results["html/x"].data.startswith(b"<html>")  # decode rejects it later
        assert results["404/x"].reason == "http_404" and results["404/x"].attempts == 1  # 4xx: no retry
        assert results["500/x"].reason == "http_500" and results["500/x"].attempts == 2
        assert results["slow/x"].reason == "timeout"
        assert results["trickle/x"].reason == "timeout"
        assert results["big/x"].reason == "too_large" and results["bignolen/x"].reason == "too_large"
        for p in ("flaky503/x.jpg", "flaky429/y.jpg"):
            assert results[p].data is not None and results[p].attempts == 2
            t = state.times(f"/{p}")
            assert len(t) == 2 and t[1] - t[0] >= 0.9  # waited for Retry-After: 1
        assert {ua for _, _, ua in state.requests} == {"latentpipe-test/1"}
        assert f.fetch("ftp://example.com/x.jpg").reason == "bad_url"
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{sock.getsockname()[1]}/x.jpg"
            assert f.fetch(closed).reason == "connection_error"


def test_retry_after_beyond_max_backoff_gives_up() -> None:
    cfg = FetchConfig(retries=3, backoff=0.01, max_backoff=0.5)
    with http_server() as (base, state), Fetcher(cfg) as f:
        r = f.fetch(f"{base}/flaky429/z.jpg")  # asks for 1 s; we allow 0.5 s
        assert r.reason == "http_429" and "Retry-After" in r.detail and state.count("/flaky429/") == 1


def test_per_host_concurrency_cap_and_order() -> None:
    cfg = FetchConfig(threads=8, per_host=2)
    with http_server() as (base, state), Fetcher(cfg) as f:
        urls = [f"{base}/slowok/{i}.jpg" for i in range(8)]
        out = list(f.map_ordered([(i, u) for i, u in enumerate(urls)], lambda item: item[1]))
        assert [item[0] for item, _ in out] == list(range(8))  # input order kept
        assert all(r is not None and r.data for _, r in out)
        assert state.max_inflight == 2
        passthrough = list(f.map_ordered(["a", "b"], lambda item: None))
        assert passthrough == [("a", None), ("b", None)]
