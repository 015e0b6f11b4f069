"""Stage-1 autoencoder families for the trainer: ``kl_vae`` (AutoencoderKL) and ``vqgan`` (VQModel).

Two parts when the adversary is on (``Family.parts`` in ``training/families/base.py``): ``"model"`` (the autoencoder, primary:
EMA, export) and ``"disc"`` (a PatchGAN), each with its own DeepSpeed engine and optimizer;
``parts(step)`` adds ``"disc"`` from ``loss.disc_start`` on. The generator objective runs inside
the model engine's forward (``ObjectiveForward``) because the adaptive adversarial weight takes
gradients at the decoder's last layer before DeepSpeed hooks the outputs. The generator step calls
the bare discriminator with its parameters frozen; the discriminator step sees only detached
reconstructions, so neither part's gradients reach the other's step.

VQ codebook upkeep (documented tricks, both optional): k-means initialisation of the codebook on
the first batch's encoder outputs (step 0), and dead-code restart: a code unused for
``restart_every`` steps (counts summed over ranks) is re-seeded with a random encoder output
(Jukebox; SoundStream). Rank 0 draws the new values and broadcasts them, and they are written into
DeepSpeed's fp32 master copy as well as the module, with the code's Adam moments zeroed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from latentpipe.preprocessing.pixels import grid
from latentpipe.training.families import register
from latentpipe.training.families.base import Family, unwrap
from latentpipe.training.models.autoencoders import (
    Autoencoder,
    AutoencoderArchConfig,
    Kind,
    build_autoencoder,
    vq_codes,
    vq_decode_latents,
    vq_indices,
)
from latentpipe.training.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from latentpipe.training.objectives.autoencoder import (
    LPIPS,
    AutoencoderLossConfig,
    code_histogram,
    codebook_stats,
    discriminator_loss,
    kl_divergence,
    kl_vae_loss,
    kmeans,
    psnr,
    quantize,
    restart_dead_codes,
    vqgan_loss,
)

Tensor = torch.Tensor


@dataclass
class CodebookConfig:
    """VQ codebook upkeep: k-means init at step 0 and dead-code restart."""

    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_every: int = 0  # steps per usage window; 0 disables restarts
    restart_until: int | None = None  # last step at which codes may be restarted (None: always)


@dataclass
class KLVAEConfig:
    """``model:`` section of ``kind: kl_vae``."""

    arch: AutoencoderArchConfig = field(default_factory=AutoencoderArchConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    scaling_decay: float = 0.99  # EMA over batches of the latent moments behind the scaling factor


@dataclass
class VQGANConfig:
    """``model:`` section of ``kind: vqgan``."""

    arch: AutoencoderArchConfig = field(default_factory=AutoencoderArchConfig)
    loss: AutoencoderLossConfig = field(default_factory=lambda: AutoencoderLossConfig(disc_weight=0.1))
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    scaling_decay: float = 0.99


def _images(batch: Mapping[str, Any], like: nn.Module) -> Tensor:
    p = next(like.parameters())
    return batch["image"].to(device=p.device, dtype=p.dtype)  # [B,3,H,W] in [-1,1]


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def recon_grid(x: Tensor, rec: Tensor, n: int = 8) -> Image.Image:
    """Top row: up to ``n`` inputs; bottom row: their reconstructions ([B,3,H,W] in [-1,1])."""
    return grid([x, rec], n)


class _AutoencoderFamily(Family):
    """Shared parts of ``kl_vae`` and ``vqgan``; subclasses set ``kind`` and the forward objective."""

    kind: Kind
    cfg: Any

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._rec_cache: tuple[int, Tensor] | None = None
        self._lpips: LPIPS | None = None
        self._moments: Tensor | None = None  # EMA of (mean, mean of squares) of the latents

    # --- modules -----------------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"model": self.build_primary()}
        if self.cfg.loss.disc_weight > 0:
            parts["disc"] = PatchDiscriminator(self.cfg.disc)
        return parts

    def build_primary(self) -> nn.Module:
        model: nn.Module = build_autoencoder(self.cfg.arch, self.kind)
        return model

    def parts(self, step: int) -> list[str]:
        return ["model", "disc"] if self.cfg.loss.adversarial(step) else ["model"]

    def _perceptual(self, device: torch.device) -> LPIPS | None:
        if self.cfg.loss.perceptual_weight <= 0:
            return None
        if self._lpips is None:
            self._lpips = LPIPS(self.cfg.loss.lpips_weights).to(device)
        return self._lpips

    # --- losses ------------------------------------------------------------------------------------
    def loss(self, part: str, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int
             ) -> tuple[Tensor, dict[str, float | Tensor]]:
        model = modules["model"]
        x = _images(batch, model)
        if part == "model":
            disc = unwrap(modules["disc"], nn.Module) if "disc" in modules and self.cfg.loss.adversarial(step) else None
            self._before_step(unwrap(model, nn.Module), x, step, getattr(model, "optimizer", None))
            objective = partial(self._objective, step=step, disc=disc, lpips=self._perceptual(x.device))
            if disc is not None:
                disc.requires_grad_(False)  # the generator step puts no gradient into the discriminator
            try:
                loss, logs, rec, latents = model(x, objective=objective)
            finally:
                if disc is not None:
                    disc.requires_grad_(True)
            self._rec_cache = (step, rec.detach())
            self._track_scale(unwrap(model, nn.Module), latents.detach())
            return loss, logs
        if part == "disc":
            if self._rec_cache is not None and self._rec_cache[0] == step:
                rec = self._rec_cache[1]
            else:  # the disc steps without a generator step just before (not in the usual schedule)
                with torch.no_grad():
                    rec = model(x, objective=_deterministic)[0]
            d_in = torch.cat([x, rec.detach().to(x.dtype)])  # [2B,3,H,W]: one pass, GroupNorm is per sample
            logits = modules["disc"](d_in)  # [2B,1,h',w']
            n = x.shape[0]
            return discriminator_loss(logits[:n], logits[n:])
        raise KeyError(f"{self.name} has no part {part!r}")

    def _objective(self, ae: Autoencoder, x: Tensor, *, step: int, disc: nn.Module | None,
                   lpips: nn.Module | None) -> tuple[Tensor, dict[str, float | Tensor], Tensor, Tensor]:
        """Runs inside the model's forward: (loss, logs, reconstruction, latents for the scaling factor)."""
        raise NotImplementedError

    def _before_step(self, ae: Autoencoder, x: Tensor, step: int, optimizer: Any) -> None:
        """Hook for codebook upkeep before the generator forward (``optimizer``: the engine's, or None)."""

    def _track_scale(self, ae: Autoencoder, latents: Tensor) -> None:
        """Running latent std -> ``scaling_factor`` in the diffusers config and in ``cfg.arch``."""
        z = latents.double()
        m = torch.stack([z.mean(), (z * z).mean()]).cpu()
        d = self.cfg.scaling_decay
        self._moments = m if self._moments is None else d * self._moments + (1 - d) * m
        var = float(self._moments[1] - self._moments[0] ** 2)
        if var > 0:
            sf = 1.0 / var**0.5
            ae.register_to_config(scaling_factor=sf)
            self.cfg.arch.scaling_factor = sf

    # --- evaluation and grids ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int) -> dict[str, float]:
        model = modules["model"]
        x = _images(batch, model)
        out = model(x, objective=_deterministic)
        rec, extra = out[0], out[1]
        logs = {"model/psnr": float(psnr(x, rec).mean()), "model/rec_l1": float((x - rec).abs().mean())}
        logs.update({f"model/{k}": v for k, v in extra.items()})
        return logs

    @torch.no_grad()
    def log_images(self, modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Image.Image]:
        model = modules["model"]
        x = _images(batch, model)
        rec = model(x, objective=_deterministic)[0]
        return {"reconstructions": recon_grid(x, rec)}


