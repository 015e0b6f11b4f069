"""Pixels <-> the models' range: uint8 ``[.., H, W, 3]`` <-> float ``[.., 3, H, W]`` in [-1, 1], and grids.

The one place latentpipe maps image bytes to what the autoencoders, scorer and encoders read
(``x / 127.5 - 1``) and model outputs back to pixels (clamped to [-1, 1], then rounded to the
nearest of the 256 levels, so ``to_uint8(to_unit(a)) == a`` for every uint8 image ``a``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 images [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (numpy: no torch threads, so the
    data loader's workers can call it)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    x /= np.float32(127.5)  # division, as torch does: the same floats on every path
    x -= np.float32(1.0)
    return x


def to_unit_tensor(images: np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """uint8 images [B, H, W, 3] (or PIL images) -> a float32 tensor [B, 3, H, W] in [-1, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(to_unit(images))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] (or one [3, H, W]) in [-1, 1] -> uint8 [B, H, W, 3] (or [H, W, 3])."""
    x = images.detach().float().cpu().clamp(-1, 1)
    x = x.permute(*range(x.ndim - 3), -2, -1, -3)  # channels last
    return ((x.numpy() + 1.0) * 127.5).round().astype(np.uint8)


def grid(rows: Sequence[torch.Tensor], n: int | None = None, scale: int = 1) -> Image.Image:
    """Rows of images [B, 3, H, W] in [-1, 1] (the first ``n`` of each, side by side), stacked top to
    bottom into one PIL image, upscaled ``scale`` times (nearest)."""
    strips = [torch.cat(list(r[:n].detach().float().cpu()), dim=2) for r in rows]  # each [3, H, B*W]
    img = Image.fromarray(to_uint8(torch.cat(strips, dim=1)))
    return img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


__all__ = ["grid", "to_uint8", "to_unit", "to_unit_tensor"]
