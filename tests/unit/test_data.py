"""training/data.py: exact resume, rank/worker splits, batch contract, safety, damage."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentpipe.preprocessing.config import ConfigError
from latentpipe.training.data import DataChangedError, DataConfig, ShardStream
from tests.shards import make_image_shards, make_latent_shards, npy, truncate, write_tar


@pytest.fixture(autouse=True)
def _index_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTPIPE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 scenes in 3 uneven shards."""
    return make_image_shards(tmp_path_factory.mktemp("img"), 3, [5, 7, 2], size=32)


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_latent_shards(tmp_path_factory.mktemp("lat"), 2, [4, 7], C=2, h=3, w=5, text_dim=6, max_len=12)


def take(stream: ShardStream, n: int, start_step: int = 0, **kw: Any) -> list[dict[str, Any]]:
    gen = stream.batches(start_step, **kw)
    out = [next(gen) for _ in range(n)]
    gen.close()  # shuts DataLoader workers down
    return out


def keys(folder: Path, rank: int, world: int, batch: int, steps: int, start: int = 0, **cfg: Any) -> list[list[str]]:
    stream = ShardStream(DataConfig(shards=str(folder), batch_size=batch, num_workers=0, **cfg), rank, world)
    return [b["__key__"] for b in take(stream, steps, start)]


def global_keys(folder: Path, world: int, batch: int, steps: int, start: int = 0, **cfg: Any) -> list[list[str]]:
    """Per step, the concatenation of every rank's keys (rank order)."""
    per_rank = [keys(folder, r, world, batch, steps, start, **cfg) for r in range(world)]
    return [sum((per_rank[r][s] for r in range(world)), []) for s in range(steps)]


def all_keys(folder: Path) -> set[str]:
    out = set()
    for tar in folder.glob("shard-*.tar"):
        with tarfile.open(tar) as tf:
            out |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
    return out


def test_resume_at_world_size_2_yields_the_uninterrupted_keys(images: Path) -> None:
    full = [keys(images, r, 2, 3, 8) for r in range(2)]
    stream = ShardStream(DataConfig(shards=str(images), batch_size=3, num_workers=0), 0, 2)
    state = stream.state_dict(step=3)
    assert state["samples_seen"] == 3 * 6
    for r in range(2):
        resumed = ShardStream(DataConfig(shards=str(images), batch_size=3, num_workers=0), r, 2)
        start = resumed.resume_position(state, micro_steps=3)
        assert [b["__key__"] for b in take(resumed, 5, start_sample=start)] == full[r][3:]


def test_two_rank_checkpoint_resumes_at_one_rank_on_the_global_sequence(images: Path) -> None:
    two = global_keys(images, world=2, batch=3, steps=7)
    state = ShardStream(DataConfig(shards=str(images), batch_size=3, num_workers=0), 1, 2).state_dict(step=3)
    one = ShardStream(DataConfig(shards=str(images), batch_size=6, num_workers=0), 0, 1)
    assert [b["__key__"] for b in take(one, 4, start_sample=one.resume_position(state, 3))] == two[3:]
    # Same global batch through gradient accumulation: 2 micro-batches of 3 per step.
    micro = ShardStream(DataConfig(shards=str(images), batch_size=3, num_workers=0), 0, 1)
    got = [b["__key__"] for b in take(micro, 8, start_sample=micro.resume_position(state, 3 * 2))]
    assert [got[2 * i] + got[2 * i + 1] for i in range(4)] == two[3:]
    other = ShardStream(DataConfig(shards=str(images), batch_size=4, num_workers=0), 0, 1)
    with pytest.raises(DataChangedError, match=r"sample order: 18 samples read in 3 steps.* would have read 12"):
        other.resume_position(state, 3)
    assert other.resume_position(state, 3, allow_changed=True) == 18  # deliberate: continue at its position


def _stream(folder: Path, **cfg: Any) -> ShardStream:
    return ShardStream(DataConfig(shards=str(folder), batch_size=2, num_workers=0, **cfg), 0, 1)


