"""Autoencoder objective terms against hand-computed values on small tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer
from safetensors.torch import save_file
from torch import nn

from latentpipe.training.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from latentpipe.training.objectives.autoencoder import (
    LPIPS,
    AutoencoderLossConfig,
    adaptive_weight,
    code_histogram,
    codebook_stats,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
    kl_divergence,
    kl_vae_loss,
    kmeans,
    psnr,
    quantize,
    reconstruction_loss,
    restart_dead_codes,
    vqgan_loss,
)


def test_reconstruction_losses_by_hand() -> None:
    x = torch.zeros(1, 1, 1, 2)
    rec = torch.tensor([0.5, -1.5]).view(1, 1, 1, 2)
    assert reconstruction_loss(x, rec, "l1").item() == pytest.approx((0.5 + 1.5) / 2)
    assert reconstruction_loss(x, rec, "l2").item() == pytest.approx((0.25 + 2.25) / 2)
    with pytest.raises(ValueError, match="rec_loss"):
        reconstruction_loss(x, rec, "l3")


def test_psnr_by_hand() -> None:
    x = torch.zeros(2, 3, 4, 4)
    rec = torch.full_like(x, 0.2)  # error 0.1 on the [0, 1] scale -> mse 0.01 -> 20 dB
    rec[1] = 2.0  # clipped to 1 -> error 0.5 -> mse 0.25 -> 10 log10(4) dB
    out = psnr(x, rec)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4)
    assert out[1].item() == pytest.approx(10 * math.log10(4.0), abs=1e-4)


def test_kl_divergence_by_hand() -> None:
    mean = torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1)
    logvar = torch.tensor([[0.0, math.log(2.0)]]).view(1, 2, 1, 1)
    # 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - log 2), summed over the latent, mean over batch
    expected = 0.5 + 0.5 * (1 - math.log(2.0))
    assert kl_divergence(mean, logvar).item() == pytest.approx(expected)
    assert kl_divergence(torch.cat([mean, mean]), torch.cat([logvar, logvar])).item() == pytest.approx(expected)
    assert kl_divergence(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)).item() == 0.0


def _toy_codes() -> tuple[torch.Tensor, torch.Tensor]:
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    z = torch.tensor([[0.1, -0.2], [2.5, 0.5], [0.9, 1.4]]).T.reshape(1, 2, 1, 3)  # [B=1, D=2, h=1, w=3]
    return z, codebook


def test_quantize_indices_values_and_terms() -> None:
    z, codebook = _toy_codes()
    q = quantize(z, codebook)
    assert q.indices.tolist() == [[[0, 2, 1]]]
    assert torch.allclose(q.z_q, codebook[[0, 2, 1]].T.reshape(1, 2, 1, 3))
    # squared distances to the chosen codes: 0.05, 0.5, 0.17 over 6 elements
    expected = (0.01 + 0.04 + 0.25 + 0.25 + 0.01 + 0.16) / 6
    assert q.codebook_loss.item() == pytest.approx(expected)
    assert q.commitment_loss.item() == pytest.approx(expected)


def test_codebook_lookup_returns_valid_nearest_indices() -> None:
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(37, 5, generator=g)
    z = torch.randn(4, 5, 3, 6, generator=g)
    q = quantize(z, codebook)
    assert q.indices.shape == (4, 3, 6) and q.indices.dtype == torch.int64
    assert int(q.indices.min()) >= 0 and int(q.indices.max()) < 37
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(q.indices.flatten(), brute)


def test_straight_through_estimator_passes_gradients() -> None:
    z, codebook = _toy_codes()
    z = z.clone().requires_grad_(True)
    codebook = codebook.clone().requires_grad_(True)
    q = quantize(z, codebook)
    weights = torch.arange(6.0).view(1, 2, 1, 3)
    (q.z_q * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # identity gradient through the quantizer
    assert codebook.grad is None or torch.count_nonzero(codebook.grad) == 0


def test_stop_gradients_of_codebook_and_commitment_terms() -> None:
    z, codebook = _toy_codes()
    z = z.clone().requires_grad_(True)
    codebook = codebook.clone().requires_grad_(True)
    q = quantize(z, codebook)
    g_z, g_cb = torch.autograd.grad(q.codebook_loss, [z, codebook], allow_unused=True)
    assert g_z is None or torch.count_nonzero(g_z) == 0  # the codebook term moves only the codes
    assert torch.count_nonzero(g_cb) > 0
    q = quantize(z, codebook)
    g_z, g_cb = torch.autograd.grad(q.commitment_loss, [z, codebook], allow_unused=True)
    assert torch.count_nonzero(g_z) > 0  # the commitment term moves only the encoder
    assert g_cb is None or torch.count_nonzero(g_cb) == 0


def test_vq_terms_match_diffusers_non_legacy_and_document_the_legacy_swap() -> None:
    """Our beta sits on the commitment term: diffusers' legacy=False; legacy=True swaps it onto the codes."""
    beta = 0.25
    z0, _ = _toy_codes()
    vq = VectorQuantizer(3, 2, beta=beta, legacy=False)
    with torch.no_grad():
        vq.embedding.weight.copy_(_toy_codes()[1])
    z = z0.clone().requires_grad_(True)
    _, ref_loss, _ = vq(z)
    ref = torch.autograd.grad(ref_loss, [z, vq.embedding.weight])
    z2 = z0.clone().requires_grad_(True)
    cb = _toy_codes()[1].requires_grad_(True)
    q = quantize(z2, cb)
    ours = q.codebook_loss + beta * q.commitment_loss
    got = torch.autograd.grad(ours, [z2, cb])
    assert ours.item() == pytest.approx(ref_loss.item())
    assert torch.allclose(got[0], ref[0]) and torch.allclose(got[1], ref[1])
    legacy = VectorQuantizer(3, 2, beta=beta, legacy=True)
    with torch.no_grad():
        legacy.embedding.weight.copy_(_toy_codes()[1])
    z3 = z0.clone().requires_grad_(True)
    _, leg_loss, _ = legacy(z3)
    g_leg = torch.autograd.grad(leg_loss, [z3])[0]
    assert torch.allclose(g_leg, got[0] / beta)  # legacy: commitment weight 1, codebook weight beta


