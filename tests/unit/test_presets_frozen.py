"""Model presets are part of the saved-model format: an export records a preset by name and
rebuilds it at load time, so changing a preset silently breaks every model trained with it
(it happened: a demo export stopped loading after ``kl_demo`` was widened). A changed
architecture needs a new preset name; this test pins every existing one (parameter names and
shapes, and the constructor config of diffusers / transformers modules), built on the meta
device so the large presets cost no memory."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import torch
from torch import nn

from latentpipe.training.models import BackboneSpec, presets
from latentpipe.training.models.ar import ar_demo, build_ar
from latentpipe.training.models.autoencoders import PRESETS as AE_PRESETS
from latentpipe.training.models.autoencoders import AutoencoderArchConfig, build_autoencoder

FROZEN = {  # name: fingerprint (see _fingerprint); a new architecture gets a new name instead
    "unet_demo": "8329de3e88b98f38", "unet_base": "2391f633ecb9e006", "unet_sd": "bcd8090fc8e974c9",
    "dit_demo": "73d089d24dbdba08", "dit_b2": "05e3c356ca56b38a", "dit_xl2": "6adae5d114ccc92e",
    "kl_demo": "da2c165117646eb0", "vq_demo": "89902750bef7ebd7", "kl_f8_256": "beef7b9463d88a49",
    "vq_f8_256": "71681931b09033df", "ar_demo": "d7ac6b7f4a74118d",
}


# Config fields that change the computation without changing any parameter's shape; other
# fields are left out so a library upgrade that adds config keys does not trip the test.
_SHAPELESS = ("attention_head_dim", "num_attention_heads", "n_head", "num_key_value_heads", "norm_num_groups",
              "act_fn", "activation_fn", "hidden_act", "activation_function", "resnet_time_scale_shift",
              "only_cross_attention", "upcast_attention", "norm_type", "rope_theta")


def _config(m: nn.Module) -> dict[str, Any]:
    cfg = getattr(m, "config", None)
    if cfg is None:
        return {}
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: items[k] for k in _SHAPELESS if k in items}


def _fingerprint(m: nn.Module) -> str:
    shapes = sorted((k, list(v.shape)) for k, v in m.state_dict().items())
    configs = {name: _config(sub) for name, sub in m.named_modules() if _config(sub)}
    blob = json.dumps({"shapes": shapes, "configs": configs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(name: str) -> nn.Module:
    with torch.device("meta"):
        if name in presets():
            return presets()[name](BackboneSpec())
        if name in AE_PRESETS:
            return build_autoencoder(AutoencoderArchConfig(preset=name), AE_PRESETS[name]()["kind"])
        return build_ar(ar_demo())


def test_every_preset_is_pinned() -> None:
    assert set(FROZEN) == set(presets()) | set(AE_PRESETS) | {"ar_demo"}


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_preset_is_unchanged(name: str) -> None:
    assert _fingerprint(_build(name)) == FROZEN[name], (
        f"preset {name!r} changed: models exported with it would no longer load. "
        "Add a new preset name for the new architecture (and pin it here)")
