"""Training objectives: ``objective.loss(model, batch) -> (loss, logs)``.

The shared, narrow types every continuous objective and sampler uses live here; each
objective is its own module (``ddpm.py``, ``flow.py``, ...). Importing this package does
not import any objective, so modules stay independent.

A *model* is any callable ``model(x_t, t, cond) -> Tensor`` with ``x_t`` [B, C, h, w],
``t`` [B] float (the objective's own time convention) and an opaque ``cond`` that the
objective passes through untouched (see ``latentpipe.training.guidance.TextCond``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Model(Protocol):
    """``model(x_t [B, C, h, w], t [B], cond) -> [B, C, h, w]``."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, /) -> torch.Tensor: ...


@dataclass(frozen=True)
class LatentBatch:
    """What a continuous objective trains on.

    Attributes:
        x: clean data, e.g. scaled VAE latents, [B, C, h, w].
        cond: conditioning handed to the model as is (any type the model accepts).
    """

    x: torch.Tensor
    cond: Any


class ContinuousObjective(Protocol):
    """``loss(model, batch, generator) -> (scalar loss, values to log: device tensors or floats)``: DDPM, rectified flow."""

    def loss(self, model: Model, batch: LatentBatch,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]: ...


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension: [B, ...] x2 -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
