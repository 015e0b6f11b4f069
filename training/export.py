"""Consolidated model export: ``model.safetensors`` + ``export.json`` of a family's primary module.

The export holds the primary module's full (unsharded) weights, the EMA weights when the
EMA is on, and the family config that rebuilds the module. Loading never unpickles: the
weights are safetensors and the config is JSON, parsed by the family's typed config.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from latentpipe.preprocessing.config import ConfigError, config_hash, to_dict
from latentpipe.training.families import Family, family_from_config, model_config_dict

if TYPE_CHECKING:
    from latentpipe.training.config import TrainConfig
    from latentpipe.training.ema import ShardedEMA
    from latentpipe.training.tracking import Tracker

SCHEMA_VERSION = 1
WEIGHTS = "model.safetensors"
META = "export.json"


def save_export(
    dir: str | Path,
    family_name: str,
    model_cfg_dict: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``dir/model.safetensors`` and ``dir/export.json`` atomically (a temp folder renamed into place).

    ``model_cfg_dict`` is the ``model:`` section (``kind`` optional, must equal ``family_name``);
    ``extra`` is JSON data (e.g. step, EMA decay, config hash, lineage).
    """
    out = Path(dir)
    cfg = {k: v for k, v in model_cfg_dict.items() if k != "kind"}
    kind = model_cfg_dict.get("kind", family_name)
    if kind != family_name:
        raise ValueError(f"model config kind {kind!r} does not match family {family_name!r}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"schema_version": SCHEMA_VERSION, "family": family_name, "model_config": cfg,
            "extra": dict(extra or {})}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"family": family_name})
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in (tmp / WEIGHTS, tmp / META):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old)
    else:
        tmp.replace(out)
    return out


@torch.no_grad()
def consolidated_state_dict(engine: Any, ema: ShardedEMA | None = None) -> dict[str, torch.Tensor]:
    """Collective: the primary module's full fp32 state dict on rank 0 ({} on other ranks).

    Trainable parameters are the EMA (when ``ema`` has started) or DeepSpeed's fp32 masters,
    gathered by DeepSpeed (``safe_get_full_fp32_param``: the ZeRO-1/2 fragments or ZeRO-3
    partitions); frozen ZeRO-3 parameters through ``zero.GatheredParameters``; buffers as held.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    module: nn.Module = engine.module
    ema_full = ema.full_state(device=engine.device) if ema is not None and ema.started else {}  # NCCL: on GPU
    values: dict[int, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if p.requires_grad and ema is not None and ema.started:
            if rank == 0:
                values[id(p)] = ema_full[name]
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.data.detach().clone()
        if full is None:
            full = p.data.detach()
        if rank == 0:
            values[id(p)] = full.float().cpu() if full.is_floating_point() else full.cpu()
    for b in module.buffers():
        values[id(b)] = b.detach().cpu()
    if rank != 0:
        return {}
    return {k: values[id(v)].clone() for k, v in module.state_dict(keep_vars=True).items() if id(v) in values}


def run_lineage(cfg: TrainConfig, step: int, ema_on: bool, manifest: Mapping[str, Any] | None,
                data_fingerprint: str | None) -> dict[str, Any]:
    """What an export records about the run that made it (``export.json`` ``extra``): the step, the EMA,
    the config hash, the data it saw and, for latent shards, the encoders that made them (the text
    encoder's identity is what ``latentpipe sample`` encodes prompts with), and the git commit."""
    from latentpipe.training.tracking import git_commit

    manifest = manifest or {}
    encoders = {role: {"identity": e.get("identity", {})} for role, e in (manifest.get("encoders") or {}).items()}
    return {"step": step, "ema": ema_on, "ema_decay": cfg.ema.decay if cfg.ema.enabled else None,
            "config_hash": config_hash(cfg), "data_fingerprint": data_fingerprint,
            "data_manifest_hash": manifest.get("config_hash"), "encoder_id": manifest.get("encoder_id"),
            "encoders": encoders, "git_commit": git_commit() or "unknown"}


def publish(out: Path, family: Family, cfg: TrainConfig, state: Mapping[str, torch.Tensor],
            extra: Mapping[str, Any], tracker: Tracker) -> str | None:
    """Write the export (weights, ``export.json`` with ``extra``, the run's ``train_config.json``) and,
    with ``tracking.register_as``, register it as a model version tagged with its lineage and aliased
    ``final`` ("latest" is reserved by MLflow). Returns the registered ``models:/`` URI or None."""
    save_export(out, family.name, model_config_dict(family), state, extra)
    (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    if not cfg.tracking.register_as:
        return None
    tags = {k: str(v) for k, v in extra.items() if k != "encoders" and v is not None}
    for role, e in (extra.get("encoders") or {}).items():
        ident = e["identity"]
        tags[f"encoder.{role}"] = f"{ident.get('source', '?')}@{str(ident.get('sha256', ''))[:12]}"
    registered: str | None = tracker.register_model(out, cfg.tracking.register_as, tags=tags, aliases=("final",))
    return registered


def read_export_meta(dir: str | Path) -> dict[str, Any]:
    """The parsed ``export.json`` of an export folder (checked schema)."""
    p = Path(dir) / META
    if not p.is_file():
        raise FileNotFoundError(f"not an export folder (no {META}): {dir}")
    meta = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{p}: unsupported export schema_version {meta.get('schema_version')!r}")
    for key in ("family", "model_config"):
        if key not in meta:
            raise ConfigError(f"{p}: missing {key!r}")
    return meta


def load_export(dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Family, nn.Module]:
    """Rebuild the primary module through its family and load the exported weights (strict).

    Returns ``(family, module)``; the module is in eval mode on ``map_location``.
    """
    meta = read_export_meta(dir)
    family = family_from_config({"kind": meta["family"], **meta["model_config"]})
    module = family.build_primary()
    weights = Path(dir) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"export folder has no {WEIGHTS}: {dir}")
    state = load_file(str(weights), device=str(map_location))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights}: weights do not fit family {meta['family']!r} "
                          f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    module.to(map_location).eval()
    return family, module


__all__ = ["META", "SCHEMA_VERSION", "WEIGHTS", "consolidated_state_dict", "load_export", "read_export_meta", "save_export"]
