"""``latentpipe encode``: image shards -> latent shards, a Ray job (README, "Stages and on-disk formats").

Precomputing the frozen encoders once (Rombach et al. 2022, section 4) is the main cost
saving of latent-space training. Work units are whole shards:

    decode_shard (CPU task) ──▶ EncoderWorker.encode_shard (actor: GPU, or CPU) ──▶ write_shard (CPU task)

chained by object refs, so the decode of the next shards and the write of the previous one
run while an actor encodes. We drive Ray actors directly rather than Ray Data
``map_batches(ActorPoolStrategy)``: Ray Data streams blocks that mix rows of different
shards and writes one file per block, so one output tar per input shard, renamed into place
only when complete, would need a custom datasink that reassembles shards. With the shard as
the unit, atomicity is one rename (``latentpipe.pipeline.shard_store.AtomicTar``), a retried task rewrites
the same shard, and each distinct caption of a shard is encoded once. Inside a shard the
actor runs batched inference.

Output: ``<out>/latents/<encoder-id>/shard-NNNNNN.tar`` (+ ``.stats.json`` written last),
``_index.parquet`` and ``_manifest.json``. ``<encoder-id>`` hashes the weights and settings
of every encoder, so stale latents never mix with new ones. A rerun skips every shard whose
stats record the same input shard (the sha256 of its ``.stats.json``) and redoes the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from latentpipe.pipeline.encoder_sources import EncoderSource, build_encoder, resolve_source
from latentpipe.pipeline.job_tracking import JobRecord, JobTracking, counts, log_job
from latentpipe.pipeline.manifest import summary_table, totals, write_index, write_manifest
from latentpipe.pipeline.shard_store import (
    MANIFEST,
    SHARD_RE,
    OutputDir,
    ShardStats,
    clear_output,
    shard_name,
)
from latentpipe.preprocessing import __version__
from latentpipe.preprocessing.config import ConfigError, to_dict
from latentpipe.preprocessing.progress import Progress
from latentpipe.preprocessing.tar_format import (
    SAMPLE_TRUNCATED,
    TAR_UNREADABLE,
    drop_cut_sample,
    group_members,
    image_ext,
    read_ranges,
    scan_tar,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("latentpipe.encode")

SCHEMA_VERSION = 1
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int64()), ("caption", pa.string()),
                          ("text_len", pa.int32())])
_RUN_ONLY = ("ray_address", "overwrite", "num_actors", "actor_cpus", "inflight_per_actor", "mlflow_uri",
             "model_cache", "tracking")  # not in the manifest


@dataclass
class EncodeConfig:
    images: str = ""  # folder of image shards (shard-*.tar + .stats.json)
    out: str = ""  # dataset root: output goes to <out>/latents/<encoder-id>/
    vae: str | None = None  # diffusers AutoencoderKL folder, export folder or models:/name@alias
    vqgan: str | None = None  # diffusers VQModel folder, export folder or models:/name@alias
    text_encoder: str | None = None  # "minilm" (bundled) or a local transformers folder
    text_max_length: int = 77
    text_dtype: Literal["float16", "float32"] = "float16"  # stored per-token embeddings
    text_precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # compute; auto: bf16/fp16 on GPU
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per actor when the cluster has GPUs
    num_actors: int = 0  # 0: one per GPU, or one per 2 CPUs on a CPU cluster
    actor_cpus: float = 1.0
    inflight_per_actor: int = 3  # shards queued per actor (decode runs ahead by this much)
    ray_address: str | None = None  # None: start a local Ray; "auto" / "ray://..." join a cluster
    mlflow_uri: str | None = None  # registry of models:/ URIs; None: $MLFLOW_TRACKING_URI
    model_cache: str | None = None  # where models:/ URIs are downloaded; None: <out>/latents/_models
    overwrite: bool = False
    tracking: JobTracking = field(default_factory=JobTracking)  # a run per job (pipeline/job_tracking.py)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.text_max_length < 1:
            raise ValueError(f"text_max_length must be >= 1, got {self.text_max_length}")
        if self.inflight_per_actor < 1:
            raise ValueError(f"inflight_per_actor must be >= 1, got {self.inflight_per_actor}")


# ----------------------------------------------------------------------------- identity


def encoder_id(sources: list[EncoderSource], cfg: EncodeConfig, device: str) -> str:
    """``<roles>-<12 hex>`` from the weights' sha256 and every setting that changes the arrays."""
    keyed = [{"role": s.role, "format": s.format, "sha256": s.sha256} for s in sources]
    settings: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "device": device}
    if any(s.role == "text" for s in sources):
        settings.update(text_max_length=cfg.text_max_length, text_dtype=cfg.text_dtype,
                        text_precision=cfg.text_precision)
    blob = json.dumps({"encoders": keyed, "settings": settings}, sort_keys=True).encode()
    return "-".join(s.role for s in sources) + "-" + hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------- decode (CPU task)


