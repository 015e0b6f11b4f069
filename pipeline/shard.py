"""``latentpipe shard``: a Ray job that turns image-caption sources into WebDataset image shards.

Plan, then one Ray task per shard (img2dataset's design: shard ``i`` covers input rows
``[i*S, (i+1)*S)`` of a stable listing, so a rerun redoes only the shards without a completion
marker). Each task reads its inputs, fetches URLs politely, checks the caption, decodes and
re-encodes the image, and writes ``images/shard-NNNNNN.tar`` atomically, then its
``.stats.json``. A task that dies is retried by Ray and rewrites the same shard, so a killed
worker neither loses nor duplicates samples.

De-duplication (exact, by SHA-256 of the source bytes) is deterministic whatever the task
order, retries or reruns: inside a shard the first occurrence wins; across shards the
*finalize* step, which runs only once every shard is complete, keeps the occurrence in the
lowest shard and rewrites the later shards without their copies (marker removed first,
rewritten tar, new marker). The result is a pure function of the complete set of shards, so a
resumed run ends with the same ``_index.parquet`` as a clean one. Then ``_index.parquet`` and
``_manifest.json`` are written; the dataset is final once ``_manifest.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from latentpipe.pipeline.job_tracking import JobRecord, JobTracking, counts, log_job
from latentpipe.pipeline.manifest import summary_table, totals, write_index, write_manifest
from latentpipe.pipeline.shard_store import (
    INDEX,
    MANIFEST,
    OutputDir,
    ShardPlan,
    ShardStats,
    prepare_output,
    rewrite_without,
    shards_to_run,
)
from latentpipe.preprocessing import __version__
from latentpipe.preprocessing.captions import CaptionConfig, CaptionError, normalize_caption
from latentpipe.preprocessing.config import config_hash, to_dict
from latentpipe.preprocessing.fetch import FetchConfig, Fetcher, FetchResult, is_transient
from latentpipe.preprocessing.images import ImageConfig, ImageError, process_image
from latentpipe.preprocessing.progress import Progress
from latentpipe.preprocessing.sources import RawSample, Source, SourceConfig, SourceError, open_source

log = logging.getLogger("latentpipe.shard")

INDEX_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int64()), ("caption", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string())])
INTERNAL_ERROR = "internal_error"  # counted like any skip; its details name the exception
CRASH_HOOK_ENV = "LATENTPIPE_TEST_CRASH"  # "shard=N,after=K,marker=PATH": first attempt of shard N exits


@dataclass
class ShardConfig:
    """The ``latentpipe shard`` config. Everything but the run-only keys goes into the config hash."""

    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = ""                       # output root; shards go to <out>/images (local path or URL)
    samples_per_shard: int = 1000
    dedup: bool = True                  # drop exact duplicates (same source bytes) across the run
    image: ImageConfig = field(default_factory=ImageConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    # run-only: how, not what
    ray_address: str | None = None      # None: a local Ray cluster; "auto" or ray://... joins one
    num_cpus_per_task: float = 1.0
    task_retries: int = 3               # Ray retries of a shard task whose worker died
    tracking: JobTracking = field(default_factory=JobTracking)  # a run per job (pipeline/job_tracking.py)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.num_cpus_per_task <= 0 or self.task_retries < 0:
            raise ValueError("num_cpus_per_task must be > 0 and task_retries >= 0")


def content_config(cfg: ShardConfig) -> dict[str, Any]:
    """The config minus run-only keys: what the output depends on (hashed, checked on reruns)."""
    d = to_dict(cfg)
    for k in ("out", "ray_address", "num_cpus_per_task", "task_retries", "tracking"):
        d.pop(k)
    d["fetch"] = {"max_bytes": cfg.fetch.max_bytes}  # timeouts and politeness change nothing stored
    d["source"].pop("allow_pipe")
    return d


def sample_key(index: int) -> str:
    """Stable, unique key of input ``index`` (no dots: WebDataset splits key and extension there)."""
    return f"{index:09d}"


# ------------------------------------------------------------------------------------ the task


def _crash_hook(hooks: dict[str, Any], shard: int, n: int) -> None:
    """Test hook: the first attempt of one shard kills its own worker process after ``after`` samples."""
    if hooks.get("shard") == shard and hooks.get("after") == n:
        marker = str(hooks["marker"])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # a retry: run normally
        os.close(fd)
        os._exit(17)


def _process(raw: RawSample, fetched: FetchResult | None, cfg: ShardConfig, stats: ShardStats,
             seen: set[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One input -> (tar sample, index row), or None after counting its skip / duplicate."""
    where = {"index": raw.index, "source": raw.source_id}
    if raw.error is not None:
        stats.skip(raw.error, **where, detail=raw.detail[:300])
        return None
    if fetched is not None:
        if fetched.reason is not None:
            stats.skip(fetched.reason, **where, url=raw.url, detail=fetched.detail[:300])
            return None
        raw.data = fetched.data
    data = raw.data or b""
    sha = hashlib.sha256(data).hexdigest()
    if cfg.dedup and sha in seen:
        stats.duplicates += 1
        return None
    try:
        caption = normalize_caption(raw.caption, cfg.caption)
        img = process_image(data, cfg.image)
    except (CaptionError, ImageError) as e:
        stats.skip(e.reason, **where, detail=str(e)[:300])
        return None
    except Exception as e:  # a sample that trips an unforeseen library error must not sink its shard
        log.warning("input %d (%s): unexpected %s: %s", raw.index, raw.source_id, type(e).__name__, e)
        stats.skip(INTERNAL_ERROR, **where, detail=f"{type(e).__name__}: {e}"[:300])
        return None
    seen.add(sha)
    key = sample_key(raw.index)
    meta = {"key": key, "source": raw.source_id, "sha256": sha, "source_bytes": len(data),
            "source_size": [img.source_width, img.source_height], "size": [img.width, img.height],
            "source_format": img.source_format, "source_mode": img.source_mode, **raw.meta}
    sample = {"__key__": key, img.ext: img.data, "txt": caption.encode("utf-8"),
              "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}
    row = {"key": key, "caption": caption, "width": img.width, "height": img.height, "sha256": sha}
    return sample, row


def write_shard(source: Source, shard: int, start: int, stop: int, cfg: ShardConfig, out: OutputDir,
                hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Process inputs ``[start, stop)`` into shard ``shard``: tar (atomic), then stats. Returns the stats."""
    t0 = time.monotonic()
    stats = ShardStats(shard, [start, stop])
    index: dict[str, list[Any]] = {name: [] for name in INDEX_SCHEMA.names}
    seen: set[str] = set()

    def url_of(s: RawSample) -> str | None:
        return s.url if s.error is None and s.data is None else None

    with out.tar(shard) as tar, Fetcher(cfg.fetch) as fetcher:
        for n, (raw, fetched) in enumerate(fetcher.map_ordered(source.read(start, stop), url_of)):
            if hooks:
                _crash_hook(hooks, shard, n)
            stats.inputs += 1
            done = _process(raw, fetched, cfg, stats, seen)
            if done is None:
                continue
            sample, row = done
            tar.write(sample)
            stats.written += 1
            for k, v in row.items():
                index[k].append(v)
            index["shard"].append(shard)
        if stats.inputs != stop - start:
            raise RuntimeError(f"shard {shard}: source yielded {stats.inputs} of {stop - start} inputs")
        stats.bytes = tar.commit()
    stats.index = index
    stats.seconds = round(time.monotonic() - t0, 3)
    stats.extra["transient"] = stats.count(is_transient)
    out.write_stats(stats)  # the completion marker, after the rename
    d = stats.to_dict()
    d.pop("index")  # the driver reads it from disk when it finalizes
    return d


# ---------------------------------------------------------------------------------- finalize


def dedup_across_shards(out: OutputDir, stats: list[ShardStats]) -> int:
    """Keep each source hash in its lowest shard only; rewrite later shards without it. Returns drops."""
    owner: set[str] = set()
    dropped = 0
    for st in sorted(stats, key=lambda s: s.shard):
        drop = {k for k, h in zip(st.index["key"], st.index["sha256"]) if h in owner}
        owner.update(st.index["sha256"])
        if not drop:
            continue
        out.invalidate(st.shard)
        st.bytes = rewrite_without(out, st.shard, drop)
        keep = [i for i, k in enumerate(st.index["key"]) if k not in drop]
        st.index = {name: [col[i] for i in keep] for name, col in st.index.items()}
        st.written -= len(drop)
        st.duplicates += len(drop)
        st.extra["cross_shard_duplicates"] = st.extra.get("cross_shard_duplicates", 0) + len(drop)
        out.write_stats(st)
        dropped += len(drop)
    return dropped


@dataclass
class ShardJobResult:
    out: str
    num_shards: int
    ran: list[int]
    failed: dict[int, str]
    stats: list[ShardStats]
    manifest: dict[str, Any] | None
    wall_seconds: float

    @property
    def summary(self) -> str:
        return summary_table(self.stats, self.wall_seconds)


def _hooks_from_env() -> dict[str, Any]:
    spec = os.environ.get(CRASH_HOOK_ENV, "")
    if not spec:
        return {}
    kv = dict(part.split("=", 1) for part in spec.split(","))
    return {"shard": int(kv["shard"]), "after": int(kv.get("after", "0")), "marker": kv["marker"]}


def _run_tasks(source: Source, plan: ShardPlan, todo: list[int], cfg: ShardConfig, out: OutputDir,
               progress: bool) -> dict[int, str]:
    """Submit one task per shard (bounded in flight); returns {shard: error} for shards that failed."""
    import ray

    task = ray.remote(write_shard).options(num_cpus=cfg.num_cpus_per_task, max_retries=cfg.task_retries,
                                           retry_exceptions=[OSError])
    source_ref, hooks = ray.put(source), _hooks_from_env()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) / cfg.num_cpus_per_task))
    pending: dict[Any, int] = {}
    queue, failed = list(todo), {}
    with Progress(len(todo), "shards", unit="shard", enabled=progress) as bar:
        while queue or pending:
            while queue and len(pending) < 2 * cpus:
                i = queue.pop(0)
                pending[task.remote(source_ref, i, *plan.range(i), cfg, out, hooks)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                st = ray.get(ready[0])
                bar.update(1, samples=st["written"])
            except (ray.exceptions.RayError, OSError) as e:
                msg = str(e).strip().splitlines()
                failed[i] = msg[-1] if msg else type(e).__name__
                log.error("shard %d failed: %s", i, failed[i])
                bar.update(1)
    return failed


def run_shard_job(cfg: ShardConfig, overwrite: bool = False, retry_transient: bool = False,
                  progress: bool = True) -> ShardJobResult:
    """Plan, run missing shards on Ray, then finalize (cross-shard dedup, index, manifest)."""
    t0 = time.monotonic()
    if not cfg.out:
        raise SourceError("no output folder given (--out)")
    source = open_source(cfg.source, cfg.fetch.max_bytes)
    if source.num_inputs == 0:
        raise SourceError(f"source {cfg.source.spec!r} has no inputs")
    plan = ShardPlan(source.num_inputs, cfg.samples_per_shard)
    out = OutputDir(cfg.out.rstrip("/") + "/images")
    content = content_config(cfg)
    header = {"kind": "images", "config": content, "config_hash": config_hash(content),
              "source_kind": source.kind, "source_fingerprint": source.fingerprint(),
              "num_inputs": plan.num_inputs, "samples_per_shard": plan.samples_per_shard,
              "num_shards": plan.num_shards}
    prepare_output(out, header, overwrite)
    redo = (lambda st: st.count(is_transient) > 0) if retry_transient else None
    todo = shards_to_run(out, plan.num_shards, redo)
    log.info("%d inputs -> %d shards of %d in %s: %d to write, %d already complete", plan.num_inputs,
             plan.num_shards, plan.samples_per_shard, out.url, len(todo), plan.num_shards - len(todo))
    failed: dict[int, str] = {}
    if todo:
        import ray

        from latentpipe.preprocessing.local_ray import init_ray

        started = init_ray(cfg.ray_address, logging_level=logging.WARNING, configure_logging=True)
        try:
            failed = _run_tasks(source, plan, todo, cfg, out, progress)
        finally:
            if started:
                ray.shutdown()
        out.remove_temporaries()  # left by attempts that were killed and retried; no writer runs now
    stats = []
    for i in sorted(out.complete_shards()):
        st = out.read_stats(i)
        if st is None:  # a damaged marker: drop it so the next run redoes the shard
            log.warning("shard %d: unreadable stats file; marking the shard incomplete", i)
            out.invalidate(i)
        elif i < plan.num_shards:
            stats.append(st)
    manifest = None
    if failed or len(stats) != plan.num_shards:
        log.error("%d of %d shards incomplete; rerun the same command to finish them",
                  plan.num_shards - len(stats), plan.num_shards)
    else:
        manifest = finalize(out, stats, header, cfg)
    result = ShardJobResult(out.url, plan.num_shards, todo, failed, stats, manifest, time.monotonic() - t0)
    log_job(cfg.tracking, _job_record(cfg, content, result))
    return result


def _job_record(cfg: ShardConfig, content: dict[str, Any], result: ShardJobResult) -> JobRecord:
    """The job's MLflow run: config, counts and skips, throughput, the image shards it wrote."""
    metrics = {**counts(totals(result.stats), result.wall_seconds), "shards": float(result.num_shards),
               "shards_written_now": float(len(result.ran)), "shards_failed": float(len(result.failed))}
    folder = "/".join(result.out.rstrip("/").split("/")[-2:])
    return JobRecord("shard", f"shard {cfg.source.spec} -> {folder}", content, metrics,
                     [(result.out, result.manifest, "output")], result.manifest, result.summary,
                     result.wall_seconds, result.manifest is not None)


def finalize(out: OutputDir, stats: list[ShardStats], header: dict[str, Any], cfg: ShardConfig) -> dict[str, Any]:
    """All shards complete: cross-shard dedup, then ``_index.parquet`` and ``_manifest.json``."""
    if cfg.dedup:
        n = dedup_across_shards(out, stats)
        if n:
            log.info("dropped %d duplicates found in more than one shard", n)
    rows = write_index(out, stats, INDEX_SCHEMA)
    t = totals(stats)
    assert rows == t["written"], (rows, t["written"])
    t["transient"] = sum(st.count(is_transient) for st in stats)
    return write_manifest(out, {**header, "code_version": __version__, "index": INDEX, "manifest": MANIFEST,
                                "shard_count": len(stats), "totals": t,
                                "image": {"format": cfg.image.format, "size": cfg.image.size,
                                          "resize": cfg.image.resize}})


__all__ = ["INDEX_SCHEMA", "ShardConfig", "ShardJobResult", "content_config", "dedup_across_shards", "finalize",
           "run_shard_job", "sample_key", "write_shard"]
