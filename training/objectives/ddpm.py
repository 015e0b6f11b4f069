"""DDPM training objective and noise schedules.

Implements Algorithm 1 of Ho et al., "Denoising Diffusion Probabilistic Models" (2020):
t ~ Uniform{1, ..., T}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
loss ||eps - eps_theta(x_t, t, c)||^2. Options:

- schedules: ``linear`` (Ho et al.), ``cosine`` (Nichol & Dhariwal 2021, eq. 17, betas
  clipped at 0.999), ``scaled_linear`` (linear in sqrt(beta), as Stable Diffusion);
- parameterisations: ``eps``; ``v`` = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho
  2022); ``x0`` in Imagen's form E[w_t ||x0_theta(x_t, c) - x_0||^2] (Saharia et al. 2022,
  eq. 1) with w_t = SNR(t) (equal to the eps loss), max(SNR, 1) ("truncated SNR",
  Salimans & Ho) or 1;
- min-SNR-gamma weighting (Hang et al. 2023): the x_0-space weight min(SNR(t), gamma),
  written in each parameterisation (eps: /SNR, v: /(SNR + 1), x0: as is). It replaces
  ``x0_weighting`` when set.

Time convention: t is the paper's integer index in {1..T} (0 means clean data), handed to
the model as a float tensor [B]. ``alpha_bar[0] = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from latentpipe.training.objectives import LatentBatch, Model, per_sample_mse

Schedule = Literal["linear", "cosine", "scaled_linear"]
Prediction = Literal["eps", "v", "x0"]


@dataclass
class DDPMConfig:
    """The diffusion process and the training loss (the ``objective:`` section)."""

    timesteps: int = 1000
    schedule: Schedule = "linear"
    beta_start: float = 1e-4  # linear / scaled_linear
    beta_end: float = 0.02
    cosine_s: float = 0.008
    prediction: Prediction = "eps"
    x0_weighting: Literal["snr", "truncated_snr", "constant"] = "snr"  # only for prediction x0
    min_snr_gamma: float | None = None  # e.g. 5.0

    def __post_init__(self) -> None:
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")


def make_betas(cfg: DDPMConfig) -> torch.Tensor:
    """beta_1..beta_T as float64 [T]."""
    T = cfg.timesteps
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    if cfg.schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
    if cfg.schedule == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a DDPM and conversions between parameterisations.

    ``alpha_bar`` is float64 [T + 1] indexed by the paper's t, with ``alpha_bar[0] = 1``.
    Methods take ``t`` as an integer-valued tensor [B] and broadcast over [B, ...].
    """

    def __init__(self, cfg: DDPMConfig) -> None:
        self.T = cfg.timesteps
        self.prediction: Prediction = cfg.prediction
        betas = make_betas(cfg)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # [T + 1], beta_0 unused
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)  # [T + 1], alpha_bar[0] = 1

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t broadcastable to ``like``: t [B] -> [B, 1, ..., 1] in like's dtype."""
        a = self.alpha_bar.to(like.device)[t.long().to(like.device)]
        return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float64 [B]."""
        a = self.alpha_bar.to(t.device)[t.long()]
        return a / (1 - a)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4)."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model regresses to under this schedule's parameterisation."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        a = self.abar(t, x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v

    def to_eps_x0(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output -> (eps_hat, x0_hat), both [B, ...]. Needs t >= 1."""
        a = self.abar(t, x_t)
        sa, s1 = a.sqrt(), (1 - a).sqrt()
        if self.prediction == "eps":
            return out, (x_t - s1 * out) / sa
        if self.prediction == "x0":
            return (x_t - sa * out) / s1, out
        return s1 * x_t + sa * out, sa * x_t - s1 * out  # v

    def output_from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_eps_x0``: an eps prediction written in this parameterisation."""
        a = self.abar(t, x_t)
        sa, s1 = a.sqrt(), (1 - a).sqrt()
        x0 = (x_t - s1 * eps) / sa
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return sa * eps - s1 * x0


class DDPMObjective:
    """``loss(model, batch) -> (loss, logs)`` for DDPM training (Algorithm 1)."""

    def __init__(self, cfg: DDPMConfig) -> None:
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg)

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ Uniform{1, ..., T}: int64 [n]."""
        return torch.randint(1, self.cfg.timesteps + 1, (n,), device=device, generator=generator)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight in the model's parameterisation, float32 [B]."""
        snr = self.schedule.snr(t)
        pred, gamma = self.cfg.prediction, self.cfg.min_snr_gamma
        if gamma is not None:
            w = snr.clamp(max=gamma)  # x0-space weight min(SNR, gamma)
            if pred == "eps":
                w = w / snr
            elif pred == "v":
                w = w / (snr + 1)
        elif pred == "x0":
            w = {"snr": snr, "truncated_snr": snr.clamp(min=1.0), "constant": torch.ones_like(snr)}[
                self.cfg.x0_weighting
            ]
        else:
            w = torch.ones_like(snr)
        return w.float()

    def loss(
        self, model: Model, batch: LatentBatch, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Weighted regression loss on a batch of clean latents ``batch.x`` [B, C, h, w]."""
        x0 = batch.x
        t = self.sample_t(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.schedule.q_sample(x0, t, eps)
        out = model(x_t, t.to(x0.dtype), batch.cond)
        if out.shape != x0.shape:
            raise ValueError(f"model output {tuple(out.shape)} does not match the latent {tuple(x0.shape)}")
        mse = per_sample_mse(out, self.schedule.target(x0, eps, t))  # [B]
        loss = (self.weights(t).to(mse.device) * mse).mean()
        return loss, {"loss": loss.detach(), "mse": mse.detach().mean()}