def decode_shard(inp: OutputDir, shard: int, need_images: bool) -> dict[str, Any]:
    """Read one image shard; decode images to uint8 ``[n, H, W, 3]`` groups of equal size.

    Every bad sample is counted in the returned ``stats`` with its reason; a truncated or
    unreadable tar keeps every sample read before the damage (``stats.extra["truncated"]``).
    """
    from PIL import Image

    t0 = time.monotonic()
    stats = ShardStats(shard)
    keys: list[str] = []
    captions: list[str] = []
    metas: list[bytes | None] = []
    pixels: list[np.ndarray] = []

    def finish(key: str, files: dict[str, bytes]) -> None:
        img_ext = image_ext(files)
        if img_ext is None or "txt" not in files:
            what = "image" if img_ext is None else "caption"
            stats.skip(f"missing_{what}", key=key, detail=f"files: {sorted(files)}")
            return
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            stats.skip("bad_caption", key=key, detail=str(e))
            return
        if need_images:
            try:
                with Image.open(io.BytesIO(files[img_ext])) as im:
                    pixels.append(np.asarray(im.convert("RGB"), dtype=np.uint8))  # [H, W, 3]
            except Exception as e:  # PIL raises many types for corrupt data
                stats.skip("corrupt_image", key=key, detail=f"{type(e).__name__}: {e}"[:300])
                return
        keys.append(key)
        captions.append(caption)
        metas.append(files.get("json"))

    name = f"{shard_name(shard)}.tar"
    truncated: str | None = None
    try:
        with inp.fs.open_input_file(inp.path(name)) as fh:
            scan = scan_tar(fh, inp.size(name))
            if scan.damage is not None:  # damage: keep what precedes it
                truncated = f"{scan.damage}: {scan.detail}"
            samples, _ = group_members(scan.members)
            cut = drop_cut_sample(samples, scan.damage)
            for sm in samples:
                stats.inputs += 1
                if sm.problems:
                    stats.skip(sm.problems[0], key=sm.key)
                    continue
                exts = sorted(sm.members)
                finish(sm.key, dict(zip(exts, read_ranges(fh, [(sm.members[e].offset, sm.members[e].size)
                                                               for e in exts]))))
            if cut is not None:
                stats.inputs += 1
                stats.skip(SAMPLE_TRUNCATED, key=cut.key, detail=f"files: {sorted(cut.members)}")
    except OSError as e:  # the file went away or shrank while read
        truncated = f"{TAR_UNREADABLE}: {type(e).__name__}: {e}"
    stats.extra["truncated"] = truncated
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(pixels):
        groups.setdefault(a.shape, []).append(i)
    images = [(np.asarray(idx, dtype=np.int64), np.stack([pixels[i] for i in idx])) for idx in groups.values()]
    return {"stats": stats, "keys": keys, "captions": captions, "metas": metas, "images": images,
            "seconds": time.monotonic() - t0}


# ----------------------------------------------------------------------------- encode (actor)