def test_resume_refuses_added_removed_or_replaced_shards_and_another_seed(tmp_path: Path) -> None:
    folder = make_image_shards(tmp_path / "d", 3, 4)
    state = _stream(folder).state_dict(step=2)
    assert _stream(folder).resume_position(state, 2) == 4  # unchanged data: continues
    with pytest.raises(DataChangedError, match=r"^--resume on other data.*data.seed 0 -> 5 \(pass --resume-on"):
        _stream(folder, seed=5).resume_position(state, 2)

    def refused(stream: ShardStream) -> str:
        with pytest.raises(DataChangedError) as e:
            stream.resume_position(state, 2)
        assert "\n" not in str(e.value)
        return str(e.value)

    # Replaced: same names and keys, other content (a re-shard writes new stats with the tar).
    other = make_image_shards(tmp_path / "o", 3, 4, seed=7)
    tar, stats = folder / "shard-000001.tar", folder / "shard-000001.stats.json"
    saved = tar.read_bytes(), stats.read_bytes()
    times = (tar.stat().st_atime_ns, tar.stat().st_mtime_ns)
    tar.write_bytes((other / "shard-000001.tar").read_bytes())
    stats.write_bytes((other / "shard-000001.stats.json").read_bytes())
    assert "data fingerprint" in refused(_stream(folder)) and "12 samples) ->" in refused(_stream(folder))
    tar.write_bytes(saved[0])
    stats.write_bytes(saved[1])
    os.utime(tar, ns=times)  # byte for byte the original again
    assert _stream(folder).resume_position(state, 2) == 4
    # Removed: the shard loses its completion marker (the reader drops it); added: a fourth shard.
    stats.rename(tmp_path / "aside.json")
    assert "(12 samples) -> " in refused(_stream(folder)) and "(8 samples)" in refused(_stream(folder))
    (tmp_path / "aside.json").rename(stats)
    assert _stream(folder).resume_position(state, 2) == 4  # restored: accepted again
    more = make_image_shards(tmp_path / "m", 4, 4)
    assert "(16 samples)" in refused(_stream(more))
    assert _stream(more).resume_position(state, 2, allow_changed=True) == 4  # the explicit override


def test_fingerprint_covers_tar_content_without_stats(tmp_path: Path) -> None:
    folder = make_image_shards(tmp_path / "d", 2, 3)
    pattern = str(folder / "shard-*.tar")  # a glob: no .stats.json completion markers are read
    before = _stream(Path(pattern)).fingerprint
    tar = folder / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # one byte of a member's payload: same names, same keys
    tar.write_bytes(bytes(data))
    assert _stream(Path(pattern)).fingerprint != before


def test_rank_slices_are_disjoint_and_each_epoch_is_a_permutation(images: Path) -> None:
    n = 14
    steps = global_keys(images, world=2, batch=3, steps=7)  # 42 samples = 3 epochs
    assert all(len(s) == 6 for s in steps)
    stream = sum(steps, [])
    epochs = [stream[i:i + n] for i in range(0, len(stream), n)]
    for e in epochs:
        assert sorted(e) == sorted(all_keys(images))  # every sample exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    assert global_keys(images, 2, 3, 3, seed=1) != steps[:3]  # and by seed


def test_every_rank_runs_the_same_number_of_full_steps_with_uneven_shards(tmp_path: Path) -> None:
    folder = make_image_shards(tmp_path, 3, [1, 9, 3], size=32)
    per_rank = [keys(folder, r, 3, 4, 12) for r in range(3)]  # 12 steps of 12 = 11 epochs of 13
    for ks in per_rank:
        assert len(ks) == 12 and all(len(b) == 4 for b in ks)
    for s in range(12):
        step = sum((per_rank[r][s] for r in range(3)), [])
        assert len(step) == 12


def test_same_batches_with_0_and_2_workers(images: Path) -> None:
    cfg = {"shards": str(images), "batch_size": 3, "image_size": 24}
    b0 = take(ShardStream(DataConfig(num_workers=0, **cfg), 1, 2), 5, 2)
    b2 = take(ShardStream(DataConfig(num_workers=2, **cfg), 1, 2), 5, 2)
    assert [b["__key__"] for b in b0] == [b["__key__"] for b in b2]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(b0, b2))


def test_image_batch_contract(images: Path) -> None:
    (b,) = take(ShardStream(DataConfig(shards=str(images), batch_size=4, num_workers=0, image_size=16), 0, 1), 1)
    assert set(b) == {"__key__", "caption", "image"}
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() < b["image"].max() <= 1.0
    index = json.loads((images / "_manifest.json").read_text())
    assert index["shards"] == 3
    assert all(isinstance(c, str) and c for c in b["caption"])


