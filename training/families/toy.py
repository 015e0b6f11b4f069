"""Tiny test families that exercise the trainer: ``toy`` (one part) and ``toy_gan`` (two parts).

``toy`` is a small conv net that regresses each image's per-channel mean colour (an easy
target: the loss falls within a few dozen steps). ``hidden``/``depth`` add an MLP trunk so
benchmarks can scale the same family to ~50M parameters. ``toy_gan`` adds a critic on the
predicted colours (a least-squares GAN term, Mao et al. 2017) to exercise two engines,
two optimizers and ``parts(step)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latentpipe.preprocessing.pixels import grid
from latentpipe.training.families import register
from latentpipe.training.families.base import Family


@dataclass
class ToyConfig:
    channels: int = 16      # conv width
    hidden: int = 64        # MLP trunk width
    depth: int = 1          # MLP trunk layers
    dropout: float = 0.0    # draws from the torch RNG, so resume must restore it to be exact
    nan_loss_steps: list[int] = field(default_factory=list)  # fault injection: the loss is NaN at these steps

    def __post_init__(self) -> None:
        if self.channels < 1 or self.hidden < 1 or self.depth < 0:
            raise ValueError("channels and hidden must be >= 1, depth >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class ColourNet(nn.Module):
    """[B, 3, H, W] images in [-1, 1] -> [B, 3] predicted per-channel means."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # [B, 2c]
        )
        layers: list[nn.Module] = [nn.Linear(2 * c, cfg.hidden), nn.SiLU(), nn.Dropout(cfg.dropout)]
        for _ in range(cfg.depth):
            layers += [nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU()]
        layers.append(nn.Linear(cfg.hidden, 3))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _target(batch: Mapping[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["image"].to(device=like.device, dtype=like.dtype)  # [B, 3, H, W]
    return x, x.mean(dim=(2, 3))  # [B, 3]


def _dtype_of(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        return p
    raise ValueError("module has no parameters")


def colour_grid(images: torch.Tensor, colours: torch.Tensor, n: int = 8) -> Image.Image:
    """Top row: the first ``n`` images; bottom row: swatches of ``colours`` [B, 3] in [-1, 1]."""
    imgs = images[:n]  # [n, 3, H, W]
    return grid([imgs, colours[:n, :, None, None].expand_as(imgs)])


@register
class ToyFamily(Family):
    """Regress per-channel mean colour with MSE; one part."""

    name = "toy"
    data_kind = "images"
    config_class = ToyConfig
    cfg: ToyConfig

    def build(self) -> dict[str, nn.Module]:
        return {"model": ColourNet(self.cfg)}

    def loss(self, part: str, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int
             ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        model = modules["model"]
        x, y = _target(batch, _dtype_of(model))
        pred = model(x)  # [B, 3]
        loss = F.mse_loss(pred.float(), y.float())
        if step in self.cfg.nan_loss_steps:
            loss = loss * float("nan")
        return loss, {}

    @torch.no_grad()
    def log_images(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Image.Image]:
        model = modules["model"]
        x, _ = _target(batch, _dtype_of(model))
        return {"colours": colour_grid(x, model(x))}


@dataclass
class ToyGanConfig(ToyConfig):
    adv_weight: float = 0.1   # weight of the generator's adversarial term
    disc_hidden: int = 32
    disc_every: int = 1       # the critic steps when step % disc_every == 0


class Critic(nn.Module):
    """[B, 3] colours -> [B] realness scores."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c).squeeze(-1)


@register
class ToyGanFamily(Family):
    """``toy`` plus a least-squares critic on (true vs predicted) colours: two engines."""

    name = "toy_gan"
    data_kind = "images"
    config_class = ToyGanConfig
    cfg: ToyGanConfig

    def build(self) -> dict[str, nn.Module]:
        return {"model": ColourNet(self.cfg), "disc": Critic(self.cfg.disc_hidden)}

    def build_primary(self) -> nn.Module:
        return ColourNet(self.cfg)

    def parts(self, step: int) -> list[str]:
        return ["model", "disc"] if step % self.cfg.disc_every == 0 else ["model"]

    def loss(self, part: str, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int
             ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        model, disc = modules["model"], modules["disc"]
        x, y = _target(batch, _dtype_of(model))
        if part == "model":
            disc.requires_grad_(False)  # the critic's gradients stay out of the generator's step
            try:
                pred = model(x)  # [B, 3]
                mse = F.mse_loss(pred.float(), y.float())
                adv = ((disc(pred.to(_dtype_of(disc).dtype)).float() - 1.0) ** 2).mean()
            finally:
                disc.requires_grad_(True)
            loss = mse + self.cfg.adv_weight * adv
            if step in self.cfg.nan_loss_steps:
                loss = loss * float("nan")
            return loss, {"mse": mse.detach(), "adv": adv.detach()}
        if part == "disc":
            with torch.no_grad():
                pred = model(x)  # no generator graph
            d = _dtype_of(disc).dtype
            real, fake = disc(y.to(d)).float(), disc(pred.to(d)).float()
            loss = 0.5 * (((real - 1.0) ** 2).mean() + (fake ** 2).mean())
            return loss, {"real": real.mean().detach(), "fake": fake.mean().detach()}
        raise KeyError(f"toy_gan has no part {part!r}")

    @torch.no_grad()
    def log_images(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Image.Image]:
        model = modules["model"]
        x, _ = _target(batch, _dtype_of(model))
        return {"colours": colour_grid(x, model(x))}


__all__ = ["ColourNet", "Critic", "ToyConfig", "ToyFamily", "ToyGanConfig", "ToyGanFamily", "colour_grid"]