class EncoderWorker:
    """Holds the encoders; encodes one decoded shard per call in batches of ``batch_size``."""

    def __init__(self, sources: list[EncoderSource], cfg: EncodeConfig, device: str | None,
                 threads: int) -> None:
        import torch

        if device != "cuda":
            torch.set_num_threads(max(1, threads))
        self.cfg = cfg
        self.encoders = [build_encoder(s, device, cfg.text_max_length, cfg.text_precision) for s in sources]

    def identities(self) -> list[dict[str, Any]]:
        return [e.identity() for e in self.encoders]

    def encode_shard(self, decoded: Mapping[str, Any]) -> dict[str, Any]:
        """Arrays per kept sample: ``latent`` / ``tokens`` ``[n, ...]``; text per distinct caption."""
        t0 = time.monotonic()
        n, b = len(decoded["keys"]), self.cfg.batch_size
        out: dict[str, Any] = {}
        for enc in self.encoders:
            if enc.inputs == "images":
                for idx, pix in decoded["images"]:  # idx: [m] positions; pix: uint8 [m, H, W, 3]
                    for s in range(0, len(idx), b):
                        arrays = enc.encode(pix[s:s + b])
                        for name, arr in arrays.items():
                            dest = out.setdefault(name, [None] * n)
                            for j, i in enumerate(idx[s:s + b]):
                                dest[i] = arr[j]
            else:
                unique = list(dict.fromkeys(decoded["captions"]))  # distinct captions, first-seen order
                where = {c: j for j, c in enumerate(unique)}
                text: list[np.ndarray] = []
                pooled: list[np.ndarray] = []
                for s in range(0, len(unique), b):
                    r = enc.encode(unique[s:s + b])
                    lengths = r["text_mask"].sum(axis=1)  # [b]: right padding, so mask = prefix
                    text += [r["text"][j, :lengths[j]].astype(self.cfg.text_dtype) for j in range(len(lengths))]
                    pooled += list(r["pooled"])
                out["text"], out["pooled"] = text, pooled
                out["caption_index"] = [where[c] for c in decoded["captions"]]
        out["seconds"] = time.monotonic() - t0
        return out


# ----------------------------------------------------------------------------- write (CPU task)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_shard(out: OutputDir, decoded: Mapping[str, Any], encoded: Mapping[str, Any], enc_id: str,
                input_stats: str) -> dict[str, Any]:
    """Write ``shard-NNNNNN.tar`` atomically, then its ``.stats.json``; returns the stats (without index)."""
    t0 = time.monotonic()
    stats: ShardStats = decoded["stats"]
    nbytes: Counter[str] = Counter()
    arrays: dict[str, dict[str, Any]] = {}
    text_len: list[int | None] = []
    with out.tar(stats.shard) as tw:
        for i, key in enumerate(decoded["keys"]):
            sample: dict[str, Any] = {"__key__": key, "txt": decoded["captions"][i].encode("utf-8")}
            for nm in ("latent", "tokens"):
                if nm in encoded:
                    a = encoded[nm][i]
                    sample[f"{nm}.npy"] = _npy(a)
                    arrays.setdefault(nm, {"shape": list(a.shape), "dtype": str(a.dtype)})
            if "text" in encoded:
                j = encoded["caption_index"][i]
                t, p = encoded["text"][j], encoded["pooled"][j].astype(np.float32)
                sample["text.npy"], sample["pooled.npy"] = _npy(t), _npy(p)  # t: [L, D], no padding
                arrays.setdefault("text", {"shape": [None, int(t.shape[1])], "dtype": str(t.dtype)})
                arrays.setdefault("pooled", {"shape": list(p.shape), "dtype": "float32"})
            text_len.append(int(t.shape[0]) if "text" in encoded else None)
            if decoded["metas"][i] is not None:
                sample["json"] = decoded["metas"][i]
            for ext, data in sample.items():
                if ext != "__key__":
                    nbytes[ext] += len(data)
            tw.write(sample)
        stats.bytes = tw.commit()
    n = stats.written = len(decoded["keys"])
    stats.index = {"key": list(decoded["keys"]), "shard": [stats.shard] * n,
                   "caption": list(decoded["captions"]), "text_len": text_len}
    seconds = {"decode": decoded["seconds"], "encode": encoded["seconds"], "write": time.monotonic() - t0}
    stats.seconds = round(sum(seconds.values()), 4)
    stats.extra.update({
        "encoder_id": enc_id, "input_stats": input_stats, "arrays": arrays,
        "bytes_per_sample": {k: round(v / n, 1) for k, v in sorted(nbytes.items())} if n else {},
        "distinct_captions": len(encoded["text"]) if "text" in encoded else None,
        "image_sizes": sorted([int(v) for v in pix.shape[1:3]] for _, pix in decoded["images"]),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    })
    out.write_stats(stats)  # the completion marker, after the tar is in place
    d = stats.to_dict()
    d.pop("index")
    return d


