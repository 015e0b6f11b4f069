"""Stage-1 autoencoders: thin builders and presets over diffusers ``AutoencoderKL`` and ``VQModel``.

KL-VAE and VQGAN as in Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3 and App. G) and Esser et al. 2021 ("Taming Transformers").
Presets are plain factory functions in ``PRESETS``; any local diffusers folder (a bare model
folder with ``config.json`` or a pipeline folder with ``vae/`` / ``vqvae/``) loads in their
place, offline. Also here: deterministic reconstruction, VQ token encode/decode in raster
order, and the latent scaling factor (1 / std of latents over a data sample, LDM Sec. 4.3.2),
stored in the diffusers config so it travels with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, VQModel

Kind = Literal["kl", "vq"]
# AutoencoderKL | VQModel; typed Any because diffusers' decorated methods are opaque to mypy.
Autoencoder = Any


class ObjectiveForward:
    """Mixin: ``forward(sample, objective=fn)`` returns ``fn(self, sample)``; plain ``forward`` otherwise.

    DeepSpeed's engine hooks its backward prologue onto the outputs of ``engine(...)``, so a training
    objective must run *inside* the module's forward: through the engine, with any extra autograd
    (the adaptive GAN weight) done before the engine sees the outputs. Saved configs keep the
    diffusers class name, so ``save_pretrained`` folders load with the stock classes.
    """

    def forward(self, sample: torch.Tensor, *args: Any, objective: Callable[..., Any] | None = None,
                **kwargs: Any) -> Any:
        if objective is not None:
            return objective(self, sample)
        return super().forward(sample, *args, **kwargs)  # type: ignore[misc]

    def to_json_string(self) -> str:
        data = json.loads(super().to_json_string())  # type: ignore[misc]
        data["_class_name"] = type(self).__mro__[2].__name__  # the diffusers base class
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


class TrainableAutoencoderKL(ObjectiveForward, AutoencoderKL):
    """diffusers ``AutoencoderKL`` whose forward can run a training objective (same weights, same config)."""


class TrainableVQModel(ObjectiveForward, VQModel):
    """diffusers ``VQModel`` whose forward can run a training objective (same weights, same config)."""


def _blocks(n: int) -> dict[str, Any]:
    """``n`` resolution levels: downsampling factor ``2 ** (n - 1)``."""
    return {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


def kl_demo() -> dict[str, Any]:
    """32 px demo KL-VAE, factor 4: [B,3,32,32] -> latents [B,4,8,8] (~0.6 M parameters).

    Narrow at full resolution, where the decoder spends its compute (CPU demo budget)."""
    return {"kind": "kl", **_blocks(3), "block_out_channels": [32, 32, 64], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 16, "sample_size": 32}


def vq_demo() -> dict[str, Any]:
    """32 px demo VQGAN, factor 4: [B,3,32,32] -> 8x8 = 64 tokens from 512 codes of dim 4."""
    return {"kind": "vq", **_blocks(3), "block_out_channels": [32, 32, 64], "layers_per_block": 1,
            "latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 512, "norm_num_groups": 16,
            "sample_size": 32}


def kl_f8_256() -> dict[str, Any]:
    """256 px KL-VAE, factor 8 (the Stable Diffusion VAE layout): latents [B,4,32,32]."""
    return {"kind": "kl", **_blocks(4), "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256}


def vq_f8_256() -> dict[str, Any]:
    """256 px VQGAN, factor 8 (LDM ``vq-f8`` layout): 32x32 = 1024 tokens from 16384 codes of dim 4."""
    return {"kind": "vq", **_blocks(4), "block_out_channels": [128, 256, 256, 512], "layers_per_block": 2,
            "latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 16384, "norm_num_groups": 32,
            "sample_size": 256}


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "kl_demo": kl_demo,
    "vq_demo": vq_demo,
    "kl_f8_256": kl_f8_256,
    "vq_f8_256": vq_f8_256,
}


@dataclass
class AutoencoderArchConfig:
    """Which autoencoder to build: a preset (optionally overridden) or a local diffusers folder."""

    preset: str | None = None  # None: the family's demo preset (kl_demo / vq_demo)
    pretrained: str | None = None  # local diffusers folder; replaces the preset when set
    block_out_channels: list[int] | None = None
    layers_per_block: int | None = None
    latent_channels: int | None = None
    norm_num_groups: int | None = None
    num_vq_embeddings: int | None = None  # VQ only
    vq_embed_dim: int | None = None  # VQ only
    mid_block_add_attention: bool | None = None
    scaling_factor: float | None = None  # None: diffusers' default until measured
    logvar_init: float | None = None  # KL only: start the posterior log-variance here (see init_logvar)

    def __post_init__(self) -> None:
        if self.pretrained is None and self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown autoencoder preset {self.preset!r} (known: {', '.join(PRESETS)})")


DEFAULT_PRESET: dict[str, str] = {"kl": "kl_demo", "vq": "vq_demo"}
_NOT_DIFFUSERS = ("preset", "pretrained", "logvar_init")


def diffusers_config(cfg: AutoencoderArchConfig, kind: Kind | None = None) -> tuple[Kind, dict[str, Any]]:
    """The preset's diffusers constructor kwargs with the non-None overrides of ``cfg`` applied.

    ``cfg.preset`` None means ``DEFAULT_PRESET[kind]``.
    """
    if cfg.preset is None and kind is None:
        raise ValueError("arch.preset is not set and no autoencoder kind is given")
    preset = cfg.preset or DEFAULT_PRESET[kind or "kl"]
    spec = PRESETS[preset]()
    kind_: Kind = spec.pop("kind")
    overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                 if f.name not in _NOT_DIFFUSERS and getattr(cfg, f.name) is not None}
    if kind_ == "kl":
        bad = sorted(set(overrides) & {"num_vq_embeddings", "vq_embed_dim"})
        if bad:
            raise ValueError(f"{bad[0]} applies to VQ presets only, not {preset!r}")
    elif cfg.logvar_init is not None:
        raise ValueError(f"logvar_init applies to KL presets only, not {preset!r}")
    spec.update(overrides)
    groups = spec["norm_num_groups"]
    if any(c % groups for c in spec["block_out_channels"]):
        raise ValueError(f"block_out_channels {spec['block_out_channels']} must be multiples of norm_num_groups={groups}")
    return kind_, spec


def _pretrained_dir(path: Path, kind: Kind) -> tuple[Path, str | None]:
    """(folder, subfolder) holding the model's ``config.json``; pipeline folders use vae/ or vqvae/."""
    if (path / "config.json").is_file():
        return path, None
    for sub in (["vae"] if kind == "kl" else ["vqvae", "vae"]):
        if (path / sub / "config.json").is_file():
            return path, sub
    raise FileNotFoundError(f"{path}: no diffusers model here (expected config.json, or vae/config.json)")


