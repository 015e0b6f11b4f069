"""The one tar layer: webdataset's key rule, the end-of-archive check, damage names, the writer."""

from __future__ import annotations

import io
import tarfile

from webdataset.tariterators import base_plus_ext

from latentpipe.preprocessing import tar_format as tf


def _tar(samples: list[dict[str, object]]) -> bytes:
    body = b"".join(tf.sample_bytes(s) for s in samples)
    return body + tf.end_of_archive(len(body))


def test_key_rule_is_webdatasets() -> None:
    names = ["a.jpg", "dir/a.seg.png", "dir.x/b.txt", "noext", "x/.hidden.json", "a.b.c", "dir/sub/k.latent.npy"]
    for n in names:
        key, ext = base_plus_ext(n)
        assert tf.split_key(n) == (key, ext.lower() if ext else None), n
    assert tf.split_key("A.JPG") == ("A", "jpg")


def test_writer_matches_tarfile_and_scan_reads_it_back() -> None:
    samples = [{"__key__": f"k{i}", "png": bytes(range(i * 7 % 256)) * 3, "txt": f"cap {i}"} for i in range(4)]
    data = _tar(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert [m.name for m in t.getmembers()] == [f"k{i}.{e}" for i in range(4) for e in ("png", "txt")]
    scan = tf.scan_tar(io.BytesIO(data), len(data))
    assert scan.damage is None
    groups, loose = tf.group_members(scan.members)
    assert [g.key for g in groups] == ["k0", "k1", "k2", "k3"] and not loose
    assert tf.read_ranges(io.BytesIO(data), [(groups[2].members["txt"].offset, groups[2].members["txt"].size)]) \
        == [b"cap 2"]


def test_every_cut_is_damage_and_only_the_cut_sample_is_dropped() -> None:
    samples = [{"__key__": f"k{i}", "json": b"{}", "png": b"p" * 700, "txt": "t"} for i in range(4)]
    data = _tar(samples)
    scan = tf.scan_tar(io.BytesIO(data), len(data))
    header_cut = scan.members[6].offset - tf.BLOCK  # the 3rd sample's first header: tarfile alone sees an end
    cases = {"mid_member": (scan.members[4].offset + 10, 1, True), "header_boundary": (header_cut, 2, False),
             "garbled": (None, 2, False)}
    for name, (cut, kept, dropped) in cases.items():
        raw = data[:header_cut] + b"\x01" * 4000 if cut is None else data[:cut]
        s = tf.scan_tar(io.BytesIO(raw), len(raw))
        assert s.damage == tf.TAR_TRUNCATED, name
        groups, _ = tf.group_members(s.members)
        assert (tf.drop_cut_sample(groups, s.damage) is not None) == dropped, name
        assert [g.key for g in groups] == [f"k{i}" for i in range(kept)], name
    for raw in (b"", b"not a tar" * 100):
        assert tf.scan_tar(io.BytesIO(raw), len(raw)).damage == tf.TAR_UNREADABLE


def test_member_problems_are_named() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, kind in [("a.jpg", tarfile.REGTYPE), ("a.jpg", tarfile.REGTYPE), ("../b.jpg", tarfile.REGTYPE),
                           ("c.jpg", tarfile.SYMTYPE), ("noext", tarfile.REGTYPE), ("a.txt", tarfile.REGTYPE)]:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            t.addfile(ti, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    data = buf.getvalue()
    groups, loose = tf.group_members(tf.scan_tar(io.BytesIO(data), len(data)).members)
    assert [(g.key, g.problems) for g in groups] == [
        ("a", [tf.MEMBER_DUPLICATE]), ("../b", [tf.MEMBER_UNSAFE_NAME]), ("c", [tf.MEMBER_NOT_A_FILE]),
        ("a", [tf.SAMPLE_DUPLICATE_KEY])]
    assert loose == {tf.MEMBER_WITHOUT_EXTENSION: 1}
