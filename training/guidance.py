"""Classifier-free guidance (Ho & Salimans, 2022): conditioning with a null slot, and the
guided model evaluation shared by every sampler.

Training drops each caption with probability p (``TextCond.drop``); the model replaces a
dropped caption by its null embedding. At sampling time the conditional and unconditional
passes run as one batch of 2B and are combined in the model's output space,

    out = w out_cond + (1 - w) out_uncond  (= out_uncond + w (out_cond - out_uncond)),

which is the same as combining eps (or velocities) because every parameterisation used
here is affine in the model output for fixed (x_t, t). w = 1 is the conditional model,
w = 0 the unconditional one; the written form is exact at both. ``mix`` is the one
implementation: the diffusion and flow samplers mix model outputs with it, the AR sampler
next-token logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from latentpipe.training.objectives import Model

C = TypeVar("C", bound="Guidable")


class Guidable(Protocol):
    """Conditioning that knows its own null version and how to concatenate along the batch."""

    def null(self: C) -> C: ...

    def cat(self: C, other: C) -> C: ...


@dataclass(frozen=True)
class TextCond:
    """Per-token text conditioning for one batch.

    Attributes:
        text: token embeddings, zero-padded, float [B, L, D].
        mask: True at real tokens, bool [B, L].
        drop: True where the caption is dropped and the model must use its null embedding, bool [B].
    """

    text: torch.Tensor
    mask: torch.Tensor
    drop: torch.Tensor

    @staticmethod
    def of(text: torch.Tensor, mask: torch.Tensor | None = None) -> TextCond:
        """Conditioning with nothing dropped; ``mask`` defaults to all tokens real."""
        b, n = text.shape[:2]
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=text.device)
        return TextCond(text, mask.bool(), torch.zeros(b, dtype=torch.bool, device=text.device))

    def __len__(self) -> int:
        return int(self.text.shape[0])

    def null(self) -> TextCond:
        """The same batch with every caption dropped."""
        return TextCond(self.text, self.mask, torch.ones_like(self.drop))

    def cat(self, other: TextCond) -> TextCond:
        """Concatenate two batches (the shorter text is zero-padded to the longer)."""
        a, b = self, other
        n = max(a.text.shape[1], b.text.shape[1])
        return TextCond(
            torch.cat([_pad(a.text, n), _pad(b.text, n)]),
            torch.cat([_pad(a.mask, n), _pad(b.mask, n)]),
            torch.cat([a.drop, b.drop]),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCond:
        return TextCond(self.text.to(device, dtype), self.mask.to(device), self.drop.to(device))

    def take(self, n: int) -> TextCond:
        """The first n rows."""
        return TextCond(self.text[:n], self.mask[:n], self.drop[:n])


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad dim 1 of [B, L, ...] to length n."""
    if x.shape[1] == n:
        return x
    pad = torch.zeros(x.shape[0], n - x.shape[1], *x.shape[2:], dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of two outputs of the same shape: ``scale * cond + (1 - scale) * uncond``."""
    return cond * scale + uncond * (1.0 - scale)


def guided(model: Model, x: torch.Tensor, t: torch.Tensor, cond: Any, scale: float | None) -> torch.Tensor:
    """Model output with classifier-free guidance.

    Args:
        model: ``model(x_t, t, cond) -> Tensor``.
        x: current state [B, ...]; t: times [B].
        cond: conditioning with ``null()`` and ``cat()`` (e.g. ``TextCond``) when ``scale`` is set.
        scale: guidance weight w; None runs the conditional model alone (one pass).

    Returns:
        [B, ...]: ``mix(c, u, w)`` from one batched pass over [cond; null(cond)].
    """
    if scale is None:
        return model(x, t, cond)
    out = model(torch.cat([x, x]), torch.cat([t, t]), cond.cat(cond.null()))  # [2B, ...]
    c, u = out.chunk(2)
    return mix(c, u, scale)
