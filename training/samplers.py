"""Samplers for the continuous priors: ``sampler.sample(model, noise, cond, steps, guidance) -> Tensor``.

- ``DDPMSampler``: ancestral sampling, Algorithm 2 of Ho et al. (2020). With steps = T it
  is exactly Algorithm 2; fewer steps use a subsequence of timesteps with the betas
  recomputed from alpha_bar (Nichol & Dhariwal 2021, section 4), which keeps the marginals.
- ``DDIMSampler``: Song et al. (2021) eq. 12 on any subsequence; eta = 0 is deterministic.
- ``EulerSampler`` / ``HeunSampler``: ODE solvers for rectified flow dX/dt = v(X, t) from
  t = 0 (noise) to t = 1 (data), on a grid shifted by the objective's ``TimeShift``.

Every sampler is batched (noise [B, C, h, w] -> samples [B, C, h, w]), seedable through a
``torch.Generator`` (only the stochastic ones draw from it), and takes a classifier-free
guidance weight (``latentpipe.training.guidance.guided``: one batched pass over [cond; null]).

Autoregressive token sampling (top-k / top-p) is a different interface (logits over a
vocabulary, not a denoiser) and lives apart from this file.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch

from latentpipe.training.guidance import guided
from latentpipe.training.objectives import Model
from latentpipe.training.objectives.ddpm import NoiseSchedule
from latentpipe.training.objectives.flow import TimeShift


class Sampler(Protocol):
    """The contract every continuous sampler implements."""

    def sample(
        self,
        model: Model,
        noise: torch.Tensor,
        cond: Any,
        steps: int,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


# ---------------------------------------------------------------------------- diffusion


def ddpm_timesteps(T: int, steps: int) -> list[int]:
    """``steps + 1`` integer times from T down to 0, evenly spaced ([T, T-1, ..., 0] for steps = T)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] for a {T}-step diffusion, got {steps}")
    return [(T * (steps - i) + steps // 2) // steps for i in range(steps + 1)]


def _full(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


class DDPMSampler:
    """Ancestral sampling (Ho et al. Algorithm 2).

    ``variance``: sigma_t^2 = beta_t (``beta``) or the posterior variance
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (``beta_tilde``); Ho et al. found both similar.
    """

    def __init__(self, schedule: NoiseSchedule, variance: Literal["beta", "beta_tilde"] = "beta_tilde") -> None:
        self.schedule = schedule
        self.variance = variance

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        noise: torch.Tensor,
        cond: Any,
        steps: int,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x_T = noise [B, ...] -> x_0 [B, ...]."""
        ab = self.schedule.alpha_bar.tolist()
        ts = ddpm_timesteps(self.schedule.T, steps)
        x = noise
        for t, s in zip(ts[:-1], ts[1:]):
            eps, _ = self.schedule.to_eps_x0(guided(model, x, _full(x, t), cond, guidance), x, _full(x, t))
            alpha = ab[t] / ab[s]  # alpha_t, or the product over the skipped steps
            beta = 1 - alpha
            x = (x - beta / (1 - ab[t]) ** 0.5 * eps) / alpha**0.5
            if s > 0:  # Algorithm 2: z ~ N(0, I) if t > 1, else z = 0
                var = beta if self.variance == "beta" else beta * (1 - ab[s]) / (1 - ab[t])
                z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = x + var**0.5 * z
        return x


class DDIMSampler:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta`` (0: deterministic ODE)."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0) -> None:
        self.schedule = schedule
        self.eta = eta

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        noise: torch.Tensor,
        cond: Any,
        steps: int,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x_T = noise [B, ...] -> x_0 [B, ...] in ``steps`` model evaluations (x2 batch with CFG)."""
        ab = self.schedule.alpha_bar.tolist()
        ts = ddpm_timesteps(self.schedule.T, steps)
        x = noise
        for t, s in zip(ts[:-1], ts[1:]):
            eps, x0 = self.schedule.to_eps_x0(guided(model, x, _full(x, t), cond, guidance), x, _full(x, t))
            sigma = self.eta * ((1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s])) ** 0.5
            x = ab[s] ** 0.5 * x0 + max(1 - ab[s] - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x


# ---------------------------------------------------------------------------- flow


def flow_timesteps(steps: int, shift: TimeShift, h: int, w: int) -> list[float]:
    """``steps + 1`` times from 0 to 1: a uniform grid passed through the training-time shift."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return [float(v) for v in shift(grid, h, w)]


class _FlowODESampler:
    """Integrates dX/dt = v(X, t) from t = 0 (noise) to 1 (data) on the shifted time grid."""

    def __init__(self, shift: TimeShift | None = None) -> None:
        self.shift = shift or TimeShift()

    def step(self, model: Model, x: torch.Tensor, t: float, s: float, cond: Any,
             guidance: float | None) -> torch.Tensor:
        """X at time ``s`` from X [B, C, h, w] at time ``t``."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        noise: torch.Tensor,
        cond: Any,
        steps: int,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """X_0 = noise [B, C, h, w] -> X_1 [B, C, h, w] in ``steps`` steps. Deterministic."""
        ts = flow_timesteps(steps, self.shift, noise.shape[-2], noise.shape[-1])
        x = noise
        for t, s in zip(ts[:-1], ts[1:]):
            x = self.step(model, x, t, s, cond, guidance)
        return x


class EulerSampler(_FlowODESampler):
    """Explicit Euler (as minRF's sampler): 1 evaluation per step."""

    def step(self, model: Model, x: torch.Tensor, t: float, s: float, cond: Any,
             guidance: float | None) -> torch.Tensor:
        return x + (s - t) * guided(model, x, _full(x, 0) + t, cond, guidance)


class HeunSampler(_FlowODESampler):
    """Heun's second-order method (explicit trapezoid): 2 evaluations per step."""

    def step(self, model: Model, x: torch.Tensor, t: float, s: float, cond: Any,
             guidance: float | None) -> torch.Tensor:
        v1 = guided(model, x, _full(x, 0) + t, cond, guidance)
        x_pred = x + (s - t) * v1
        v2 = guided(model, x_pred, _full(x, 0) + s, cond, guidance)
        return x + (s - t) * 0.5 * (v1 + v2)


DIFFUSION_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "heun")


def diffusion_sampler(name: str, schedule: NoiseSchedule, eta: float = 0.0) -> Sampler:
    """``ddpm`` (ancestral) or ``ddim`` over ``schedule``."""
    if name == "ddpm":
        return DDPMSampler(schedule)
    if name == "ddim":
        return DDIMSampler(schedule, eta)
    raise ValueError(f"unknown diffusion sampler {name!r} (choose from {', '.join(DIFFUSION_SAMPLERS)})")


def flow_sampler(name: str, shift: TimeShift) -> Sampler:
    """``euler`` or ``heun`` on the grid shifted by ``shift``."""
    if name == "euler":
        return EulerSampler(shift)
    if name == "heun":
        return HeunSampler(shift)
    raise ValueError(f"unknown flow sampler {name!r} (choose from {', '.join(FLOW_SAMPLERS)})")
