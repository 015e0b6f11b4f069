"""DiT backbone for flow matching: diffusers ``PixArtTransformer2DModel``.

A Diffusion Transformer (Peebles & Xie, 2023) over 2x2 latent patches, with adaLN-single
timestep modulation and a cross-attention layer to the text tokens in every block
(PixArt-alpha, Chen et al. 2023). The caption projection maps the text width D to the
model width. Sizes follow DiT's names (``dit_b2``: DiT-B/2, ``dit_xl2``: DiT-XL/2 =
PixArt-alpha's 28 x 1152).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from torch import nn

from latentpipe.training.models import BackboneSpec, Denoiser, Preset


class DiTDenoiser(Denoiser):
    """``Denoiser`` over a ``PixArtTransformer2DModel``."""


    def run_backbone(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.backbone(
            x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, return_dict=False
        )[0]
        return out  # [B, C, h, w]


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