def load_pretrained(path: str | Path, kind: Kind) -> Autoencoder:
    """Load a local diffusers ``AutoencoderKL`` (kind "kl") or ``VQModel`` (kind "vq"); never downloads.

    Returns the ``Trainable*`` subclass (an instance of the diffusers class).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"pretrained autoencoder folder not found: {p}")
    folder, sub = _pretrained_dir(p, kind)
    cls = TrainableAutoencoderKL if kind == "kl" else TrainableVQModel
    model = cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True)
    if not isinstance(model, cls):
        raise TypeError(f"{p}: expected a diffusers {cls.__name__}, got {type(model).__name__}")
    return model


def build_autoencoder(cfg: AutoencoderArchConfig, kind: Kind) -> Autoencoder:
    """A fresh model from ``cfg.preset`` (+ overrides), or ``cfg.pretrained`` loaded offline."""
    if cfg.pretrained is not None:
        model = load_pretrained(cfg.pretrained, kind)
        if cfg.scaling_factor is not None:
            model.register_to_config(scaling_factor=cfg.scaling_factor)
        return model
    preset_kind_, spec = diffusers_config(cfg, kind)
    if preset_kind_ != kind:
        raise ValueError(f"preset {cfg.preset!r} builds a {preset_kind_!r} autoencoder, this family needs {kind!r}")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    if kind == "vq":
        return TrainableVQModel(**spec)
    model = TrainableAutoencoderKL(**spec)
    if cfg.logvar_init is not None:
        init_logvar(model, cfg.logvar_init)
    return model


def init_logvar(model: Autoencoder, value: float) -> None:
    """Make a fresh KL-VAE's posterior start with log-variance ``value`` everywhere.

    The log-variance half of ``quant_conv`` (1x1, 2C -> 2C) gets zero weights and bias ``value``;
    it still learns from there. With diffusers' init the posterior starts near N(mean, 1), so the
    decoder trains on latents drowned in sampling noise until the encoder has grown the means or
    shrunk the variance: a short (demo) budget is spent on that. A documented init choice, not a
    change of the objective (the KL term is unchanged).
    """
    conv = model.quant_conv
    if conv is None:
        raise ValueError("init_logvar needs an AutoencoderKL with quant_conv")
    c = model.config.latent_channels
    with torch.no_grad():
        conv.weight[c:].zero_()
        conv.bias[c:].fill_(value)


def is_kl(model: Any) -> bool:
    """True for a KL autoencoder (``AutoencoderKL``), False for a ``VQModel``."""
    return isinstance(model, AutoencoderKL)


def downsampling_factor(model: Autoencoder) -> int:
    """Image side / latent side, e.g. 4 for the demo presets."""
    return int(2 ** (len(model.config.block_out_channels) - 1))


# --- forward paths shared by training, export checks and the encode stage -------------------------


def vq_decode_latents(model: Autoencoder, z_q: torch.Tensor) -> torch.Tensor:
    """Decode quantized latents ``z_q`` [B,D,h,w] to images [B,3,H,W] (VQModel.decode without re-quantizing)."""
    h = model.post_quant_conv(z_q)
    out: torch.Tensor = model.decoder(h, z_q if model.config.norm_type == "spatial" else None)
    return out


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index int64 [N] of the nearest row of ``codebook`` [K,D] (L2) for every row of ``x`` [N,D].

    The one nearest-code rule of latentpipe (diffusers' ``VectorQuantizer`` uses the same): the VQGAN
    objective, its k-means initialisation, token encoding and reconstruction all call it.
    """
    return torch.argmin(torch.cdist(x, codebook), dim=1)