def _raw_latent_members(folder: Path, key: str) -> dict[str, np.ndarray]:
    for tar in folder.glob("shard-*.tar"):
        with tarfile.open(tar) as tf:
            found = {m.name.split(".", 1)[1]: m for m in tf.getmembers() if m.name.startswith(key + ".")}
            if found:
                out = {}
                for ext, m in found.items():
                    f = tf.extractfile(m)
                    assert f is not None
                    if ext.endswith(".npy"):
                        out[ext[:-4]] = np.load(io.BytesIO(f.read()), allow_pickle=False)
                return out
    raise KeyError(key)


@pytest.mark.parametrize("max_text_len", [5, 16])
def test_latent_batch_shapes_dtypes_masks_and_values(latents: Path, max_text_len: int) -> None:
    cfg = DataConfig(shards=str(latents), kind="latents", batch_size=4, num_workers=0, max_text_len=max_text_len)
    stream = ShardStream(cfg, 0, 1)
    assert stream.manifest is not None and stream.manifest["encoders"]["vae"]["scaling_factor"] == 0.18215
    (b,) = take(stream, 1)
    assert b["latent"].shape == (4, 4, 3, 5) and b["latent"].dtype == torch.float32
    assert b["tokens"].shape == (4, 15) and b["tokens"].dtype == torch.int64
    assert b["text"].shape == (4, max_text_len, 6) and b["text"].dtype == torch.float32
    assert b["text_mask"].shape == (4, max_text_len) and b["text_mask"].dtype == torch.bool
    assert b["pooled"].shape == (4, 6) and b["pooled"].dtype == torch.float32
    for j, key in enumerate(b["__key__"]):
        raw = _raw_latent_members(latents, key)
        n = min(len(raw["text"]), max_text_len)
        assert b["text_mask"][j].tolist() == [True] * n + [False] * (max_text_len - n)
        assert torch.equal(b["text"][j, :n], torch.from_numpy(raw["text"][:n].astype(np.float32)))
        assert not b["text"][j, n:].any()
        assert torch.equal(b["latent"][j], torch.from_numpy(raw["latent"]))
        assert torch.equal(b["tokens"][j], torch.from_numpy(raw["tokens"].astype(np.int64)))
        assert torch.equal(b["pooled"][j], torch.from_numpy(raw["pooled"]))


def test_latents_without_tokens_have_no_tokens_key(tmp_path: Path) -> None:
    folder = make_latent_shards(tmp_path, 1, 3, with_tokens=False)
    (b,) = take(ShardStream(DataConfig(shards=str(folder), kind="latents", batch_size=2, num_workers=0), 0, 1), 1)
    assert "tokens" not in b and b["latent"].shape == (2, 8, 4, 4)


