"""Shard folders as MLflow datasets (``mlflow.data``), so runs show which data made them.

A folder of image or latent shards with its ``_manifest.json`` becomes an MLflow dataset:

- source: the folder's URI (``file:///...``, ``s3://...``), resolved by MLflow's source registry;
- digest: :func:`manifest_digest`, a hash of the manifest (a folder without one: the
  training stream's fingerprint of its shard names and sample keys);
- schema: the members of a sample (``key``, ``caption``, the image or each ``.npy`` array);
- profile: samples, shards, skips by reason, image size, arrays, and for latents the
  encoders (``source@sha256[:12]``) and the image shards they were made from.

The name (:func:`dataset_name`) is ``images:<parent>`` or ``latents:<parent>/<encoder id>``,
so the same folder has the same name in the shard, encode and training runs, and
``search_runs`` / the UI's Datasets panel find every run that used it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.data.dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import Dataset as DatasetEntity
from mlflow.types import ColSpec, Schema, TensorSpec

CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT


def folder_uri(root: str) -> str:
    """A shard folder (local path or URL) as a URI; a local path is made absolute."""
    return root if "://" in root else Path(root).resolve().as_uri()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """16 hex of the sha256 of the manifest's canonical JSON: equal manifests, equal digests."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_name(root: str, manifest: Mapping[str, Any] | None) -> str:
    """``images:<parent>`` / ``latents:<parent>/<encoder id>``; other folders ``shards:<parent>/<name>``."""
    parts = [p for p in folder_uri(root).rstrip("/").split("/") if p]
    kind = (manifest or {}).get("kind")
    if kind == "images" and len(parts) >= 2:
        return f"images:{parts[-2]}"
    if kind == "latents" and len(parts) >= 3:
        return f"latents:{parts[-3]}/{parts[-1]}"
    return f"shards:{'/'.join(parts[-2:])}"


def _schema(manifest: Mapping[str, Any]) -> Schema:
    cols: list[ColSpec | TensorSpec] = [ColSpec("string", "key"), ColSpec("string", "caption")]
    if manifest.get("kind") == "images":
        fmt = (manifest.get("image") or {}).get("format", "image")
        cols += [ColSpec("binary", str(fmt)), ColSpec("string", "json")]
    else:
        cols += [ColSpec("binary", f"{name}.npy") for name in sorted(manifest.get("arrays") or {})]
    return Schema(cols)


def _profile(manifest: Mapping[str, Any], num_samples: int | None) -> dict[str, Any]:
    totals = manifest.get("totals") or {}
    prof: dict[str, Any] = {"samples": totals.get("written", num_samples), "shards": manifest.get("shard_count"),
                            "skipped": totals.get("skipped"), "duplicates": totals.get("duplicates")}
    if manifest.get("kind") == "images":
        prof["image"] = manifest.get("image")
        prof["source"] = manifest.get("source_kind")
    if manifest.get("kind") == "latents":
        prof["encoder_id"] = manifest.get("encoder_id")
        prof["encoders"] = {role: f"{e['identity'].get('source', '?')}@{str(e['identity'].get('sha256', ''))[:12]}"
                            for role, e in sorted((manifest.get("encoders") or {}).items())}
        prof["arrays"] = manifest.get("arrays")
        prof["images"] = manifest.get("images")
    return {k: v for k, v in prof.items() if v is not None}


class ShardDataset(mlflow.data.dataset.Dataset):
    """A shard folder described by its manifest: metadata only, nothing is read or loaded."""

    def __init__(self, root: str, manifest: Mapping[str, Any] | None, fingerprint: str | None = None,
                 num_samples: int | None = None) -> None:
        self.manifest = dict(manifest or {})
        self._num_samples = num_samples
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore")
            source: DatasetSource = resolve_dataset_source(folder_uri(root))
        digest = manifest_digest(self.manifest) if self.manifest else fingerprint
        if not digest:
            raise ValueError(f"{root}: a dataset needs a manifest or a fingerprint")
        super().__init__(source=source, name=dataset_name(root, self.manifest), digest=digest)

    def _compute_digest(self) -> str:  # the digest is always given
        raise NotImplementedError

    @property
    def profile(self) -> dict[str, Any]:
        return _profile(self.manifest, self._num_samples)

    @property
    def schema(self) -> Schema | None:
        return _schema(self.manifest) if self.manifest else None

    def to_dict(self) -> dict[str, str]:
        d = super().to_dict()
        d["profile"] = json.dumps(self.profile, sort_keys=True, default=str)
        if self.schema is not None:
            d["schema"] = json.dumps({"mlflow_colspec": self.schema.to_dict()})
        return d

    def entity_dict(self) -> dict[str, str | None]:
        """The ``mlflow.entities.Dataset`` fields, as JSON-ready strings (for the tracking spool)."""
        e = self._to_mlflow_entity()
        return {"name": e.name, "digest": e.digest, "source_type": e.source_type, "source": e.source,
                "schema": e.schema, "profile": e.profile}


def dataset_input(record: Mapping[str, Any], context: str) -> Any:
    """An ``mlflow.entities.DatasetInput`` from :meth:`ShardDataset.entity_dict` and a context tag."""
    from mlflow.entities import DatasetInput, InputTag

    return DatasetInput(DatasetEntity(**record), tags=[InputTag(CONTEXT_TAG, context)])


__all__ = ["CONTEXT_TAG", "ShardDataset", "dataset_input", "dataset_name", "folder_uri", "manifest_digest"]
