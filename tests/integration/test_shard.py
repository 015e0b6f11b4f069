"""`latentpipe shard` on a real local Ray cluster: every source kind, a killed worker, an interrupted
driver, config mismatch, --retry-transient. Outputs are checked by reading the tars back."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentpipe.pipeline.cli import main
from latentpipe.pipeline.shard import CRASH_HOOK_ENV, ShardConfig, run_shard_job
from latentpipe.pipeline.shard_store import OutputMismatchError
from latentpipe.preprocessing.captions import CaptionConfig
from latentpipe.preprocessing.fetch import FetchConfig
from latentpipe.preprocessing.images import ImageConfig
from latentpipe.preprocessing.sources import SourceConfig
from latentpipe.preprocessing.synthetic import encode_image, iter_scenes, make_scene, write_folder
from tests.integration.http_fixture import ServerState, http_server

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _cfg(spec: str, out: Path, per_shard: int = 5, **source: Any) -> ShardConfig:
    return ShardConfig(source=SourceConfig(spec=spec, **source), out=str(out), samples_per_shard=per_shard,
                       image=ImageConfig(size=32), caption=CaptionConfig(),
                       fetch=FetchConfig(timeout=0.5, deadline=2.0, retries=0, backoff=0.05))


def _tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, read with tarfile: nothing is decoded or extracted by name."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if not out or out[-1][0] != key:
                out.append((key, {}))
            f = tf.extractfile(m)
            assert f is not None
            out[-1][1][ext] = f.read()
    return out


def _check_dataset(root: Path) -> dict[str, Any]:
    """Accounting per shard and in total; the index equals the tars' contents, keys unique."""
    images = root / "images"
    manifest = json.loads((images / "_manifest.json").read_text())
    index = pq.read_table(images / "_index.parquet").to_pylist()
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys))
    from_tars = []
    for i in range(manifest["num_shards"]):
        st = json.loads((images / f"shard-{i:06d}.stats.json").read_text())
        assert st["inputs"] == st["written"] + sum(st["skipped"].values()) + st["duplicates"]
        samples = _tar_samples(images / f"shard-{i:06d}.tar")
        assert len(samples) == st["written"]
        for key, files in samples:
            assert sorted(files) == ["jpg", "json", "txt"]
            meta = json.loads(files["json"])
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.size == (32, 32) and meta["key"] == key
            from_tars.append((key, i, files["txt"].decode(), meta["sha256"]))
    assert from_tars == [(r["key"], r["shard"], r["caption"], r["sha256"]) for r in index]
    t = manifest["totals"]
    assert t["inputs"] == manifest["num_inputs"] == t["written"] + sum(t["skipped"].values()) + t["duplicates"]
    assert t["written"] == len(index)
    assert not [n for n in os.listdir(images) if ".tmp-" in n]
    return manifest


# ------------------------------------------------------------------------------ every source kind


def _folder(d: Path) -> tuple[str, dict[str, Any]]:
    write_folder(d / "f", iter_scenes(8, seed=3, size=48), "jpg")
    (d / "f" / "bad.jpg").write_bytes(b"this is text, not a jpeg")
    (d / "f" / "bad.txt").write_text("bad")
    (d / "f" / "nocap.jpg").write_bytes(encode_image(make_scene(4, 0, 48).image, "jpg"))
    (d / "f" / "empty.jpg").write_bytes(b"")
    (d / "f" / "empty.txt").write_text("empty")
    shutil.copy(d / "f" / "00000002.jpg", d / "f" / "zz_copy.jpg")
    (d / "f" / "zz_copy.txt").write_text("the same bytes again")
    return str(d / "f"), {"written": 8, "duplicates": 1, "skipped": {"empty_file": 1, "no_caption": 1,
                                                                     "not_image": 1}}


def _parquet(d: Path) -> tuple[str, dict[str, Any]]:
    rows = [{"image": encode_image(s.image, "png"), "caption": s.caption} for _, s in iter_scenes(9, 5, 48)]
    rows.append({"image": b"\x89PNG\r\n\x1a\n truncated", "caption": "broken"})
    rows.append({"image": rows[0]["image"], "caption": ""})
    pq.write_table(pa.Table.from_pylist(rows), d / "t.parquet", row_group_size=4)
    return str(d / "t.parquet"), {"written": 9, "duplicates": 0, "skipped": {"corrupt": 1, "empty_caption": 1}}