def test_codebook_stats_by_hand() -> None:
    counts = code_histogram(torch.tensor([0, 0, 1, 1]), 4)
    assert counts.tolist() == [2.0, 2.0, 0.0, 0.0]
    usage, perplexity = codebook_stats(counts)
    assert usage == pytest.approx(0.5) and perplexity == pytest.approx(2.0)
    assert codebook_stats(code_histogram(torch.arange(8), 8)) == pytest.approx((1.0, 8.0))


def test_hinge_losses_by_hand() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1.5)=1.5 -> 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    loss, logs = discriminator_loss(real, fake)
    assert loss.item() == pytest.approx(0.5) and logs["logits_fake"] == pytest.approx(-0.75)


def test_adaptive_weight_is_the_ratio_of_gradient_norms() -> None:
    w = torch.tensor([2.0, -1.0], requires_grad=True)
    rec = (3.0 * w).sum()  # grad [3, 3], norm 3 sqrt 2
    g = (w**2).sum()  # grad 2w = [4, -2], norm sqrt 20
    lam = adaptive_weight(rec, g, w)
    assert lam.item() == pytest.approx(3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    assert adaptive_weight(rec * 1e9, g, w, max_weight=10.0).item() == 10.0


class _Linear(nn.Module):
    """A 'discriminator' with known output: D(x) = mean(x) * 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x.mean(dim=(1, 2, 3))


def test_generator_loss_adversarial_term_starts_at_disc_start() -> None:
    cfg = AutoencoderLossConfig(disc_weight=0.5, disc_start=10)
    last = torch.tensor([1.5], requires_grad=True)
    x = torch.zeros(1, 1, 1, 2)
    rec = last * torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)  # the "decoder's last layer" is a scale
    reg = torch.tensor(0.125)
    before, logs = generator_loss(x, rec, reg, cfg, 9, disc=_Linear(), last_layer=last)
    assert before.item() == pytest.approx((1.5 + 4.5) / 2 + 0.125) and "g_loss" not in logs
    after, logs = generator_loss(x, rec, reg, cfg, 10, disc=_Linear(), last_layer=last)
    # rec term = last * 2 -> grad 2; g = -2 * mean(rec) = -4 last -> grad -4: lambda = 0.5 * 2 / 4
    lam = 0.5 * 2.0 / (4.0 + 1e-4)
    g = -2 * (1.5 * 4 / 2)
    assert logs["adv_weight"] == pytest.approx(lam, rel=1e-6)
    assert after.item() == pytest.approx(3.0 + 0.125 + lam * g, rel=1e-6)


def test_kl_vae_and_vqgan_totals_by_hand() -> None:
    cfg = AutoencoderLossConfig(kl_weight=0.5, codebook_weight=2.0, commitment_beta=0.25)
    x = torch.zeros(1, 3, 2, 2)
    rec = torch.full_like(x, 0.5)
    mean, logvar = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)  # KL = 0.5
    loss, logs = kl_vae_loss(x, rec, mean, logvar, cfg, 0)
    assert logs["kl"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.5 + 0.5 * 0.5 / 12)  # KL weighted per pixel element (P = 12)
    z, codebook = _toy_codes()
    q = quantize(z, codebook)
    loss, logs = vqgan_loss(x, rec, q, cfg, 0)
    d = q.codebook_loss.item()
    assert loss.item() == pytest.approx(0.5 + 2.0 * (d + 0.25 * d))


def test_loss_config_checks() -> None:
    with pytest.raises(ValueError, match="lpips_weights"):
        AutoencoderLossConfig(perceptual_weight=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        AutoencoderLossConfig(kl_weight=-1.0)
    assert not AutoencoderLossConfig().adversarial(10**6)  # disc_weight 0: no adversary at all
    assert AutoencoderLossConfig(disc_weight=1.0, disc_start=5).adversarial(5)


def test_kmeans_recovers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(x, 3, iters=20, generator=torch.Generator().manual_seed(1))
    dist = torch.cdist(centres, found).min(dim=1).values
    assert float(dist.max()) < 0.2


def test_restart_replaces_only_dead_codes() -> None:
    codebook = torch.arange(8.0).view(4, 2)
    usage = torch.tensor([5.0, 0.0, 2.0, 0.0])
    cand = torch.full((3, 2), -7.0)
    new, dead = restart_dead_codes(codebook, usage, cand, threshold=1.0)
    assert dead.tolist() == [False, True, False, True]
    assert torch.equal(new[~dead], codebook[~dead])
    assert torch.equal(new[dead], torch.full((2, 2), -7.0))


def test_patch_discriminator_shape() -> None:
    d = PatchDiscriminator(DiscriminatorConfig(channels=8, n_layers=2))
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError):
        DiscriminatorConfig(n_layers=0)


def test_lpips_from_local_weights(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    cfg = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512]
    state, c_in, idx = {}, 3, 0
    for v in cfg:
        if v == 0:
            idx += 1
            continue
        state[f"features.{idx}.weight"] = 0.05 * torch.randn(v, c_in, 3, 3, generator=g)
        state[f"features.{idx}.bias"] = torch.zeros(v)
        c_in, idx = v, idx + 2
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.weight"] = torch.rand(1, c, 1, 1, generator=g)
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(state, str(path))
    lp = LPIPS(path)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(lp(x, x), torch.zeros(2))
    d = lp(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LPIPS(tmp_path / "missing.safetensors")
