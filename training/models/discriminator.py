"""PatchGAN discriminator (Isola et al. 2017, "pix2pix"; the VQGAN discriminator of Esser et al. 2021).

A stack of 4x4 convolutions: ``n_layers`` stride-2 downsamplings, then two stride-1 layers, giving
one real/fake logit per overlapping image patch. GroupNorm replaces the original BatchNorm so the
real and fake passes and the ranks share no running statistics (no buffers to sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class DiscriminatorConfig:
    """PatchGAN size: ``channels`` in the first layer, doubled per layer up to 8x."""

    channels: int = 64
    n_layers: int = 3
    norm: Literal["group", "none"] = "group"

    def __post_init__(self) -> None:
        if self.channels < 1 or self.n_layers < 1:
            raise ValueError("discriminator channels and n_layers must be >= 1")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels) if kind == "group" else nn.Identity()


class PatchDiscriminator(nn.Module):
    """Images [B,C,H,W] in [-1,1] -> patch logits [B,1,H',W'] (H' = H / 2**n_layers - 2)."""

    def __init__(self, cfg: DiscriminatorConfig, in_channels: int = 3) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=cfg.norm == "none"),
                       _norm(cfg.norm, ch * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B,C,H,W] -> logits [B,1,H',W']."""
        out: torch.Tensor = self.net(x)
        return out


def _init_weights(m: nn.Module) -> None:
    """DCGAN init, as in pix2pix/taming: conv N(0, 0.02), norm scale N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


__all__ = ["DiscriminatorConfig", "PatchDiscriminator"]
