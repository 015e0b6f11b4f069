"""The training loader over shards written by the real ``latentpipe shard`` job (local Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from latentpipe.training.data import DataConfig, ShardStream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shard_output(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    from latentpipe.pipeline.shard import ShardConfig, run_shard_job
    from latentpipe.preprocessing.images import ImageConfig
    from latentpipe.preprocessing.sources import SourceConfig

    out = tmp_path_factory.mktemp("shard")
    cfg = ShardConfig(source=SourceConfig(spec="synthetic:13"), out=str(out), samples_per_shard=5,
                      image=ImageConfig(size=32, format="jpg"))
    result = run_shard_job(cfg, progress=False)
    assert not result.failed and result.manifest is not None
    return out / "images"


def test_loader_reads_latentpipe_shard_output(shard_output: Path, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("LATENTPIPE_CACHE", str(tmp_path))
    index = pq.read_table(shard_output / "_index.parquet").to_pylist()
    captions = {r["key"]: r["caption"] for r in index}
    streams = [ShardStream(DataConfig(shards=str(shard_output), batch_size=4, num_workers=w), r, 2)
               for w in (0, 2) for r in (0, 1)]
    assert all(s.num_samples == len(index) and not s.skipped for s in streams)
    assert streams[0].manifest is not None
    runs = []
    for s in streams:
        gen = s.batches(0)
        runs.append([next(gen) for _ in range(4)])
        gen.close()
    assert [b["__key__"] for b in runs[0]] == [b["__key__"] for b in runs[2]]  # 0 vs 2 workers, rank 0
    assert [b["__key__"] for b in runs[1]] == [b["__key__"] for b in runs[3]]  # rank 1
    epoch = sum((runs[0][i]["__key__"] + runs[1][i]["__key__"] for i in range(2)), [])[:len(index)]
    assert sorted(epoch) == sorted(captions)  # stream positions 0..12 hold every sample once
    for b in runs[0] + runs[1]:
        assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
        assert -1.0 <= float(b["image"].min()) < float(b["image"].max()) <= 1.0
        assert b["caption"] == [captions[k] for k in b["__key__"]]
