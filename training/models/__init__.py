"""Denoising backbones for the latent priors: ``model(x_t, t, cond) -> Tensor``.

``Denoiser`` adapts a diffusers backbone (``unet.py``: ``UNet2DConditionModel``;
``dit.py``: ``PixArtTransformer2DModel``, a DiT with text cross-attention) to the narrow
interface the objectives and samplers use, and owns the classifier-free-guidance null
embedding: rows with ``cond.drop`` see one null token (learned, or zeros) instead of
their caption. Backbone sizes are named presets, plain factory functions listed in
``presets()`` (as DiT's ``DiT_models``).

Time: the objective's t [B] is multiplied by ``time_scale`` before the backbone's
sinusoidal embedding (1 for DDPM's integer t in {1..T}, 1000 for flow's t in [0, 1]).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from latentpipe.training.guidance import TextCond

NullText = Literal["learned", "zero"]


@dataclass(frozen=True)
class BackboneSpec:
    """What a preset needs from the data: latent channels C, latent side h = w, text width D."""

    in_channels: int = 4
    sample_size: int = 8
    text_dim: int = 384


class Denoiser(nn.Module, abc.ABC):
    """``forward(x_t [B, C, h, w], t [B], cond: TextCond) -> [B, C, h, w]`` over a backbone.

    Inputs are cast to the parameters' dtype (bf16 / fp16 engines) and the output back to
    ``x_t``'s dtype, so objectives and samplers stay in float32.
    """

    def __init__(self, backbone: nn.Module, text_dim: int, time_scale: float, null_text: NullText) -> None:
        super().__init__()
        self.backbone = backbone
        self.time_scale = time_scale
        self.null_kind = null_text
        self.null_text: torch.Tensor  # [D]; a learned null starts at zero, trained by the dropped captions
        if null_text == "learned":
            self.null_text = nn.Parameter(torch.zeros(text_dim))
        else:
            self.register_buffer("null_text", torch.zeros(text_dim), persistent=False)

    def condition(self, cond: TextCond, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Text [B, L, D] and mask [B, L] with dropped rows replaced by (null token, zeros...)."""
        text, mask = cond.text.to(dtype), cond.mask.bool()
        b, n, d = text.shape
        if n == 0:  # no tokens at all: give the null token a slot
            text, mask, n = text.new_zeros(b, 1, d), mask.new_zeros(b, 1), 1
        null_tok = self.null_text.to(dtype).view(1, 1, d).expand(b, 1, d)
        null_seq = torch.cat([null_tok, text.new_zeros(b, n - 1, d)], dim=1)  # [B, L, D]
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = True
        drop = cond.drop.to(text.device).view(b, 1)
        return torch.where(drop.unsqueeze(-1), null_seq, text), torch.where(drop, null_mask, mask)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        dtype = next(self.backbone.parameters()).dtype
        text, mask = self.condition(cond, dtype)
        out = self.run_backbone(x_t.to(dtype), (t * self.time_scale).to(dtype), text, mask)
        return out.to(x_t.dtype)

    @abc.abstractmethod
    def run_backbone(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The backbone's own call: x [B, C, h, w], scaled t [B], text [B, L, D], mask [B, L] bool."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


Preset = Callable[[BackboneSpec], nn.Module]


def presets() -> dict[str, Preset]:
    """All backbone presets by name (``unet_*``, ``dit_*``)."""
    from latentpipe.training.models import dit, unet

    return {**unet.PRESETS, **dit.PRESETS}


def build_denoiser(preset: str, spec: BackboneSpec, time_scale: float, null_text: NullText) -> Denoiser:
    """A fresh ``Denoiser`` around preset ``preset`` (a ValueError lists the names)."""
    from latentpipe.training.models import dit, unet

    if preset in unet.PRESETS:
        return unet.UNetDenoiser(unet.PRESETS[preset](spec), spec.text_dim, time_scale, null_text)
    if preset in dit.PRESETS:
        return dit.DiTDenoiser(dit.PRESETS[preset](spec), spec.text_dim, time_scale, null_text)
    raise ValueError(f"unknown backbone preset {preset!r} (known: {', '.join(sorted(presets()))})")


__all__ = ["BackboneSpec", "Denoiser", "NullText", "build_denoiser", "presets"]