def vq_indices(model: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Nearest codebook entry of every latent vector [B,D,h,w] -> int64 [B,h,w]."""
    b, d, h, w = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
    return nearest_code(flat, model.quantize.embedding.weight).view(b, h, w)


def vq_codes(model: Autoencoder, indices: torch.Tensor) -> torch.Tensor:
    """Codebook vectors [B,D,h,w] of code indices [B,h,w] (diffusers' ``get_codebook_entry``, so a
    user's ``VQModel`` with a remapped codebook decodes correctly too)."""
    b, h, w = indices.shape
    channels = model.config.vq_embed_dim or model.config.latent_channels
    z_q: torch.Tensor = model.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, channels))
    return z_q


@torch.no_grad()
def vq_encode_tokens(model: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] in [-1,1] -> code indices int64 [B, h*w] in raster order."""
    idx = vq_indices(model, model.encode(images).latents)  # [B,h,w]
    return idx.flatten(1)


@torch.no_grad()
def vq_decode_tokens(model: Autoencoder, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Code indices [B, h*w] (raster order) -> images [B,3,H,W] in about [-1,1]: the one token decode path
    (the AR prior's samples, its export and the benchmarks)."""
    if tokens.shape[1] != height * width:
        raise ValueError(f"expected {height * width} tokens for a {height}x{width} grid, got {tokens.shape[1]}")
    ids = tokens.long().to(next(model.parameters()).device).view(tokens.shape[0], height, width)
    return vq_decode_latents(model, vq_codes(model, ids))


@torch.no_grad()
def reconstruct(model: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction [B,3,H,W]: KL decodes the posterior mean, VQ the nearest codes."""
    if is_kl(model):
        mean = model.encode(images).latent_dist.mean
        out: torch.Tensor = model.decode(mean).sample
        return out
    return vq_decode_latents(model, vq_codes(model, vq_indices(model, model.encode(images).latents)))


@torch.no_grad()
def latent_sample(model: Autoencoder, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The latents a prior trains on (before scaling): a posterior sample (KL) or the quantized latents (VQ)."""
    if is_kl(model):
        out: torch.Tensor = model.encode(images).latent_dist.sample(generator)
        return out
    return vq_codes(model, vq_indices(model, model.encode(images).latents))


@torch.no_grad()
def compute_scaling_factor(model: Autoencoder, batches: Iterable[torch.Tensor], max_samples: int = 1024,
                           seed: int = 0) -> float:
    """1 / std of the latents over up to ``max_samples`` images (LDM Sec. 4.3.2), over all latent elements.

    Args:
        model: the autoencoder (eval mode is set for the pass and restored).
        batches: image batches [B,3,H,W] in [-1,1].
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    seen, count, s1, s2 = 0, 0, 0.0, 0.0
    try:
        for images in batches:
            images = images[: max_samples - seen]
            z = latent_sample(model, images, gen if images.device.type == "cpu" else None).double()
            seen += images.shape[0]
            count += z.numel()
            s1 += float(z.sum())
            s2 += float((z * z).sum())
            if seen >= max_samples:
                break
    finally:
        model.train(was_training)
    if count < 2:
        raise ValueError("compute_scaling_factor: no images in the sample")
    var = (s2 - s1 * s1 / count) / (count - 1)
    if var <= 0:
        raise ValueError("compute_scaling_factor: latents have zero variance")
    return float(1.0 / var**0.5)


__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Autoencoder",
    "AutoencoderArchConfig",
    "ObjectiveForward",
    "TrainableAutoencoderKL",
    "TrainableVQModel",
    "Kind",
    "build_autoencoder",
    "compute_scaling_factor",
    "diffusers_config",
    "downsampling_factor",
    "init_logvar",
    "is_kl",
    "latent_sample",
    "load_pretrained",
    "reconstruct",
    "vq_decode_latents",
    "nearest_code",
    "vq_codes",
    "vq_decode_tokens",
    "vq_encode_tokens",
    "vq_indices",
]