class _Boom:
    """Unpickling this creates a directory: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_pickle_members_are_never_decoded(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(marker))
    folder = make_image_shards(tmp_path, 2, 3, extra_members={"pkl": payload, "pth": payload, "pyd": payload})
    stream = ShardStream(DataConfig(shards=str(folder), batch_size=3, num_workers=0), 0, 1)
    batches = take(stream, 4)
    assert not marker.exists()
    assert all(set(b) == {"__key__", "caption", "image"} for b in batches)
    assert {k: v for k, v in stream.skipped.items()} == {
        "member_ignored:pkl": 6, "member_ignored:pth": 6, "member_ignored:pyd": 6}


def test_pickled_npy_is_refused_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = make_latent_shards(tmp_path, 1, 4, with_tokens=False)
    evil = np.empty((1,), dtype=object)
    evil[0] = _Boom(marker)
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)
    write_tar(folder / "shard-000001.tar", [{
        "__key__": "evil", "txt": "x", "latent.npy": buf.getvalue(),
        "text.npy": npy(np.zeros((2, 8), np.float16)), "pooled.npy": npy(np.zeros(8, np.float32))}])
    (folder / "shard-000001.stats.json").write_text("{}")
    stream = ShardStream(DataConfig(shards=str(folder), kind="latents", batch_size=5, num_workers=0), 0, 1)
    batches = take(stream, 3)
    assert not marker.exists()
    assert stream.skipped["decode_error:latent.npy"] >= 1
    assert all(len(b["__key__"]) == 5 and "evil" not in b["__key__"] for b in batches)


def test_truncated_and_unreadable_tars_are_counted_not_fatal(tmp_path: Path) -> None:
    folder = make_image_shards(tmp_path, 3, 4, size=32)
    tar = folder / "shard-000002.tar"
    with tarfile.open(tar) as tf:
        png = [m for m in tf.getmembers() if m.name.endswith(".png")][-1]
    truncate(tar, tar.stat().st_size - png.offset_data - 100)  # cut inside the last sample's image
    (folder / "shard-000003.tar").write_bytes(b"this is not a tar" * 10)
    (folder / "shard-000003.stats.json").write_text("{}")
    (folder / "shard-000004.tar").write_bytes((folder / "shard-000000.tar").read_bytes())  # no stats: incomplete
    stream = ShardStream(DataConfig(shards=str(folder), batch_size=4, num_workers=0), 0, 1)
    assert stream.skipped["tar_truncated"] == 1 and stream.skipped["sample_truncated"] == 1
    assert stream.skipped["tar_unreadable"] == 1 and stream.skipped["shard_incomplete"] == 1
    assert stream.num_samples == 11
    assert all(len(b["__key__"]) == 4 for b in take(stream, 6))


def test_corrupt_member_is_skipped_replaced_and_resume_stays_exact(tmp_path: Path) -> None:
    folder = make_image_shards(tmp_path, 1, 5, size=32)
    write_tar(folder / "shard-000001.tar", [{"__key__": "broken", "png": b"\x89PNG not really", "txt": "x"},
                                             {"__key__": "nocap", "png": b"irrelevant"}])
    (folder / "shard-000001.stats.json").write_text("{}")
    stream = ShardStream(DataConfig(shards=str(folder), batch_size=2, num_workers=0), 0, 1)
    assert stream.skipped == {"sample_missing:txt": 1}
    full = [b["__key__"] for b in take(stream, 9)]  # 18 samples = 3 epochs of 6: "broken" met >= 3 times
    assert stream.skipped["decode_error:png"] >= 3
    assert all(len(k) == 2 and "broken" not in k for k in full)
    assert keys(folder, 0, 1, 2, 5, start=4) == full[4:]


def test_glob_and_brace_patterns_and_errors(images: Path, tmp_path: Path) -> None:
    by_glob = keys(Path(f"{images}/shard-00000[01].tar"), 0, 1, 3, 2)
    by_brace = keys(Path(f"{images}/shard-{{000000..000001}}.tar"), 0, 1, 3, 2)
    assert by_glob == by_brace and all(k < "00000012" for b in by_glob for k in b)
    with pytest.raises(ConfigError, match="data.shards"):
        ShardStream(DataConfig(shards=str(tmp_path / "nothing")), 0, 1)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from latentpipe.preprocessing.config import from_dict

        from_dict(DataConfig, {"batch_size": 0}, prefix="data.")


def test_index_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    folder = make_image_shards(tmp_path / "d", 2, 3, size=32)
    first = keys(folder, 0, 1, 3, 2)
    cached = sorted((tmp_path / "cache" / "tar_index").glob("*.npz"))
    assert len(cached) == 2
    assert keys(folder, 0, 1, 3, 2) == first
    make_image_shards(tmp_path / "d", 2, 4, size=32)  # rewritten: new size and mtime
    assert len(ShardStream(DataConfig(shards=str(folder), num_workers=0), 0, 1).skipped) == 0
    assert ShardStream(DataConfig(shards=str(folder), num_workers=0), 0, 1).num_samples == 8


def test_global_batch_larger_than_the_dataset(tmp_path: Path) -> None:
    folder = make_latent_shards(tmp_path, 1, 3, with_tokens=False)
    stream = sum(global_keys(folder, world=2, batch=4, steps=3, kind="latents"), [])  # 24 = 8 epochs of 3
    assert all(sorted(stream[i:i + 3]) == ["00000000", "00000001", "00000002"] for i in range(0, 24, 3))
    with pytest.raises(ConfigError, match="shard folders below it"):
        ShardStream(DataConfig(shards=str(tmp_path), kind="latents"), 0, 1)
