"""Rectified flow / flow matching objective.

Liu et al., "Flow Straight and Fast" (2022); Lipman et al., "Flow Matching" (2023);
Esser et al., "Scaling Rectified Flow Transformers" (SD3, 2024). The path is

    X_t = t X_1 + (1 - t) X_0,   X_0 ~ N(0, I) noise,  X_1 the data,  t in [0, 1],

and the model regresses the velocity X_1 - X_0. t = 0 is pure noise, t = 1 is data; the
sampler integrates dX/dt = v(X, t) from 0 to 1.

Training times: ``uniform`` or ``logit_normal`` (SD3 eq. 19): t = sigmoid(m + s n),
n ~ N(0, 1). Here the location m is on *our* t (fraction of data), so m > 0 leans towards
data and m < 0 towards noise; SD3 writes the same density on its noise level 1 - t.

Timestep shift (SD3 eq. 23, section 5.3.2): with noise level sigma = 1 - t,
sigma' = a sigma / (1 + (a - 1) sigma), i.e. t' = t / (t + a (1 - t)); a > 1 spends more
time at high noise. The factor is resolution dependent, a = base * sqrt(h w / base_seq_len)
over latent positions, and ``TimeShift`` is the one function used both when drawing
training times and when building the sampler's time grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from latentpipe.training.objectives import LatentBatch, Model, per_sample_mse


@dataclass
class TimeShift:
    """Resolution-dependent timestep shift; ``base = 1`` and no ``base_seq_len`` is none."""

    base: float = 1.0  # the shift factor at base_seq_len latent positions
    base_seq_len: int | None = None  # None: the same shift at every resolution

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ValueError(f"time_shift.base must be > 0, got {self.base}")
        if self.base_seq_len is not None and self.base_seq_len < 1:
            raise ValueError(f"time_shift.base_seq_len must be >= 1, got {self.base_seq_len}")

    def factor(self, h: int, w: int) -> float:
        """The shift a for latents of h x w positions."""
        if self.base_seq_len is None:
            return self.base
        return self.base * math.sqrt(h * w / self.base_seq_len)

    def __call__(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Shift times t [N] in [0, 1] for h x w latents (identity when the factor is 1)."""
        return shift_time(t, self.factor(h, w))


def shift_time(t: torch.Tensor, a: float) -> torch.Tensor:
    """t' = t / (t + a (1 - t)), the SD3 shift of the noise level 1 - t by factor a."""
    if a == 1.0:
        return t
    return t / (t + a * (1 - t))


@dataclass
class FlowConfig:
    """The flow-matching training objective (the ``objective:`` section)."""

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: TimeShift = field(default_factory=TimeShift)

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def path_sample(
    x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight path: data x1, noise x0 [B, ...], t [B] -> (X_t, target X_1 - X_0)."""
    tb = t.to(x1.dtype).view(-1, *([1] * (x1.dim() - 1)))  # [B, 1, ..., 1]
    return tb * x1 + (1 - tb) * x0, x1 - x0


class FlowObjective:
    """``loss(model, batch) -> (loss, logs)`` for rectified-flow velocity regression."""

    def __init__(self, cfg: FlowConfig) -> None:
        self.cfg = cfg

    def sample_t(
        self, n: int, h: int, w: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training times for h x w latents: float32 [n] in (0, 1), shifted."""
        if self.cfg.time_sampling == "uniform":
            t = torch.rand(n, device=device, generator=generator)
        else:
            z = torch.randn(n, device=device, generator=generator)
            t = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        return self.cfg.time_shift(t, h, w)

    def loss(
        self, model: Model, batch: LatentBatch, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Velocity MSE on a batch of clean latents ``batch.x`` [B, C, h, w]."""
        x1 = batch.x
        t = self.sample_t(x1.shape[0], x1.shape[-2], x1.shape[-1], x1.device, generator)
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        x_t, target = path_sample(x1, x0, t)
        out = model(x_t, t.to(x1.dtype), batch.cond)
        if out.shape != x1.shape:
            raise ValueError(f"model output {tuple(out.shape)} does not match the latent {tuple(x1.shape)}")
        loss = per_sample_mse(out, target).mean()
        return loss, {"loss": loss.detach()}
