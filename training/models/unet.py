"""UNet backbone: diffusers ``UNet2DConditionModel`` with cross-attention to text tokens.

The latent-diffusion UNet of Rombach et al. (2022): ResNet blocks with the timestep
embedding, and transformer blocks whose cross-attention reads the per-token text
embeddings (``encoder_hidden_states`` [B, L, D], padding masked by
``encoder_attention_mask``). Presets are plain functions of the data's ``BackboneSpec``.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from latentpipe.training.models import BackboneSpec, Denoiser, Preset


class UNetDenoiser(Denoiser):
    """``Denoiser`` over a ``UNet2DConditionModel``."""


    def run_backbone(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.backbone(
            x, t, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False
        )[0]
        return out  # [B, C, h, w]


def _unet(
    spec: BackboneSpec, channels: tuple[int, ...], layers: int, heads: int, attn: tuple[bool, ...]
) -> nn.Module:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=layers,
        cross_attention_dim=spec.text_dim,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=32,
    )


def unet_demo(spec: BackboneSpec) -> nn.Module:
    """~3.4M parameters (D = 384) for the 32 px demo (8x8 latents): 2 levels, cross-attention at 8x8 and in the middle."""
    return _unet(spec, (64, 128), 1, 4, (True, False))


def unet_base(spec: BackboneSpec) -> nn.Module:
    """~100M parameters, 3 levels, for 256 px (32x32 latents) on one GPU."""
    return _unet(spec, (128, 256, 512), 2, 8, (True, True, True))


def unet_sd(spec: BackboneSpec) -> nn.Module:
    """Stable Diffusion 1.x sized (~860M with D = 768): (320, 640, 1280, 1280), 2 layers, 8 heads."""
    return _unet(spec, (320, 640, 1280, 1280), 2, 8, (True, True, True, False))


PRESETS: dict[str, Preset] = {"unet_demo": unet_demo, "unet_base": unet_base, "unet_sd": unet_sd}
