"""Registry of model families: ``register(cls)``, ``get_family(name)``, ``FAMILIES``.

Families register themselves at import; ``get_family`` imports the built-in family
modules on first use, so a config's ``model.kind`` is all that names a family.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

from latentpipe.preprocessing.config import ConfigError, from_dict, to_dict
from latentpipe.training.families.base import PRIMARY, Family

FAMILIES: dict[str, type[Family]] = {}

# Modules imported on first lookup.
BUILTIN_MODULES = (
    "latentpipe.training.families.toy",
    "latentpipe.training.families.autoencoder",
    "latentpipe.training.families.diffusion",
    "latentpipe.training.families.flow",
    "latentpipe.training.families.ar",
)

F = TypeVar("F", bound=type[Family])
_loaded = False


def register(cls: F) -> F:
    """Class decorator: add a family under ``cls.name`` (names are unique)."""
    for attr in ("name", "data_kind", "config_class"):
        if not hasattr(cls, attr):
            raise TypeError(f"family {cls.__name__} must set {attr}")
    if cls.data_kind not in ("images", "latents"):
        raise TypeError(f"family {cls.__name__}: data_kind must be 'images' or 'latents', got {cls.data_kind!r}")
    other = FAMILIES.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"family name {cls.name!r} already registered by {other.__module__}.{other.__name__}")
    FAMILIES[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)  # a missing module is an error, never an "unknown family"


def get_family(name: str) -> type[Family]:
    """The family class registered as ``name``; unknown names are a ConfigError listing the known ones."""
    if name not in FAMILIES:
        _load_builtins()
    if name not in FAMILIES:
        raise ConfigError(f"model.kind: unknown family {name!r} (known: {', '.join(sorted(FAMILIES)) or 'none'})")
    return FAMILIES[name]


def family_from_config(model: Mapping[str, Any]) -> Family:
    """Instantiate the family named by ``model["kind"]`` with the rest parsed by its config_class.

    Unknown keys and wrong types are ConfigErrors naming ``model.<key>``.
    """
    if "kind" not in model:
        raise ConfigError("model.kind: missing (the model family, e.g. 'toy')")
    kind = model["kind"]
    if not isinstance(kind, str):
        raise ConfigError(f"model.kind: expected a string, got {kind!r}")
    cls = get_family(kind)
    rest = {k: v for k, v in model.items() if k != "kind"}
    cfg: Any = from_dict(cls.config_class, rest, prefix="model.")
    return cls(cfg)


def family_for_data(model: Mapping[str, Any], data_kind: str) -> Family:
    """``family_from_config(model)``, checked to train on ``data_kind`` shards (a ConfigError if not)."""
    family = family_from_config(model)
    if family.data_kind != data_kind:
        raise ConfigError(f"data.kind: family {family.name!r} trains on {family.data_kind}, got {data_kind!r}")
    return family


def model_config_dict(family: Family) -> dict[str, Any]:
    """The resolved ``model:`` section of ``family`` (with ``kind``), as plain data."""
    return {"kind": family.name, **to_dict(family.cfg)}


__all__ = [
    "FAMILIES",
    "PRIMARY",
    "Family",
    "family_from_config",
    "get_family",
    "model_config_dict",
    "register",
]
