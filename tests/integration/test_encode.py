"""``latentpipe encode`` on a real local Ray cluster: parity with the encoders applied directly,
same keys and shards as the input, rerun is a no-op, a killed job resumes to the identical
result, bad input is recorded, and the training loader reads the output."""

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
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentpipe.pipeline.encode import EncodeConfig, run_encode
from latentpipe.preprocessing.config import ConfigError
from latentpipe.preprocessing.encoders import KLVAEEncoder, TextEncoder, VQGANEncoder
from tests.shards import truncate, write_tar
from tests.unit.test_encoders import make_vae, make_vqgan

pytestmark = pytest.mark.integration
N_SHARDS, PER_SHARD = 5, 6


def read_tar(path: Path) -> dict[str, dict[str, Any]]:
    """key -> {extension: decoded value} of a latent (or image) shard, in tar order."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if ext.endswith("npy"):
                out[key][ext] = np.load(io.BytesIO(data), allow_pickle=False)
            elif ext in ("png", "jpg", "webp"):
                out[key]["image"] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            else:
                out[key][ext] = data.decode()
    return dict(out)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Path]:
    """Image shards written by the real ``latentpipe shard`` job, and tiny random autoencoders."""
    from latentpipe.pipeline.shard import ShardConfig, run_shard_job
    from latentpipe.preprocessing.config import from_dict

    root = tmp_path_factory.mktemp("encode")
    cfg = from_dict(ShardConfig, {"source": {"spec": f"synthetic:{N_SHARDS * PER_SHARD}", "synthetic_size": 32},
                                  "out": str(root), "samples_per_shard": PER_SHARD,
                                  "image": {"size": 32, "format": "png"}})
    result = run_shard_job(cfg, progress=False)
    assert result.manifest is not None and result.manifest["totals"]["written"] == N_SHARDS * PER_SHARD
    return {"root": root, "images": root / "images",
            "vae": make_vae(root / "vae"), "vqgan": make_vqgan(root / "vqgan")}


def config(data: dict[str, Path], out: Path, **kw: Any) -> EncodeConfig:
    base: dict[str, Any] = dict(images=str(data["images"]), out=str(out), vae=str(data["vae"]),
                                vqgan=str(data["vqgan"]), text_encoder="minilm", text_dtype="float32",
                                batch_size=2, num_actors=1)
    return EncodeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def clean(data: dict[str, Path], ray_local: None) -> dict[str, Any]:
    """One uninterrupted run of the job."""
    return run_encode(config(data, data["root"] / "clean"), show_progress=False)


def test_latents_equal_the_encoders_applied_directly(data: dict[str, Path], clean: dict[str, Any]) -> None:
    out = Path(clean["out_dir"])
    vae = KLVAEEncoder.from_pretrained(data["vae"], "cpu")
    vq = VQGANEncoder.from_pretrained(data["vqgan"], "cpu")
    text = TextEncoder(None, device="cpu")
    for i in range(N_SHARDS):
        name = f"shard-{i:06d}.tar"
        src, got = read_tar(data["images"] / name), read_tar(out / name)
        assert list(got) == list(src)  # same keys, same order, same shard
        pix = np.stack([s["image"] for s in src.values()])  # [n, 32, 32, 3]
        captions = [s["txt"] for s in src.values()]
        lat, tok = vae.encode(pix)["latent"], vq.encode(pix)["tokens"]
        ref = text.encode(captions)  # padded to the longest caption; the job stores real tokens only
        for j, (key, s) in enumerate(got.items()):
            np.testing.assert_allclose(s["latent.npy"], lat[j], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(s["tokens.npy"], tok[j])
            n = int(ref["text_mask"][j].sum())
            assert s["text.npy"].shape == (n, 384) and s["text.npy"].dtype == np.float32
            np.testing.assert_allclose(s["text.npy"], ref["text"][j, :n], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(s["pooled.npy"], ref["pooled"][j], rtol=1e-4, atol=1e-5)
            assert s["txt"] == captions[j] and json.loads(s["json"]) == json.loads(src[key]["json"])


def test_manifest_index_and_stats(data: dict[str, Path], clean: dict[str, Any]) -> None:
    out = Path(clean["out_dir"])
    assert out.parent == data["root"] / "clean" / "latents" and out.name == clean["encoder_id"]
    assert out.name.startswith("vae-vqgan-text-")
    m = json.loads((out / "_manifest.json").read_text())
    assert m["complete"] and m["shard_count"] == N_SHARDS and m["totals"]["written"] == N_SHARDS * PER_SHARD
    assert m["scaling_factor"] == 0.5
    assert m["encoders"]["vae"]["identity"]["sha256"] == clean_sha(data["vae"])
    assert m["encoders"]["vae"]["arrays"]["latent"] == {"shape": [8, 16, 16], "dtype": "float32"}
    assert m["encoders"]["vqgan"]["arrays"]["tokens"] == {"shape": [256], "dtype": "int32"}
    assert m["tokens_grid"] == [[16, 16]] and m["image_sizes"] == [[32, 32]]
    assert m["encoders"]["text"]["arrays"]["text"] == {"shape": [None, 384], "dtype": "float32"}
    index = pq.read_table(out / "_index.parquet").to_pylist()
    src_index = pq.read_table(data["images"] / "_index.parquet").to_pylist()
    assert [(r["key"], r["shard"], r["caption"]) for r in index] == [
        (r["key"], r["shard"], r["caption"]) for r in src_index]
    stats = json.loads((out / "shard-000002.stats.json").read_text())
    assert stats["written"] == stats["inputs"] == PER_SHARD and stats["skipped"] == {}
    assert stats["extra"]["input_stats"] and not stats["extra"]["truncated"]
    per = stats["extra"]["bytes_per_sample"]
    assert per["latent.npy"] == 8 * 16 * 16 * 4 + 128 and per["tokens.npy"] == 256 * 4 + 128
    assert per["text.npy"] > per["pooled.npy"] > 0
    assert 1 <= stats["extra"]["distinct_captions"] <= PER_SHARD
    assert m["totals"]["bytes_per_sample"]["latent.npy"] == per["latent.npy"]


def clean_sha(path: Path) -> str:
    from latentpipe.preprocessing.encoders import folder_sha256

    return folder_sha256(path)


def test_rerun_does_nothing(data: dict[str, Path], clean: dict[str, Any]) -> None:
    out = Path(clean["out_dir"])
    before = snapshot(out)
    again = run_encode(config(data, data["root"] / "clean"), show_progress=False)
    assert again["encoder_id"] == clean["encoder_id"] and again["encoded_now"] == 0
    assert snapshot(out) == before


def test_killed_job_resumes_to_the_clean_result(data: dict[str, Path], clean: dict[str, Any]) -> None:
    import ray

    root = data["root"] / "killed"
    cmd = [sys.executable, "-m", "latentpipe.pipeline.cli", "encode", "--images", str(data["images"]), "--out", str(root),
           "--vae", str(data["vae"]), "--vqgan", str(data["vqgan"]), "--text-encoder", "minilm",
           "--text-dtype", "float32", "--batch-size", "2", "--num-actors", "1",
           "--ray-address", ray.get_runtime_context().gcs_address]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    out = root / "latents" / clean["encoder_id"]
    deadline = time.monotonic() + 180
    try:
        while not list(out.glob("shard-*.stats.json")):  # kill right after the first finished shard
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the job wrote no shard in 180 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(out.glob("shard-*.stats.json")))
    assert 1 <= done < N_SHARDS, f"{done} shards finished before the kill"
    assert not (out / "_manifest.json").exists()
    time.sleep(1.0)  # let Ray reap the dead driver's workers
    resumed = run_encode(config(data, root), show_progress=False)
    assert resumed["encoded_now"] == N_SHARDS - done
    ref = Path(clean["out_dir"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        if p.suffix in (".tar", ".parquet"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    m, m_ref = (json.loads((d / "_manifest.json").read_text()) for d in (out, ref))
    for mm in (m, m_ref):  # everything but the output path, creation time and stage seconds
        mm["config"].pop("out"), mm.pop("config_hash"), mm.pop("created"), mm["totals"].pop("seconds")
    assert m == m_ref


def test_bad_samples_and_truncated_tars_are_recorded(data: dict[str, Path], ray_local: None) -> None:
    images = data["root"] / "bad" / "images"
    shutil.copytree(data["images"], images)
    samples = read_tar(images / "shard-000000.tar")
    keys = list(samples)
    raw: list[dict[str, Any]] = []
    with tarfile.open(images / "shard-000000.tar") as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not raw or raw[-1]["__key__"] != key:
                raw.append({"__key__": key})
            raw[-1][ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    raw[2]["png"] = raw[2]["png"][:40]  # a corrupt image
    del raw[4]["txt"]  # a sample without a caption
    write_tar(images / "shard-000000.tar", raw)
    truncate(images / "shard-000001.tar", (images / "shard-000001.tar").stat().st_size // 2)  # died half-way
    summary = run_encode(config(data, images.parent, images=str(images), vqgan=None,
                                text_dtype="float16"), show_progress=False)
    assert summary["encoder_id"].startswith("vae-text-")
    out = Path(summary["out_dir"])
    s0 = json.loads((out / "shard-000000.stats.json").read_text())
    assert s0["inputs"] == PER_SHARD and s0["written"] == PER_SHARD - 2
    assert s0["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    assert {e["key"]: e["reason"] for e in s0["errors"]} == {keys[2]: "corrupt_image", keys[4]: "missing_caption"}
    assert list(read_tar(out / "shard-000000.tar")) == [k for i, k in enumerate(keys) if i not in (2, 4)]
    s1 = json.loads((out / "shard-000001.stats.json").read_text())
    assert s1["extra"]["truncated"] and 0 < s1["written"] < PER_SHARD
    kept = read_tar(out / "shard-000001.tar")
    assert list(kept) == list(read_tar(data["images"] / "shard-000001.tar"))[: s1["written"]]
    assert all(v["text.npy"].dtype == np.float16 for v in kept.values())
    m = json.loads((out / "_manifest.json").read_text())
    assert m["totals"]["truncated_tars"] == ["shard-000001"]
    assert m["totals"]["written"] == N_SHARDS * PER_SHARD - 2 - (PER_SHARD - s1["written"])
    assert m["encoders"]["text"]["arrays"]["text"]["dtype"] == "float16"


def test_training_loader_reads_the_output(clean: dict[str, Any]) -> None:
    from latentpipe.training.data import DataConfig, ShardStream

    out = Path(clean["out_dir"])
    stream = ShardStream(DataConfig(shards=str(out), kind="latents", batch_size=4, num_workers=0), 0, 1)
    assert stream.num_samples == N_SHARDS * PER_SHARD and not stream.skipped
    batch = next(iter(stream.batches()))
    assert tuple(batch["latent"].shape) == (4, 8, 16, 16) and tuple(batch["tokens"].shape) == (4, 256)
    assert tuple(batch["text"].shape) == (4, 77, 384) and tuple(batch["pooled"].shape) == (4, 384)
    lengths = {r["key"]: r["text_len"] for r in pq.read_table(out / "_index.parquet").to_pylist()}
    assert batch["text_mask"].sum(1).tolist() == [lengths[k] for k in batch["__key__"]]


def test_export_and_registered_model_sources(tmp_path: Path) -> None:
    """--vae takes a latentpipe export folder or models:/name@alias; both load the same weights."""
    import torch

    from latentpipe.pipeline.encode import encoder_id
    from latentpipe.pipeline.encoder_sources import build_encoder, resolve_source
    from latentpipe.training.export import save_export
    from latentpipe.training.families import family_from_config, model_config_dict
    from latentpipe.training.tracking import Tracker, TrackingConfig

    fam = family_from_config({"kind": "kl_vae", "arch": {"preset": "kl_demo", "block_out_channels": [16, 32, 32],
                                                         "norm_num_groups": 8, "scaling_factor": 0.7}})
    torch.manual_seed(0)
    module = fam.build_primary().eval()
    save_export(tmp_path / "run" / "export", "kl_vae", model_config_dict(fam), module.state_dict(), {"step": 1})
    exp = resolve_source("vae", str(tmp_path / "run"))  # a training workdir holding export/
    assert exp.format == "export" and exp.path == str((tmp_path / "run" / "export").resolve())
    enc = build_encoder(exp, "cpu")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        post = module.encode(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    np.testing.assert_allclose(enc.encode(x)["latent"][:, :4], post.mean.numpy(), rtol=1e-5, atol=1e-6)
    assert enc.identity()["scaling_factor"] == 0.7 and enc.identity()["family"] == "kl_vae"

    import mlflow.pyfunc  # noqa: F401  imported here first: the Tracker's threads importing it at once can deadlock

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(TrackingConfig(uri=uri, system_metrics=False), tmp_path / "work", active=True)
    assert tracker.register_model(tmp_path / "run" / "export", "demo-vae", {}, aliases=["best"]) == "models:/demo-vae/1"
    tracker.close()
    reg = resolve_source("vae", "models:/demo-vae@best", tmp_path / "cache", uri)
    assert reg.origin["model_version"] == 1 and reg.path == str(tmp_path / "cache" / "demo-vae-v1")
    assert reg.sha256 == exp.sha256  # same weights: the same encoder id, wherever they came from
    assert encoder_id([reg], EncodeConfig(), "cpu") == encoder_id([exp], EncodeConfig(), "cpu")
    np.testing.assert_array_equal(build_encoder(reg, "cpu").encode(x)["latent"],
                                  enc.encode(x)["latent"])
    with pytest.raises(ConfigError, match="not found in the MLflow registry"):
        resolve_source("vae", "models:/demo-vae@missing", tmp_path / "cache", uri)
    with pytest.raises(ConfigError, match="an export of family 'kl_vae', expected 'vqgan'"):
        build_encoder(resolve_source("vqgan", str(tmp_path / "run")), "cpu")


def test_decode_keeps_what_precedes_any_tar_damage(tmp_path: Path) -> None:
    """Cut mid-member, cut at a header boundary (which tarfile alone takes for a complete
    archive), garbage and empty files: every case is flagged and the intact samples are kept."""
    from latentpipe.pipeline.encode import decode_shard
    from latentpipe.pipeline.shard_store import OutputDir
    from tests.shards import make_image_shards

    folder = make_image_shards(tmp_path, 1, 6)
    tar = folder / "shard-000000.tar"
    full = decode_shard(OutputDir(str(folder)), 0, True)
    assert full["stats"].inputs == 6 and len(full["keys"]) == 6 and full["stats"].extra["truncated"] is None
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    header_cut = members[9].offset  # the 4th sample's 1st member: its header is gone, earlier files intact
    cases = {"mid_member": (members[4].offset_data + 10, 1), "header_boundary": (header_cut, 3),
             "garbage": (None, 0), "empty": (0, 0)}
    for name, (cut, kept) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "shard-000000.tar").write_bytes(b"not a tar" * 100 if cut is None else data[:cut])
        r = decode_shard(OutputDir(str(d)), 0, True)
        st = r["stats"]
        assert st.extra["truncated"], name
        assert r["keys"] == full["keys"][:kept], name
        st.written = len(r["keys"])
        st.check()  # every sample read is accounted for: kept or skipped with a reason
