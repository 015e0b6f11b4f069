"""The ``ddpm`` family: latent diffusion on VAE latents conditioned on text tokens.

Consumes latent batches: ``latent`` [B, 2C, h, w] (posterior mean ‖ log-variance), ``text``
[B, L, D], ``text_mask`` [B, L]. Each step draws z = mean + exp(logvar / 2) n (a fresh
posterior sample, as Rombach et al. train on), maps it to (z - shift_factor) * scaling_factor
(the VAE's factors, recorded in the latent manifest), drops captions with probability
``cond_drop`` (the model's null embedding takes their place: classifier-free guidance,
Ho & Salimans 2022) and applies the DDPM objective
(``training/objectives/ddpm.py``). ``LatentPriorFamily`` is shared with the ``flow`` family.

Sample grids: latents from the configured sampler for the eval batch's captions; decoded
to pixels by ``vae`` (a KL-VAE export folder or a diffusers ``AutoencoderKL`` folder) when
set, otherwise shown as false-colour latents (first 3 channels) next to the data latents.

Training randomness comes from ``noise_generator(step)``, a pure function of (seed, step, rank,
micro-batch), so a run resumed from a checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from latentpipe.preprocessing.config import ConfigError
from latentpipe.preprocessing.pixels import grid
from latentpipe.training.families import register
from latentpipe.training.families.base import Family, unwrap
from latentpipe.training.guidance import TextCond
from latentpipe.training.models import BackboneSpec, NullText, build_denoiser
from latentpipe.training.objectives import ContinuousObjective, LatentBatch
from latentpipe.training.objectives.ddpm import DDPMConfig, DDPMObjective
from latentpipe.training.samplers import Sampler, diffusion_sampler


@dataclass
class LatentPriorConfig:
    """Fields shared by the ``ddpm`` and ``flow`` sections of ``model:``."""

    backbone: str = "unet_demo"  # a preset of training/models (unet_demo, unet_base, unet_sd, dit_demo, ...)
    latent_channels: int = 4  # C (the latent shards hold 2C: mean and log-variance)
    latent_size: int = 8  # h = w of the latents
    text_dim: int = 384  # D of the per-token text embeddings
    scaling_factor: float | None = None  # the VAE's latent scaling factor; None: the latent manifest's
    shift_factor: float | None = None  # subtracted before scaling (SD3 / FLUX VAEs); None: the manifest's
    cond_drop: float = 0.1  # probability of dropping a caption in training (CFG)
    null_text: NullText = "learned"  # the dropped caption's embedding: learned, or zeros
    vae: str = ""  # KL-VAE export / diffusers AutoencoderKL folder decoding sample grids ("": latents)
    grid_samples: int = 8  # samples per logged grid
    sample_seed: int = 0  # seed of the logged grids (the same draws every time)
    noise_seed: int = 0  # training draws of (step, rank, micro-batch) come from a generator seeded by these

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {self.cond_drop}")
        if min(self.latent_channels, self.latent_size, self.text_dim, self.grid_samples) < 1:
            raise ValueError("latent_channels, latent_size, text_dim and grid_samples must be >= 1")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    def factors(self) -> tuple[float, float]:
        """(scaling, shift); one still unset (no manifest bound, or it records none) is the identity."""
        return (1.0 if self.scaling_factor is None else self.scaling_factor,
                0.0 if self.shift_factor is None else self.shift_factor)


@dataclass
class DiffusionSampleConfig:
    """How sample grids (and ``generate``) sample a diffusion model."""

    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = 50
    guidance: float | None = 4.0  # CFG weight; null: conditional model only
    eta: float = 0.0  # DDIM stochasticity


@dataclass
class DiffusionFamilyConfig(LatentPriorConfig):
    """The ``model:`` section of a latent diffusion prior (minus ``kind: ddpm``)."""

    objective: DDPMConfig = field(default_factory=DDPMConfig)
    sample: DiffusionSampleConfig = field(default_factory=DiffusionSampleConfig)


def latent_view(latents: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """False-colour images [B, 3, h*scale, w*scale] in [-1, 1] of latents [B, C, h, w] (first 3 channels)."""
    x = latents.detach().float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)  # [B, 3, h, w]
    x = (x / 2.5).clamp(-1, 1)  # unit-variance latents: +-2.5 sigma spans the colour range
    return x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def load_vae(path: str) -> nn.Module:
    """A KL-VAE for decoding: an export folder (``export.json``) or a diffusers ``AutoencoderKL`` folder."""
    if (Path(path) / "export.json").is_file():
        from latentpipe.training.export import load_export

        _, vae = load_export(path)
        return vae
    from latentpipe.training.models.autoencoders import load_pretrained

    return load_pretrained(path, "kl")


class LatentPriorFamily(Family, abc.ABC):
    """A text-conditioned denoiser trained on VAE latents; subclasses pick the objective and sampler."""

    data_kind = "latents"
    cfg: LatentPriorConfig
    time_scale: float  # objective time -> backbone timestep embedding input
    objective: ContinuousObjective  # set by the subclass

    def __init__(self, cfg: LatentPriorConfig) -> None:
        super().__init__(cfg)
        self._vae: nn.Module | None = None
        self._micro = (-1, 0)  # (step, loss calls at that step): micro-batches of one step differ

    def noise_generator(self, step: int, device: torch.device) -> torch.Generator:
        """The generator of one training micro-batch: a pure function of (noise_seed, step, rank, micro-batch).

        Posterior samples, times, noise and caption drops never touch the global RNG, so a resumed
        run redraws exactly what the uninterrupted run drew, whatever else consumed random numbers.
        """
        last, calls = self._micro
        micro = calls if last == step else 0
        self._micro = (step, micro + 1)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = (((self.cfg.noise_seed * 1_000_003 + step) * 65_537 + rank) * 257 + micro) % (2**63)
        return torch.Generator(device=device).manual_seed(seed)

    def objective_loss(
        self, model: nn.Module, batch: LatentBatch, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The objective on scaled latents."""
        return self.objective.loss(model, batch, generator)

    @abc.abstractmethod
    def sampler(self) -> tuple[Sampler, int, float | None]:
        """(sampler, steps, guidance) for grids and ``generate``."""

    def bind_data(self, manifest: Mapping[str, Any] | None) -> None:
        """Take ``scaling_factor``/``shift_factor`` from the latent manifest (``pipeline/encode.py``
        records the VAE's); a config value that disagrees is refused, naming both."""
        for key in ("scaling_factor", "shift_factor"):
            recorded = (manifest or {}).get(key)
            mine = getattr(self.cfg, key)
            if recorded is None:
                continue
            if mine is None:
                setattr(self.cfg, key, float(recorded))
            elif not math.isclose(float(mine), float(recorded), rel_tol=1e-6, abs_tol=1e-12):
                raise ConfigError(f"model.{key}={mine} disagrees with the latent manifest's {key} {recorded}: "
                                  f"drop the override (it defaults to the manifest's)")
        self.cfg.scaling_factor, self.cfg.shift_factor = self.cfg.factors()

    def build(self) -> dict[str, nn.Module]:
        c = self.cfg
        spec = BackboneSpec(c.latent_channels, c.latent_size, c.text_dim)
        return {"model": build_denoiser(c.backbone, spec, self.time_scale, c.null_text)}

    # -- batches ---------------------------------------------------------------------------------

    def _inputs(
        self, batch: Mapping[str, Any], device: torch.device, generator: torch.Generator | None, drop: bool
    ) -> LatentBatch:
        for key in ("latent", "text", "text_mask"):
            if key not in batch:
                raise ValueError(f"the {self.name} family needs latent shards with {key!r} (VAE latents and text)")
        c = self.cfg
        lat = batch["latent"].to(device=device, dtype=torch.float32)  # [B, 2C, h, w]
        want = (2 * c.latent_channels, c.latent_size, c.latent_size)
        if lat.ndim != 4 or tuple(lat.shape[1:]) != want:
            raise ValueError(f"latent {list(lat.shape)} does not fit model.latent_channels/latent_size "
                             f"(expected [B, {want[0]}, {want[1]}, {want[2]}]: mean and log-variance)")
        text = batch["text"].to(device=device, dtype=torch.float32)  # [B, L, D]
        if text.shape[-1] != c.text_dim:
            raise ValueError(f"text embeddings have width {text.shape[-1]}, model.text_dim is {c.text_dim}")
        mean, logvar = lat.chunk(2, dim=1)  # [B, C, h, w] each
        n = torch.randn(mean.shape, device=device, generator=generator)
        scale, shift = c.factors()
        z = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * n - shift) * scale
        b = lat.shape[0]
        dropped = torch.rand(b, device=device, generator=generator) < c.cond_drop if drop else None
        cond = TextCond.of(text, batch["text_mask"].to(device))
        if dropped is not None:
            cond = TextCond(cond.text, cond.mask, dropped)
        return LatentBatch(z, cond)

    def loss(
        self, part: str, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        if part != "model":
            raise KeyError(f"{self.name} has no part {part!r}")
        model = modules["model"]
        device = next(unwrap(model, nn.Module).parameters()).device
        g = self.noise_generator(step, device)
        loss, logs = self.objective_loss(model, self._inputs(batch, device, g, drop=True), g)
        logs.pop("loss", None)  # the engine logs the loss itself
        return loss, logs

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int) -> dict[str, float]:
        """The objective on the fixed batch with fixed noise and times, captions kept (comparable across steps)."""
        model = modules["model"]
        device = next(unwrap(model, nn.Module).parameters()).device
        g = torch.Generator(device=device).manual_seed(self.cfg.sample_seed)
        loss, logs = self.objective_loss(model, self._inputs(batch, device, g, drop=False), g)
        return {"model/loss": float(loss), **{f"model/{k}": float(v) for k, v in logs.items() if k != "loss"}}

    # -- sampling --------------------------------------------------------------------------------

    def vae(self) -> nn.Module | None:
        """The decoding VAE of ``cfg.vae`` (loaded once), or None."""
        if not self.cfg.vae:
            return None
        if self._vae is None:
            self._vae = load_vae(self.cfg.vae).eval()
        return self._vae

    @torch.no_grad()
    def generate(
        self,
        module: nn.Module,
        cond: TextCond,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        guidance: float | None | Literal["config"] = "config",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled latents [B, C, h, w] for ``cond`` and, with a VAE, images [B, 3, H, W] in [-1, 1]."""
        c = self.cfg
        device = next(unwrap(module, nn.Module).parameters()).device
        sampler, cfg_steps, cfg_guidance = self.sampler()
        shape = (len(cond), c.latent_channels, c.latent_size, c.latent_size)
        noise = torch.randn(shape, device=device, generator=generator)
        w = cfg_guidance if guidance == "config" else guidance
        z = sampler.sample(module, noise, cond.to(device), steps or cfg_steps, w, generator)
        vae = self.vae()
        if vae is None:
            return z, None
        vae.to(device)
        scale, shift = c.factors()
        images: torch.Tensor = vae.decode(z / scale + shift, return_dict=False)[0]  # type: ignore[operator]
        return z, images.clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Image.Image]:
        """Top row: the batch's data (decoded or latent view); bottom row: samples for its captions."""
        model = modules["model"]
        device = next(unwrap(model, nn.Module).parameters()).device
        n = min(self.cfg.grid_samples, int(batch["text"].shape[0]))
        g = torch.Generator(device=device).manual_seed(self.cfg.sample_seed)
        data = self._inputs({k: v[:n] for k, v in batch.items() if k in ("latent", "text", "text_mask")},
                            device, g, drop=False)
        z, images = self.generate(model, data.cond, g)
        vae = self.vae()
        if images is None or vae is None:
            return {"samples": grid([latent_view(data.x), latent_view(z)])}
        scale, shift = self.cfg.factors()
        real: torch.Tensor = vae.decode(data.x / scale + shift, return_dict=False)[0]  # type: ignore[operator]
        return {"samples": grid([real, images])}


@register
class DiffusionFamily(LatentPriorFamily):
    """DDPM (eps / v / x0 prediction) over a text-conditioned UNet or DiT."""

    name = "ddpm"
    config_class = DiffusionFamilyConfig
    cfg: DiffusionFamilyConfig
    time_scale = 1.0  # DDPM's t is already the integer step in {1..T}
    objective: DDPMObjective

    def __init__(self, cfg: DiffusionFamilyConfig) -> None:
        super().__init__(cfg)
        self.objective = DDPMObjective(cfg.objective)

    def sampler(self) -> tuple[Sampler, int, float | None]:
        s = self.cfg.sample
        return diffusion_sampler(s.sampler, self.objective.schedule, s.eta), s.steps, s.guidance


__all__ = [
    "DiffusionFamily",
    "DiffusionFamilyConfig",
    "DiffusionSampleConfig",
    "LatentPriorConfig",
    "LatentPriorFamily",
    "latent_view",
    "load_vae",
]