# ----------------------------------------------------------------------------- driver


def list_inputs(inp: OutputDir) -> tuple[dict[int, str], list[int]]:
    """({shard: sha256 of its .stats.json} of complete image shards, [incomplete shard numbers])."""
    names = inp.names()
    if not names:
        raise FileNotFoundError(f"--images {inp.url}: no such folder, or it is empty")
    tars = {int(m.group(1)) for n in names if (m := SHARD_RE.match(n)) and m.group(2) == "tar"}
    if not tars:
        raise FileNotFoundError(f"--images {inp.url}: no image shards (shard-NNNNNN.tar) in this folder; "
                                "point it at the images/ folder `latentpipe shard` wrote")
    done = inp.complete_shards()
    fps = {i: hashlib.sha256(inp.read_bytes(inp.stats_name(i))).hexdigest()[:16] for i in sorted(tars & done)}
    return fps, sorted(tars - done)


def _sources(cfg: EncodeConfig) -> list[EncoderSource]:
    given: list[tuple[Literal["vae", "vqgan", "text"], str | None]] = [
        ("vae", cfg.vae), ("vqgan", cfg.vqgan), ("text", cfg.text_encoder)]
    cache_dir = cfg.model_cache or (None if "://" in cfg.out else f"{cfg.out.rstrip('/')}/latents/_models")
    cache = Path(cache_dir) if cache_dir else None
    sources = [resolve_source(role, uri, cache, cfg.mlflow_uri) for role, uri in given if uri]
    if not sources:
        raise ConfigError("no encoder given: pass at least one of --vae, --vqgan, --text-encoder")
    return sources


