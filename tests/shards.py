"""Tiny shard folders in the on-disk formats of ``latentpipe shard`` and ``latentpipe encode``, for tests.

``make_image_shards`` writes built-in captioned scenes, ``make_latent_shards`` random
latents / tokens / text embeddings; both write real WebDataset tars (``webdataset.TarWriter``)
plus ``.stats.json`` markers, ``_index.parquet`` and ``_manifest.json`` like the real stages.
``truncate`` and ``write_tar`` make damaged or hostile shards.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from latentpipe.preprocessing.synthetic import encode_image, make_scene, sample_key

SCHEMA_VERSION = 1


def _counts(per_shard: int | Sequence[int], n: int) -> list[int]:
    return [per_shard] * n if isinstance(per_shard, int) else list(per_shard)


def npy(arr: np.ndarray) -> bytes:
    """``arr`` as ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_tar(path: Path, samples: Sequence[Mapping[str, Any]]) -> None:
    """Write samples (``__key__`` + extension -> bytes/str) with webdataset's TarWriter."""
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0) as w:
        for s in samples:
            w.write({k: (v.encode() if isinstance(v, str) else v) for k, v in s.items()} | {"__key__": s["__key__"]})


def _finish(folder: Path, shard_rows: list[list[dict[str, Any]]], config: dict[str, Any],
            extra_manifest: dict[str, Any]) -> None:
    """Stats markers, ``_index.parquet`` and ``_manifest.json`` for the tars just written."""
    rows = []
    for i, shard in enumerate(shard_rows):
        tar = folder / f"shard-{i:06d}.tar"
        stats = {"schema_version": SCHEMA_VERSION, "shard": i, "inputs": len(shard), "written": len(shard),
                 "skipped": {}, "bytes": tar.stat().st_size, "seconds": 0.0}
        (folder / f"shard-{i:06d}.stats.json").write_text(json.dumps(stats))
        rows.extend(shard)
    cols = ["key", "shard", "caption", "width", "height", "sha256"]
    table = pa.table({c: [r[c] for r in rows] for c in cols},
                     schema=pa.schema([("key", pa.string()), ("shard", pa.int32()), ("caption", pa.string()),
                                       ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string())]))
    pq.write_table(table, folder / "_index.parquet")
    blob = json.dumps(config, sort_keys=True).encode()
    manifest = {"schema_version": SCHEMA_VERSION, "config": config,
                "config_hash": hashlib.sha256(blob).hexdigest()[:16], "shards": len(shard_rows),
                "totals": {"written": len(rows), "skipped": {}}, **extra_manifest}
    (folder / "_manifest.json").write_text(json.dumps(manifest, indent=1))


def make_image_shards(root: Path, n: int, per_shard: int | Sequence[int], size: int = 32, seed: int = 0,
                      fmt: str = "png", extra_members: Mapping[str, bytes] | None = None) -> Path:
    """Write ``<root>/images/shard-*.tar`` with ``n`` shards of scenes; returns the folder.

    ``per_shard``: samples in every shard, or one count per shard (uneven shards).
    ``extra_members``: extension -> bytes added to every sample (e.g. a hostile ``pkl``).
    """
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    shard_rows = []
    for i, count in enumerate(_counts(per_shard, n)):
        samples, rows = [], []
        for _ in range(count):
            scene = make_scene(seed, index, size)
            key = sample_key(index)
            data = encode_image(scene.image, fmt)
            sha = hashlib.sha256(data).hexdigest()
            meta = {"source": f"synthetic:{seed}:{index}", "original_size": [size, size],
                    "stored_size": [size, size], "sha256": sha}
            samples.append({"__key__": key, fmt: data, "txt": scene.caption, "json": json.dumps(meta),
                            **(extra_members or {})})
            rows.append({"key": key, "shard": i, "caption": scene.caption, "width": size, "height": size,
                         "sha256": sha})
            index += 1
        write_tar(folder / f"shard-{i:06d}.tar", samples)
        shard_rows.append(rows)
    _finish(folder, shard_rows, {"source": "synthetic", "seed": seed, "size": size, "format": fmt}, {})
    return folder


def make_latent_shards(root: Path, n: int, per_shard: int | Sequence[int], C: int = 4, h: int = 4, w: int = 4,
                       text_dim: int = 8, with_tokens: bool = True, seed: int = 0, max_len: int = 12,
                       codebook: int = 16, encoder_id: str = "fixture-enc") -> Path:
    """Write ``<root>/latents/<encoder_id>/shard-*.tar``: random latents of the documented shapes.

    Per sample: latent float32 [2C, h, w], text float16 [L, text_dim] with L in 1..max_len,
    pooled float32 [text_dim], tokens int32 [h*w] (if ``with_tokens``), txt, json.
    """
    folder = root / "latents" / encoder_id
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = 0
    shard_rows = []
    for i, count in enumerate(_counts(per_shard, n)):
        samples, rows = [], []
        for _ in range(count):
            key = sample_key(index)
            caption = f"caption of sample {index}"
            s: dict[str, Any] = {
                "__key__": key, "txt": caption, "json": json.dumps({"source": key}),
                "latent.npy": npy(rng.standard_normal((2 * C, h, w)).astype(np.float32)),
                "text.npy": npy(rng.standard_normal((int(rng.integers(1, max_len + 1)), text_dim)).astype(np.float16)),
                "pooled.npy": npy(rng.standard_normal(text_dim).astype(np.float32)),
            }
            if with_tokens:
                s["tokens.npy"] = npy(rng.integers(0, codebook, h * w).astype(np.int32))
            samples.append(s)
            rows.append({"key": key, "shard": i, "caption": caption, "width": w * 8, "height": h * 8, "sha256": ""})
            index += 1
        write_tar(folder / f"shard-{i:06d}.tar", samples)
        shard_rows.append(rows)
    encoders: dict[str, Any] = {
        "vae": {"id": "fixture-vae", "sha256": "0" * 64, "scaling_factor": 0.18215,
                "latent_shape": [2 * C, h, w], "dtype": "float32"},
        "text": {"id": "fixture-text", "sha256": "0" * 64, "dim": text_dim, "dtype": "float16"},
    }
    if with_tokens:
        encoders["vq"] = {"id": "fixture-vq", "sha256": "0" * 64, "codebook_size": codebook,
                          "token_shape": [h, w], "dtype": "int32"}
    # Top-level factors as pipeline/encode.py records them (the latent priors read these).
    _finish(folder, shard_rows, {"encoder_id": encoder_id, "seed": seed},
            {"encoders": encoders, "scaling_factor": 0.18215, "shift_factor": None})
    return folder


def truncate(path: Path, drop: int) -> None:
    """Cut the last ``drop`` bytes off a file (a shard copy that died half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - drop])
