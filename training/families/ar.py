"""The ``ar`` family: a DALL·E-style autoregressive prior over VQGAN tokens.

Trains on latent shards (``tokens``, ``text``, ``text_mask``) with next-token cross-entropy and
caption dropout; samples token grids with top-k / top-p and classifier-free guidance, decoded to
pixels by the VQGAN named in the config (or shown as false-colour code maps without one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from latentpipe.preprocessing.pixels import grid, to_unit_tensor
from latentpipe.training.ar_sampling import ARSampleConfig, sample_tokens
from latentpipe.training.families import register
from latentpipe.training.families.base import Family, unwrap
from latentpipe.training.models.ar import ARConfig, ARPrior, ar_demo, build_ar
from latentpipe.training.models.autoencoders import vq_decode_tokens
from latentpipe.training.objectives.autoregressive import AutoregressiveObjective


@dataclass
class ARFamilyConfig:
    """The ``model:`` section of an AR prior config (minus ``kind: ar``)."""

    net: ARConfig = field(default_factory=ar_demo)
    cond_drop: float = 0.1  # probability of training a sample with its caption dropped (CFG)
    sample: ARSampleConfig = field(default_factory=ARSampleConfig)
    vqgan: str = ""  # VQGAN export folder that decodes sample grids ("" -> false-colour code maps)
    grid_samples: int = 8  # samples per logged grid
    sample_seed: int = 0  # seed of the logged grids (the same draws every time)

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {self.cond_drop}")
        if self.grid_samples < 1:
            raise ValueError(f"grid_samples must be >= 1, got {self.grid_samples}")


def load_vqgan(path: str) -> Any:
    """A VQGAN for decoding: an export folder (``export.json``) or a local diffusers ``VQModel`` folder."""
    if (Path(path) / "export.json").is_file():
        from latentpipe.training.export import load_export

        return load_export(path)[1]
    from latentpipe.training.models.autoencoders import load_pretrained

    return load_pretrained(path, "vq")


def fit_text(text: torch.Tensor, text_mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text [B, L, D] and mask [B, L] zero-padded or truncated to ``length`` (as training/data.py does)."""
    mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if text_mask is None else text_mask.bool()
    n = text.shape[1]
    if n >= length:
        return text[:, :length], mask[:, :length]
    pad = length - n
    return (torch.cat([text, text.new_zeros(text.shape[0], pad, text.shape[2])], dim=1),  # [B, length, D]
            torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1))  # [B, length]


def image_grid(images: torch.Tensor) -> Image.Image:
    """Images [B, 3, H, W] in [-1, 1] -> one row, as a PIL image."""
    return grid([images])


def code_map(tokens: torch.Tensor, grid: tuple[int, int], scale: int = 4) -> torch.Tensor:
    """False-colour images [B, 3, h*scale, w*scale] in [-1, 1] of code ids [B, h*w] (a fixed palette)."""
    h, w = grid
    ids = tokens.long().cpu().reshape(-1, h, w)  # [B, h, w]
    rgb = torch.stack([(ids * 97) % 256, (ids * 57 + 80) % 256, (ids * 31 + 160) % 256], dim=-1)  # [B, h, w, 3]
    rgb = to_unit_tensor(rgb.to(torch.uint8).numpy())  # [B, 3, h, w]
    return rgb.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


@register
class ARFamily(Family):
    """Decoder-only transformer over [text prefix] + [BOS] + VQGAN tokens."""

    name = "ar"
    data_kind = "latents"
    config_class = ARFamilyConfig
    cfg: ARFamilyConfig

    def __init__(self, cfg: ARFamilyConfig) -> None:
        super().__init__(cfg)
        self.objective = AutoregressiveObjective(cfg.net.codebook_size, cfg.cond_drop)
        self._vq: Any = None

    def build(self) -> dict[str, nn.Module]:
        return {"model": build_ar(self.cfg.net)}

    def _batch(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        for key in ("tokens", "text", "text_mask"):
            if key not in batch:
                raise ValueError(f"the ar family needs latent shards with {key!r} (VQGAN tokens and text embeddings)")
        tokens = batch["tokens"]
        n = self.cfg.net.num_image_tokens
        if tokens.ndim != 2 or tokens.shape[1] != n:
            raise ValueError(f"tokens {list(tokens.shape)} do not fit the model grid {self.cfg.net.grid} ({n} tokens)")
        out: dict[str, Any] = {"tokens": tokens.to(device), "text": batch["text"].to(device),
                               "text_mask": batch["text_mask"].to(device)}
        if "__key__" in batch:
            out["__key__"] = batch["__key__"]
        return out

    def loss(self, part: str, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int
             ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        if part != "model":
            raise KeyError(f"ar has no part {part!r}")
        model = modules["model"]
        device = next(unwrap(model, ARPrior).parameters()).device
        # Caption dropout keyed on (sample key, step): exact on resume and at any world size.
        return self.objective.loss(model, self._batch(batch, device), step=step)

    def vqgan(self, device: torch.device | None = None) -> Any:
        """The VQGAN of ``cfg.vqgan`` (loaded once, moved to ``device``), or None without one."""
        if not self.cfg.vqgan:
            return None
        if self._vq is None:
            self._vq = load_vqgan(self.cfg.vqgan).eval()
            codes = getattr(self._vq.config, "num_vq_embeddings", None)
            if codes != self.cfg.net.codebook_size:
                raise ValueError(f"model.vqgan {self.cfg.vqgan} has {codes} codes, "
                                 f"model.net.codebook_size is {self.cfg.net.codebook_size}")
        if device is not None:
            self._vq.to(device)
        return self._vq

    @torch.no_grad()
    def generate(
        self,
        module: nn.Module,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        generator: torch.Generator | None = None,
        sample: ARSampleConfig | None = None,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample code ids [B, h*w] and images [B, 3, H, W] in [-1, 1] (false-colour maps without a VQGAN).

        ``text`` [B, L, D] / ``text_mask`` [B, L] from a latent batch or a text encoder (padded or
        truncated to ``net.text_len`` like the training loader does); None for unconditional samples.
        """
        net = unwrap(module, ARPrior)
        device = next(net.parameters()).device
        if text is not None:
            text, text_mask = fit_text(text.to(device), None if text_mask is None else text_mask.to(device),
                                       self.cfg.net.text_len)
        tokens = sample_tokens(net, text, text_mask, sample or self.cfg.sample, generator, batch_size)
        vq = self.vqgan(device)
        images = vq_decode_tokens(vq, tokens, *self.cfg.net.grid) if vq is not None else code_map(tokens, self.cfg.net.grid)
        return tokens, images

    def log_images(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Image.Image]:
        """A row of samples for the batch's first captions (same seed every time)."""
        n = min(self.cfg.grid_samples, int(batch["text"].shape[0]))
        device = next(unwrap(modules["model"], ARPrior).parameters()).device
        gen = torch.Generator(device=device).manual_seed(self.cfg.sample_seed)
        _, images = self.generate(modules["model"], batch["text"][:n], batch["text_mask"][:n], gen)
        return {"samples": image_grid(images)}


__all__ = ["ARFamily", "ARFamilyConfig", "code_map", "fit_text", "image_grid", "load_vqgan"]