def _ray_init(address: str | None) -> bool:
    import os

    from latentpipe.preprocessing.local_ray import init_ray

    env = {k: os.environ.get(k, "1") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    # Workers' output (an actor's whole traceback) reaches the terminal with -v (debug logs) only: the
    # error itself is raised here and printed as its root cause's one line.
    return init_ray(address, runtime_env={"env_vars": env}, logging_level=logging.WARNING,
                    log_to_driver=log.isEnabledFor(logging.DEBUG))


def run_encode(cfg: EncodeConfig, show_progress: bool = True) -> dict[str, Any]:
    """Encode every complete image shard of ``cfg.images`` not already encoded; returns a summary."""
    import ray

    if not cfg.images or not cfg.out:
        raise ConfigError("images and out are required")
    t0 = time.monotonic()
    inp = OutputDir(cfg.images.rstrip("/"))
    inputs, incomplete = list_inputs(inp)
    for i in incomplete:
        log.warning("input %s has no .stats.json (not finished by `latentpipe shard`): skipped", shard_name(i))
    sources = _sources(cfg)
    started = False
    try:
        if ray.is_initialized() or cfg.ray_address:
            started = _ray_init(cfg.ray_address)
            gpus = int(ray.cluster_resources().get("GPU", 0))
        else:  # the local cluster Ray would start sees exactly these GPUs; start it only if needed
            import torch

            gpus = torch.cuda.device_count()
        if cfg.device == "cuda" and gpus == 0:
            raise ConfigError("device=cuda but the Ray cluster has no GPU")
        device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "cpu"
        enc_id = encoder_id(sources, cfg, device)
        out = OutputDir(f"{cfg.out.rstrip('/')}/latents/{enc_id}")
        if cfg.overwrite:
            clear_output(out)
        out.makedirs()
        out.remove_temporaries()  # left by a killed run; a concurrent run on the same folder is not supported
        todo = [i for i, fp in inputs.items()
                if (st := out.read_stats(i)) is None or st.extra.get("input_stats") != fp]
        fingerprint = hashlib.sha256(json.dumps([sorted(inputs.items()), incomplete]).encode()).hexdigest()[:16]
        summary: dict[str, Any] = {"out_dir": out.url, "encoder_id": enc_id, "shards": len(inputs),
                                   "already_done": len(inputs) - len(todo), "encoded_now": len(todo),
                                   "written_now": 0, "incomplete_inputs": [shard_name(i) for i in incomplete]}
        if not todo and out.exists(MANIFEST) and out.read_json(MANIFEST).get("inputs_fingerprint") == fingerprint:
            log.info("all %d shards already encoded in %s: nothing to do", len(inputs), out.url)
            return {**summary, "seconds": time.monotonic() - t0}
        started = _ray_init(cfg.ray_address) or started
        res = ray.cluster_resources()
        n_act = cfg.num_actors or (int(res.get("GPU", 0)) if device == "cuda" else int(res.get("CPU", 2)) // 2)
        n_act = max(1, min(n_act, len(todo) or 1))
        opts: dict[str, Any] = {"num_cpus": cfg.actor_cpus, "max_restarts": 2, "max_task_retries": 2}
        if device == "cuda":
            opts["num_gpus"] = 1
        worker_cls: Any = ray.remote(EncoderWorker)
        actors: list[Any] = [worker_cls.options(**opts).remote(sources, cfg, device, int(cfg.actor_cpus))
                             for _ in range(n_act)]
        try:
            written, identities, steady = _run_shards(actors, inp, out, todo, inputs, enc_id, cfg, sources,
                                                      show_progress)
            summary.update(written_now=written, encode_seconds=steady)
        finally:
            for a in actors:
                ray.kill(a)
        stats = [st for st in (out.read_stats(i) for i in sorted(inputs)) if st is not None]
        manifest = finalize(out, cfg, identities, stats, incomplete, fingerprint)
        dt = time.monotonic() - t0
        summary.update(seconds=dt, samples_per_s=summary["written_now"] / max(dt, 1e-9), totals=manifest["totals"],
                       table=summary_table(stats, dt))
        log.info("encoded %d shards (%d already done) into %s in %.1fs; bytes/sample %s", len(todo),
                 summary["already_done"], out.url, dt, manifest["totals"]["bytes_per_sample"])
        log_job(cfg.tracking, _job_record(inp, out, manifest, summary), cfg.mlflow_uri)
        return summary
    finally:
        if started:
            ray.shutdown()


def _job_record(inp: OutputDir, out: OutputDir, manifest: dict[str, Any], summary: dict[str, Any]) -> JobRecord:
    """The job's MLflow run: settings, counts and skips, throughput, image shards in, latent shards out."""
    metrics = {**counts(manifest["totals"], summary["seconds"]), "shards": float(summary["shards"]),
               "shards_encoded_now": float(summary["encoded_now"]), "written_now": float(summary["written_now"]),
               "encode_seconds": float(summary.get("encode_seconds", 0.0))}
    metrics.update({f"bytes_per_sample/{k}": float(v) for k, v in manifest["totals"]["bytes_per_sample"].items()})
    images = inp.read_json(MANIFEST) if inp.exists(MANIFEST) else None
    folder = "/".join(inp.url.rstrip("/").split("/")[-2:])
    return JobRecord("encode", f"encode {folder} -> {manifest['encoder_id']}", manifest["config"], metrics,
                     [(inp.url, images, "source"), (out.url, manifest, "output")], manifest, summary["table"],
                     summary["seconds"], manifest["complete"])


def _run_shards(actors: list[Any], inp: OutputDir, out: OutputDir, todo: list[int], inputs: Mapping[int, str],
                enc_id: str, cfg: EncodeConfig, sources: list[EncoderSource], show_progress: bool
                ) -> tuple[int, list[dict[str, Any]], float]:
    """Chain decode -> encode -> write per shard, at most ``inflight_per_actor`` shards per actor.

    The first shards are decoded while the actors load their models. Returns (samples written,
    the encoders' identities, seconds from the actors being ready to the last shard written).
    """
    import ray

    decode: Any = ray.remote(num_cpus=1, max_retries=2)(decode_shard)
    write: Any = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    need_images = any(s.role in ("vae", "vqgan") for s in sources)
    ready_ref = actors[0].identities.remote()  # queued before any shard: returns once the models loaded
    load = [0] * len(actors)
    pending: dict[Any, int] = {}
    queue = list(todo)
    written = 0
    identities: list[dict[str, Any]] | None = None
    t_ready = time.monotonic()
    with Progress(len(todo), "encode", unit="shard", enabled=show_progress) as bar:
        while queue or pending:
            while queue and len(pending) < len(actors) * cfg.inflight_per_actor:
                i = queue.pop(0)
                a = load.index(min(load))
                dec = decode.remote(inp, i, need_images)
                enc = actors[a].encode_shard.remote(dec)
                pending[write.remote(out, dec, enc, enc_id, inputs[i])] = a
                load[a] += 1
            if identities is None:
                identities = ray.get(ready_ref)
                t_ready = time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                load[pending.pop(ref)] -= 1
                st = ray.get(ref)
                written += st["written"]
                if st["skipped"] or st["extra"]["truncated"]:
                    cut = st["extra"]["truncated"]
                    log.warning("%s: kept %d of %d samples, skipped %s%s", st["name"], st["written"], st["inputs"],
                                st["skipped"], f"; damaged tar ({cut})" if cut else "")
                bar.update(1, samples=st["written"])
    if identities is None:
        identities = ray.get(ready_ref)
    return written, identities, time.monotonic() - t_ready


def finalize(out: OutputDir, cfg: EncodeConfig, identities: list[dict[str, Any]], stats: list[ShardStats],
             incomplete: list[int], fingerprint: str) -> dict[str, Any]:
    """``_index.parquet`` and ``_manifest.json`` (encoders, scaling factor, shapes, dtypes, totals)."""
    nbytes: Counter[str] = Counter()
    arrays: dict[str, Any] = {}
    for st in stats:
        for k, v in st.extra["bytes_per_sample"].items():
            nbytes[k] += v * st.written
        for k, v in st.extra["arrays"].items():
            arrays.setdefault(k, v)
    t = totals(stats)
    rows = write_index(out, stats, INDEX_SCHEMA)
    assert rows == t["written"], (rows, t["written"])
    t["bytes_per_sample"] = {k: round(v / t["written"], 1) for k, v in sorted(nbytes.items())} if t["written"] else {}
    t["truncated_tars"] = [shard_name(st.shard) for st in stats if st.extra["truncated"]]
    encoders = {}
    for ident in identities:
        names = {"vae": ["latent"], "vqgan": ["tokens"], "text": ["text", "pooled"]}[ident["role"]]
        encoders[ident["role"]] = {"identity": ident, "arrays": {n: arrays[n] for n in names if n in arrays}}
    vae = encoders.get("vae", {}).get("identity", {})
    sizes = sorted({tuple(hw) for st in stats for hw in st.extra["image_sizes"]})
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY}
    manifest: dict[str, Any] = {
        "kind": "latents", "encoder_id": out.url.rstrip("/").rsplit("/", 1)[-1], "code_version": __version__,
        "images": cfg.images, "inputs_fingerprint": fingerprint, "encoders": encoders,
        "scaling_factor": vae.get("scaling_factor"), "shift_factor": vae.get("shift_factor"),
        "arrays": arrays, "image_sizes": [list(hw) for hw in sizes],
        "config": settings, "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
        "shard_count": len(stats), "complete": not incomplete, "incomplete_inputs": [shard_name(i) for i in incomplete],
        "totals": t,
    }
    if "vqgan" in encoders:  # tokens are [h*w] in raster order; (h, w) per image size
        down = encoders["vqgan"]["identity"]["downsample"]
        manifest["tokens_grid"] = [[h // down, w // down] for h, w in sizes]
    return write_manifest(out, manifest)