def _deterministic(ae: Autoencoder, x: Tensor) -> tuple[Tensor, dict[str, float | Tensor]]:
    """Posterior-mean (KL) or nearest-code (VQ) reconstruction [B,3,H,W] plus latent metrics."""
    enc = ae.encode(x)
    if hasattr(enc, "latent_dist"):
        post = enc.latent_dist
        return ae.decode(post.mean).sample, {"kl": float(kl_divergence(post.mean, post.logvar))}
    idx = vq_indices(ae, enc.latents)  # [B,h,w]
    usage, perplexity = codebook_stats(code_histogram(idx, ae.quantize.n_e))
    return vq_decode_latents(ae, vq_codes(ae, idx)), {"codebook_usage": usage, "perplexity": perplexity}


@register
class KLVAEFamily(_AutoencoderFamily):
    """KL-regularised autoencoder (LDM's ``AutoencoderKL``), optional PatchGAN adversary."""

    name = "kl_vae"
    data_kind = "images"
    config_class = KLVAEConfig
    kind: Kind = "kl"
    cfg: KLVAEConfig

    def _objective(self, ae: Autoencoder, x: Tensor, *, step: int, disc: nn.Module | None,
                   lpips: nn.Module | None) -> tuple[Tensor, dict[str, float | Tensor], Tensor, Tensor]:
        post = ae.encode(x).latent_dist
        z = post.sample()  # [B,C,h,w], reparameterised
        rec = ae.decode(z).sample  # [B,3,H,W]
        loss, logs = kl_vae_loss(x, rec, post.mean, post.logvar, self.cfg.loss, step, disc=disc,
                                 last_layer=ae.decoder.conv_out.weight, lpips=lpips)
        return loss, logs, rec, z