def _csv(d: Path) -> tuple[str, dict[str, Any]]:
    write_folder(d / "imgs", iter_scenes(7, seed=6, size=48), "png")
    paths = [f"imgs/{i:08d}.png" for i in range(7)] + ["imgs/missing.png"]
    pcsv.write_csv(pa.table({"file": paths, "prompt": [f"caption {i}" for i in range(8)]}), d / "t.csv")
    return str(d / "t.csv"), {"written": 7, "duplicates": 0, "skipped": {"missing_file": 1}}


def _tars(d: Path) -> tuple[str, dict[str, Any]]:
    for t, rng in enumerate((range(0, 6), range(6, 10))):
        with tarfile.open(d / f"in-{t}.tar", "w") as tf:
            for i in rng:
                for name, data in ((f"s{i}.jpg", encode_image(make_scene(8, i, 48).image, "jpg")),
                                   (f"s{i}.txt", f"cap {i}".encode()), (f"s{i}.pkl", b"cos\nsystem\n")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("../escape.jpg")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    return str(d / "in-{0..1}.tar"), {"written": 10, "duplicates": 0, "skipped": {"member_unsafe_name": 2}}


def _synthetic(d: Path) -> tuple[str, dict[str, Any]]:
    return "synthetic:11", {"written": 11, "duplicates": 0, "skipped": {}}


@pytest.mark.parametrize("make", [_folder, _parquet, _csv, _tars, _synthetic], ids=lambda f: f.__name__[1:])
def test_full_run_each_source_kind(ray_local: None, tmp_path: Path, make: Any) -> None:
    spec, expect = make(tmp_path)
    res = run_shard_job(_cfg(spec, tmp_path / "out"), progress=False)
    assert not res.failed and res.manifest is not None
    m = _check_dataset(tmp_path / "out")
    assert {k: m["totals"][k] for k in expect} == expect
    assert "written" in res.summary and m["schema_version"] == 1 and len(m["config_hash"]) == 16


def test_url_table_against_a_real_server(ray_local: None, tmp_path: Path) -> None:
    with http_server() as (base, state):
        urls = [f"{base}/img/u{i}.jpg" for i in range(6)]
        urls += [f"{base}/404/a", f"{base}/500/b", f"{base}/html/c", f"{base}/slow/d", f"{base}/img/u1.jpg"]
        lines = [json.dumps({"url": u, "caption": f"caption {i}", "license": "cc0"}) for i, u in enumerate(urls)]
        (tmp_path / "urls.jsonl").write_text("\n".join(lines) + "\n")
        res = run_shard_job(_cfg(str(tmp_path / "urls.jsonl"), tmp_path / "out", per_shard=4), progress=False)
    m = _check_dataset(tmp_path / "out")
    assert m["totals"]["written"] == 6 and m["totals"]["duplicates"] == 1
    assert m["totals"]["skipped"] == {"http_404": 1, "http_500": 1, "not_image": 1, "timeout": 1}
    assert m["totals"]["transient"] == 2 and not res.failed  # 500 and timeout
    first = _tar_samples(tmp_path / "out" / "images" / "shard-000000.tar")[0][1]
    assert json.loads(first["json"])["url"] == urls[0] and json.loads(first["json"])["license"] == "cc0"
    assert {ua for _, _, ua in state.requests} == {FetchConfig().user_agent}


# ------------------------------------------------------------------------------- faults and resume


def test_killed_worker_is_retried_and_every_sample_lands_once(ray_local: None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_HOOK_ENV, f"shard=1,after=4,marker={marker}")
    res = run_shard_job(_cfg("synthetic:30", tmp_path / "out", per_shard=10), progress=False)
    assert marker.exists()  # the first attempt of shard 1 really exited its worker process mid-shard
    assert not res.failed and sorted(res.ran) == [0, 1, 2]
    m = _check_dataset(tmp_path / "out")
    index = pq.read_table(tmp_path / "out" / "images" / "_index.parquet")
    assert index.column("key").to_pylist() == [f"{i:09d}" for i in range(30)] and m["totals"]["written"] == 30


def _wait_for(cond: Any, what: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
            raise AssertionError(f"waiting for {what}: driver exit code {proc.poll()}\n{err}")
        time.sleep(0.2)


def test_interrupted_run_is_finished_by_a_rerun(ray_local: None, tmp_path: Path) -> None:
    import ray

    state = ServerState()
    with http_server(state) as (base, _):
        # shards 0-1 are served at once; shards 2-4 wait behind a gate; u2 appears twice (cross-shard dup)
        names = [f"u{i}.jpg" for i in range(20)]
        names[13] = "u2.jpg"
        urls = [f"{base}/{'img' if i < 8 else 'gate'}/{n}" for i, n in enumerate(names)]
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"url": u, "caption": f"c {i}"})
                                                    for i, u in enumerate(urls)) + "\n")
        cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "shard", "--source", str(tmp_path / "t.jsonl"),
               "--out", str(tmp_path / "a"), "--samples-per-shard", "4", "--ray-address",
               ray.get_runtime_context().gcs_address, "image.size=32",
               "num_cpus_per_task=0.25"]  # all five shards run at once, whatever order Ray starts them in
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        images = tmp_path / "a" / "images"
        try:
            _wait_for(lambda: all((images / f"shard-00000{i}.stats.json").exists() for i in (0, 1)), "shards 0-1",
                      driver)
            _wait_for(lambda: state.count("/gate/") > 0, "a gated shard to start", driver)
        finally:
            driver.send_signal(signal.SIGKILL)  # the driver dies mid-job
            driver.wait(timeout=60)
        assert not (images / "_manifest.json").exists()
        assert not any((images / f"shard-00000{i}.stats.json").exists() for i in (2, 3, 4))
        state.gate.set()
        resumed = run_shard_job(_cfg(str(tmp_path / "t.jsonl"), tmp_path / "a", per_shard=4), progress=False)
        assert sorted(resumed.ran) == [2, 3, 4] and not resumed.failed  # complete shards are not redone
        run_shard_job(_cfg(str(tmp_path / "t.jsonl"), tmp_path / "b", per_shard=4), progress=False)  # clean run
    a, b = _check_dataset(tmp_path / "a"), _check_dataset(tmp_path / "b")
    assert a["totals"] == {**b["totals"], "seconds": a["totals"]["seconds"]}
    assert a["totals"]["written"] == 19 and a["totals"]["duplicates"] == 1
    ia = pq.read_table(tmp_path / "a" / "images" / "_index.parquet")
    ib = pq.read_table(tmp_path / "b" / "images" / "_index.parquet")
    assert ia.equals(ib) and "000000013" not in ia.column("key").to_pylist()
    for i in range(5):  # and the shards themselves are byte-identical
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_retry_transient_redoes_only_flaky_shards(ray_local: None, tmp_path: Path) -> None:
    with http_server() as (base, state):
        urls = [f"{base}/img/r{i}.jpg" for i in range(6)] + [f"{base}/toggle/t.jpg", f"{base}/img/r7.jpg"]
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"url": u, "caption": "c"}) for u in urls) + "\n")
        cfg = _cfg(str(tmp_path / "t.jsonl"), tmp_path / "out", per_shard=4)
        first = run_shard_job(cfg, progress=False)
        assert first.manifest is not None and first.manifest["totals"]["skipped"] == {"http_503": 1}
        again = run_shard_job(cfg, progress=False)
        assert again.ran == []  # complete; transient failures are redone only when asked
        state.failing = False
        retried = run_shard_job(cfg, retry_transient=True, progress=False)
        assert retried.ran == [1]
    m = _check_dataset(tmp_path / "out")
    assert m["totals"]["written"] == 8 and m["totals"]["skipped"] == {} and m["totals"]["transient"] == 0


def test_config_mismatch_is_an_error_unless_overwrite(ray_local: None, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    args = ["shard", "--source", "synthetic:6", "--out", out, "--samples-per-shard", "3", "image.size=32"]
    assert main(args) == 0
    assert "| written" in capsys.readouterr().err  # the end-of-run summary table
    before = (tmp_path / "out" / "images" / "_index.parquet").read_bytes()
    assert main(args) == 0 and (tmp_path / "out" / "images" / "_index.parquet").read_bytes() == before
    assert "0 to write, 2 already complete" in capsys.readouterr().err
    assert main([*args, "image.format=png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "config hash" in err[0]
    with pytest.raises(OutputMismatchError):
        run_shard_job(_cfg("synthetic:7", tmp_path / "out", per_shard=3), progress=False)  # another source
    assert main([*args, "image.format=png", "--overwrite"]) == 0
    assert (tmp_path / "out" / "images" / "shard-000000.tar").exists()
    assert main(["shard", "--source", str(tmp_path / "nope"), "--out", out]) == 2
    assert "source not found" in capsys.readouterr().err
    assert main(["shard", "--source", "pipe:cat x.tar", "--out", out]) == 2
    assert "--allow-pipe" in capsys.readouterr().err
