"""Transformer backbones for the latent priors: diffusers ``PixArtTransformer2DModel`` and ``SD3Transformer2DModel``.

``dit_*``: a Diffusion Transformer (Peebles & Xie, 2023) over 2x2 latent patches, with
adaLN-single timestep modulation and a cross-attention layer to the text tokens in every
block (PixArt-alpha, Chen et al. 2023). The caption projection maps the text width D to the
model width. Sizes follow DiT's names (``dit_b2``: DiT-B/2, ``dit_xl2``: DiT-XL/2 =
PixArt-alpha's 28 x 1152).

``mmdit_*``: SD3's multimodal DiT (Esser et al., 2024, section 4): text and image tokens in
one joint attention, and a pooled text vector added to the timestep embedding that
modulates every block (adaLN). The pooled vector is the masked mean of the per-token text
embeddings (what MiniLM's sentence embedding is, before normalisation); a dropped caption
pools its null token. The global path carries a one-object caption's colour, shape and place
to every block from the first steps, which the demo's short runs need.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from torch import nn

from training.models import BackboneSpec, Denoiser, Preset


class DiTDenoiser(Denoiser):
    """``Denoiser`` over a ``PixArtTransformer2DModel``."""


    def run_backbone(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.backbone(
            x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, return_dict=False
        )[0]
        return out  # [B, C, h, w]


class MMDiTDenoiser(Denoiser):
    """``Denoiser`` over an ``SD3Transformer2DModel`` (joint attention + pooled text in the adaLN)."""

    def run_backbone(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        m = mask.to(text.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, D]
        text = text * m  # padding tokens are zeros (SD3's joint attention has no mask)
        out: torch.Tensor = self.backbone(
            x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False
        )[0]
        return out  # [B, C, h, w]


def _mmdit(spec: BackboneSpec, layers: int, heads: int, head_dim: int, patch: int = 2) -> nn.Module:
    if spec.sample_size % patch:
        raise ValueError(f"latent side {spec.sample_size} is not a multiple of the patch size {patch}")
    return SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=patch,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=spec.text_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=spec.text_dim,
        pos_embed_max_size=spec.sample_size // patch,
    )


def mmdit_demo(spec: BackboneSpec) -> nn.Module:
    """~2.4M parameters (D = 384) for the 32 px demo: 4 joint blocks of width 128 over 16 patches of an 8x8 latent."""
    return _mmdit(spec, layers=4, heads=4, head_dim=32)


def mmdit_b2(spec: BackboneSpec) -> nn.Module:
    """SD3-style MMDiT at DiT-B/2 width: 12 joint blocks, width 768, 12 heads."""
    return _mmdit(spec, layers=12, heads=12, head_dim=64)


def _dit(spec: BackboneSpec, layers: int, heads: int, head_dim: int, patch: int = 2) -> nn.Module:
    if spec.sample_size % patch:
        raise ValueError(f"latent side {spec.sample_size} is not a multiple of the patch size {patch}")
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        num_layers=layers,
        cross_attention_dim=heads * head_dim,
        sample_size=spec.sample_size,
        patch_size=patch,
        caption_channels=spec.text_dim,
        use_additional_conditions=False,
    )


def dit_demo(spec: BackboneSpec) -> nn.Module:
    """~1.3M parameters (D = 384) for the 32 px demo: 4 blocks of width 128 over 16 patches of an 8x8 latent."""
    return _dit(spec, layers=4, heads=4, head_dim=32)


def dit_b2(spec: BackboneSpec) -> nn.Module:
    """DiT-B/2: 12 blocks, width 768, 12 heads (~120M)."""
    return _dit(spec, layers=12, heads=12, head_dim=64)


def dit_xl2(spec: BackboneSpec) -> nn.Module:
    """DiT-XL/2 (PixArt-alpha size): 28 blocks, width 1152, 16 heads (~600M)."""
    return _dit(spec, layers=28, heads=16, head_dim=72)


PRESETS: dict[str, Preset] = {"dit_demo": dit_demo, "dit_b2": dit_b2, "dit_xl2": dit_xl2}
MMDIT_PRESETS: dict[str, Preset] = {"mmdit_demo": mmdit_demo, "mmdit_b2": mmdit_b2}