@register
class VQGANFamily(_AutoencoderFamily):
    """VQGAN (Esser et al. 2021) on diffusers ``VQModel`` with our codebook/commitment terms."""

    name = "vqgan"
    data_kind = "images"
    config_class = VQGANConfig
    kind: Kind = "vq"
    cfg: VQGANConfig

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__(cfg)
        self._counts: Tensor | None = None  # code hits in the current restart window (all ranks)
        self._window_start: int | None = None
        self._restarted = 0

    def _objective(self, ae: Autoencoder, x: Tensor, *, step: int, disc: nn.Module | None,
                   lpips: nn.Module | None) -> tuple[Tensor, dict[str, float | Tensor], Tensor, Tensor]:
        h = ae.encode(x).latents  # [B,D,h,w]
        q = quantize(h, ae.quantize.embedding.weight)
        rec = vq_decode_latents(ae, q.z_q)  # [B,3,H,W]
        loss, logs = vqgan_loss(x, rec, q, self.cfg.loss, step, disc=disc,
                                last_layer=ae.decoder.conv_out.weight, lpips=lpips)
        counts = code_histogram(q.indices, ae.quantize.n_e)
        usage, perplexity = codebook_stats(counts)
        logs.update(codebook_usage=usage, perplexity=perplexity, codes_restarted=float(self._restarted))
        self._count(counts)
        return loss, logs, rec, q.z_q

    def _count(self, counts: Tensor) -> None:
        if self.cfg.codebook.restart_every <= 0:
            return
        if _dist():
            counts = counts.clone()
            dist.all_reduce(counts)
        self._counts = counts if self._counts is None else self._counts + counts

    def _before_step(self, ae: Autoencoder, x: Tensor, step: int, optimizer: Any) -> None:
        cb = self.cfg.codebook
        init = cb.kmeans_init and step == 0
        window = self._window_start
        restart = (cb.restart_every > 0 and window is not None and step - window >= cb.restart_every
                   and (cb.restart_until is None or step <= cb.restart_until))
        if self._window_start is None or restart:
            self._window_start = step
        if not (init or restart):
            return
        weight = ae.quantize.embedding.weight
        with torch.no_grad():
            h = ae.encode(x).latents  # [B,D,h,w]
            cand = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()  # [B*h*w, D]
            gen = torch.Generator(device=cand.device).manual_seed(step)
            if init:
                new = kmeans(cand, weight.shape[0], cb.kmeans_iters, gen)
                rows = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            else:
                assert self._counts is not None
                new, rows = restart_dead_codes(weight, self._counts.to(weight.device), cand, 1.0, gen)
            if _dist():  # every rank takes rank 0's values
                dist.broadcast(new, 0)
                dist.broadcast(rows, 0)
        n = int(rows.sum())
        if restart:
            self._restarted = n
            self._counts = None
        if n:
            # at step 0 (k-means init) no optimizer state exists yet: only restarts reset moments
            _assign_rows(weight, new.to(weight.dtype), rows, optimizer if restart else None)


def _assign_rows(param: nn.Parameter, value: Tensor, rows: Tensor, optimizer: Any) -> None:
    """Set ``param`` [K,D] to ``value`` (only ``rows`` differ); with an ``optimizer``, zero those rows' Adam moments.

    Written into the module and, under ZeRO 1-3, into DeepSpeed's fp32 master copy (deepspeed.utils
    ``safe_set_full_*``, collective: every rank calls it), which would otherwise overwrite the module at
    the next step. Without ZeRO the torch optimizer's state is edited directly.
    """
    with torch.no_grad():
        param.data.copy_(value)
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        from deepspeed.utils import (
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        safe_set_full_fp32_param(param, value.float())
        if optimizer is None:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(param, key)
            if state is not None:
                state = state.clone()
                state[rows.to(state.device)] = 0
                safe_set_full_optimizer_state(param, state, key)
        return
    state = getattr(optimizer, "state", None)
    if isinstance(state, Mapping) and param in state:
        for key in ("exp_avg", "exp_avg_sq"):
            buf = state[param].get(key)
            if isinstance(buf, Tensor) and buf.shape == param.shape:
                buf[rows.to(buf.device)] = 0


__all__ = ["CodebookConfig", "KLVAEConfig", "KLVAEFamily", "VQGANConfig", "VQGANFamily", "recon_grid"]
