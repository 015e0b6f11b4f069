"""Stage-1 autoencoder objectives: KL-VAE and VQGAN losses with a PatchGAN hinge adversary.

KL-VAE (Rombach et al. 2022, App. G; Kingma & Welling 2014)::

    L = rec(x, x_hat) [+ w_p * LPIPS] + kl_weight * KL(q(z|x) || N(0, I)) / P  [+ lambda * L_G]

VQGAN (Esser et al. 2021, eq. 4-6; van den Oord et al. 2017, eq. 3)::

    L = rec + w_c * (||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2) [+ lambda * L_G]

``rec`` is the per-element L1 or L2 error and ``P = 3 * H * W``: the whole loss is LDM's
per-image sum divided by ``P``, so ``kl_weight`` keeps LDM's meaning (1e-6) while the loss scale
does not grow with the image. The hinge adversary: ``L_D = (relu(1 - D(x)) + relu(1 + D(x_hat))) / 2``,
``L_G = -D(x_hat)``, and ``lambda = disc_weight * ||grad L_rec|| / ||grad L_G||`` at the decoder's
last layer (Esser et al. eq. 7), zero before ``disc_start``.

Codebook note: diffusers' ``VectorQuantizer`` defaults to ``legacy=True``, which returns
``||sg[e] - z||^2 + beta * ||e - sg[z]||^2``: beta lands on the *codebook* term, the swap the original
VQGAN code carried. We do not use its loss; ``quantize`` below computes both stop-gradient terms with
beta on the commitment term as in the VQ-VAE paper, using the same nearest-code rule (argmin L2), so
a diffusers ``VQModel`` picks the same codes at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentpipe.training.models.autoencoders import nearest_code

Tensor = torch.Tensor


@dataclass
class AutoencoderLossConfig:
    """Loss weights for both families (KL terms ignored by VQ and vice versa)."""

    rec_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6  # beta, LDM scale (relative to the per-image summed reconstruction error)
    codebook_weight: float = 1.0
    commitment_beta: float = 0.25
    perceptual_weight: float = 0.0  # LPIPS; needs lpips_weights
    lpips_weights: str | None = None  # local safetensors (see LPIPS); never downloaded
    disc_weight: float = 0.0  # 0 disables the adversary (and its optimizer)
    disc_start: int = 0  # global step at which the discriminator starts training and is used
    adaptive_weight_max: float = 1e4

    def __post_init__(self) -> None:
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ValueError("perceptual_weight > 0 needs lpips_weights (a local LPIPS safetensors file)")
        if min(self.kl_weight, self.codebook_weight, self.commitment_beta, self.disc_weight) < 0:
            raise ValueError("loss weights must be >= 0")

    def adversarial(self, step: int) -> bool:
        """Whether the discriminator is trained and used at ``step``."""
        return self.disc_weight > 0 and step >= self.disc_start


def _f(t: Tensor) -> Tensor:
    """A detached scalar for logs (read on the host only at the trainer's log points)."""
    return t.detach().float()


# --- reconstruction and metrics --------------------------------------------------------------------


def reconstruction_loss(x: Tensor, rec: Tensor, kind: str = "l1") -> Tensor:
    """Mean per-element L1 or squared L2 error between ``x`` and ``rec`` [B,C,H,W]."""
    if kind == "l1":
        return (x - rec).abs().mean()
    if kind == "l2":
        return ((x - rec) ** 2).mean()
    raise ValueError(f"rec_loss must be 'l1' or 'l2', got {kind!r}")


def psnr(x: Tensor, rec: Tensor) -> Tensor:
    """Per-image PSNR in dB [B] for images in [-1, 1] (peak 1 after mapping to [0, 1]; ``rec`` clipped)."""
    mse01 = (((x - rec.clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse01.clamp_min(1e-10))


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats per sample, summed over [C,h,w] and averaged over B."""
    kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


# --- vector quantization ---------------------------------------------------------------------------


@dataclass
class Quantized:
    """Output of ``quantize``: straight-through latents, indices and the two stop-gradient terms."""

    z_q: Tensor  # [B,D,h,w], forward value = codes, gradient flows to z_e unchanged
    indices: Tensor  # int64 [B,h,w]
    codebook_loss: Tensor  # ||sg[z_e] - e||^2, moves the codes
    commitment_loss: Tensor  # ||z_e - sg[e]||^2, moves the encoder


def quantize(z_e: Tensor, codebook: Tensor) -> Quantized:
    """Nearest-code quantization of ``z_e`` [B,D,h,w] against ``codebook`` [K,D] (van den Oord et al. 2017)."""
    b, d, h, w = z_e.shape
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
    with torch.no_grad():
        idx = nearest_code(flat, codebook)  # [B*h*w]
    e = codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2)  # [B,D,h,w]
    codebook_loss = F.mse_loss(e, z_e.detach())
    commitment_loss = F.mse_loss(z_e, e.detach())
    z_q = z_e + (e - z_e).detach()  # straight-through estimator
    return Quantized(z_q, idx.view(b, h, w), codebook_loss, commitment_loss)


def code_histogram(indices: Tensor, num_codes: int) -> Tensor:
    """Counts per code [K] (float) of ``indices`` of any shape."""
    return torch.bincount(indices.flatten(), minlength=num_codes).float()


def codebook_stats(counts: Tensor) -> tuple[float, float]:
    """(fraction of codes used, perplexity = exp(entropy of the code distribution)) from counts [K]."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


def kmeans(x: Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """Lloyd's k-means of ``x`` [N,D] -> centres [k,D]; empty clusters take a random point."""
    n = x.shape[0]
    centres = x[torch.randint(n, (k,), generator=generator, device=x.device)].clone()
    for _ in range(iters):
        assign = nearest_code(x, centres)  # [N]
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centres = sums / counts.clamp_min(1)[:, None]
        refill = x[torch.randint(n, (int(empty.sum()),), generator=generator, device=x.device)]
        centres[empty] = refill
    return centres


def restart_dead_codes(codebook: Tensor, usage: Tensor, candidates: Tensor, threshold: float,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace codes whose (running) usage is below ``threshold`` with random encoder outputs.

    Dead-code restart (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream).
    Args:
        codebook: [K,D]; usage: [K] running counts; candidates: encoder outputs [N,D].
    Returns:
        (new codebook [K,D], dead mask [K] bool).
    """
    dead = usage < threshold
    new = codebook.detach().clone()
    n_dead = int(dead.sum())
    if n_dead:
        pick = torch.randint(candidates.shape[0], (n_dead,), generator=generator, device=candidates.device)
        new[dead] = candidates[pick].to(new.dtype)
    return new, dead


# --- adversarial terms -----------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``(E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss ``-E[D(x_hat)]``."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """``||d rec / d W|| / (||d g / d W|| + 1e-4)`` at the decoder's last weight ``W``, clamped, detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# --- whole losses ----------------------------------------------------------------------------------


def generator_loss(x: Tensor, rec: Tensor, regulariser: Tensor, cfg: AutoencoderLossConfig, step: int, *,
                   disc: nn.Module | None = None, last_layer: Tensor | None = None,
                   lpips: nn.Module | None = None) -> tuple[Tensor, dict[str, float | Tensor]]:
    """Reconstruction (+ LPIPS) + ``regulariser`` (+ adaptive-weight hinge generator term from ``step`` on).

    Args:
        x, rec: images and reconstructions [B,3,H,W] in [-1,1].
        regulariser: already weighted KL or VQ term (scalar).
        disc: the discriminator with its parameters frozen by the caller (no gradients into it).
        last_layer: the decoder's last weight, for the adaptive weight.
    """
    rec_term = reconstruction_loss(x, rec, cfg.rec_loss)
    logs: dict[str, float | Tensor] = {"rec_l1": _f((x - rec).abs().mean()), "psnr": _f(psnr(x, rec.detach()).mean())}
    if lpips is not None and cfg.perceptual_weight > 0:
        p = lpips(x, rec).mean()
        rec_term = rec_term + cfg.perceptual_weight * p
        logs["lpips"] = _f(p)
    loss = rec_term + regulariser
    if disc is not None and cfg.adversarial(step):
        g = hinge_g_loss(disc(rec))
        if last_layer is None:
            raise ValueError("the adaptive adversarial weight needs the decoder's last layer")
        lam = cfg.disc_weight * adaptive_weight(rec_term, g, last_layer, cfg.adaptive_weight_max)
        loss = loss + lam * g
        logs.update(g_loss=_f(g), adv_weight=_f(lam) if isinstance(lam, Tensor) else float(lam))
    logs["loss"] = _f(loss)
    return loss, logs


def kl_vae_loss(x: Tensor, rec: Tensor, mean: Tensor, logvar: Tensor, cfg: AutoencoderLossConfig, step: int, *,
                disc: nn.Module | None = None, last_layer: Tensor | None = None,
                lpips: nn.Module | None = None) -> tuple[Tensor, dict[str, float | Tensor]]:
    """KL-VAE generator loss; ``mean``, ``logvar`` [B,C,h,w] of the posterior. Keywords: see generator_loss."""
    kl = kl_divergence(mean, logvar)
    pixels = x[0].numel()
    loss, logs = generator_loss(x, rec, cfg.kl_weight * kl / pixels, cfg, step, disc=disc, last_layer=last_layer,
                                lpips=lpips)
    logs["kl"] = _f(kl)
    return loss, logs


def vqgan_loss(x: Tensor, rec: Tensor, q: Quantized, cfg: AutoencoderLossConfig, step: int, *,
               disc: nn.Module | None = None, last_layer: Tensor | None = None,
               lpips: nn.Module | None = None) -> tuple[Tensor, dict[str, float | Tensor]]:
    """VQGAN generator loss; ``q`` from ``quantize``. Keywords: see generator_loss."""
    vq = cfg.codebook_weight * (q.codebook_loss + cfg.commitment_beta * q.commitment_loss)
    loss, logs = generator_loss(x, rec, vq, cfg, step, disc=disc, last_layer=last_layer, lpips=lpips)
    logs.update(codebook_loss=_f(q.codebook_loss), commitment_loss=_f(q.commitment_loss))
    return loss, logs


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> tuple[Tensor, dict[str, float | Tensor]]:
    """Hinge loss from the discriminator's logits on real images and on detached reconstructions."""
    loss = hinge_d_loss(logits_real, logits_fake)
    return loss, {"d_loss": _f(loss), "logits_real": _f(logits_real.mean()),
                  "logits_fake": _f(logits_fake.mean())}


# --- LPIPS (Zhang et al. 2018), only from local weights --------------------------------------------

_VGG16 = (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512)  # 0: 2x2 max-pool
_TAPS = (3, 8, 15, 22, 29)  # torchvision vgg16.features indices of relu1_2 .. relu5_3


class LPIPS(nn.Module):
    """LPIPS-VGG distance [B] between images [B,3,H,W] in [-1,1], frozen.

    Weights come from one local safetensors file holding torchvision's ``vgg16.features.*`` as
    ``features.{i}.weight|bias`` and the LPIPS v0.1 heads as ``lin{k}.weight`` [1,C,1,1]; it is
    made offline from torchvision's VGG16 and the ``lpips`` package's ``vgg.pth``. Never downloaded.
    """

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from safetensors.torch import load_file

        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found: {path} (they are never downloaded)")
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == 0:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        state = load_file(str(path))
        state = {(f"lins.{k[3]}.weight" if k.startswith("lin") else k): v for k, v in state.items()}
        self.load_state_dict(state, strict=True)
        self.shift: Tensor
        self.scale: Tensor
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _feats(self, x: Tensor) -> list[Tensor]:
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))  # unit-normalise channels
            if i == _TAPS[-1]:
                break
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance per image [B] (0 for identical inputs)."""
        d = 0.0
        for lin, a, b in zip(self.lins, self._feats(x), self._feats(y), strict=True):
            d = d + lin((a - b) ** 2).mean(dim=(1, 2, 3))
        assert isinstance(d, Tensor)
        return d
