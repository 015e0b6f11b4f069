"""Autoencoder builders, diffusers round trips, token paths, scaling factor, and the two families' parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from latentpipe.preprocessing.config import from_dict
from latentpipe.training.families import get_family
from latentpipe.training.families.autoencoder import KLVAEConfig, VQGANConfig, recon_grid
from latentpipe.training.models.autoencoders import (
    PRESETS,
    AutoencoderArchConfig,
    build_autoencoder,
    compute_scaling_factor,
    diffusers_config,
    downsampling_factor,
    latent_sample,
    load_pretrained,
    reconstruct,
    vq_decode_tokens,
    vq_encode_tokens,
)

TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4}  # demo layout (factor 4), fewer channels


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tiny(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kind = "kl" if preset.startswith("kl") else "vq"
    return build_autoencoder(AutoencoderArchConfig(preset=preset, **TINY), kind).eval()


def test_demo_presets_have_factor_4_and_the_brief_sizes() -> None:
    kl = build_autoencoder(AutoencoderArchConfig(preset="kl_demo"), "kl").eval()
    assert isinstance(kl, AutoencoderKL) and downsampling_factor(kl) == 4
    assert kl.encode(_images()).latent_dist.mean.shape == (2, 4, 8, 8)
    vq = build_autoencoder(AutoencoderArchConfig(preset="vq_demo"), "vq").eval()
    assert isinstance(vq, VQModel) and vq.quantize.n_e == 512
    tokens = vq_encode_tokens(vq, _images())
    assert tokens.shape == (2, 64) and tokens.dtype == torch.int64


@pytest.mark.parametrize("preset", ["kl_f8_256", "vq_f8_256"])
def test_256_presets_have_factor_8(preset: str) -> None:
    kind, spec = diffusers_config(AutoencoderArchConfig(preset=preset))
    assert kind == ("kl" if preset.startswith("kl") else "vq")
    assert spec["sample_size"] == 256 and 2 ** (len(spec["block_out_channels"]) - 1) == 8
    with torch.device("meta"):  # shapes only: no memory for ~80 M parameters
        model = build_autoencoder(AutoencoderArchConfig(preset=preset), kind)
    assert downsampling_factor(model) == 8


def test_arch_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        AutoencoderArchConfig(preset="nope")
    with pytest.raises(ValueError, match="VQ presets only"):
        diffusers_config(AutoencoderArchConfig(preset="kl_demo", num_vq_embeddings=8))
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        diffusers_config(AutoencoderArchConfig(preset="kl_demo", block_out_channels=[12, 16, 16]))
    with pytest.raises(ValueError, match="needs 'vq'"):
        build_autoencoder(AutoencoderArchConfig(preset="kl_demo"), "vq")
    with pytest.raises(ValueError, match="KL presets only"):
        diffusers_config(AutoencoderArchConfig(preset="vq_demo", logvar_init=-6.0))
    assert diffusers_config(AutoencoderArchConfig(), "vq")[1]["num_vq_embeddings"] == 512  # family default


def test_logvar_init_starts_the_posterior_narrow() -> None:
    model = build_autoencoder(AutoencoderArchConfig(logvar_init=-6.0, **TINY), "kl")
    post = model.encode(_images()).latent_dist
    assert torch.allclose(post.logvar, torch.full_like(post.logvar, -6.0))
    assert float(post.mean.abs().max()) > 0  # the mean half is untouched
    assert set(PRESETS) == {"kl_demo", "vq_demo", "kl_f8_256", "vq_f8_256"}


@pytest.mark.parametrize("preset", ["kl_demo", "vq_demo"])
def test_save_pretrained_loads_with_stock_diffusers_classes(preset: str, tmp_path: Path) -> None:
    model = _tiny(preset)
    x = _images()
    ref = reconstruct(model, x)
    model.save_pretrained(tmp_path / "ae")
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["_class_name"] in ("AutoencoderKL", "VQModel")
    stock_cls = AutoencoderKL if preset.startswith("kl") else VQModel
    stock = stock_cls.from_pretrained(tmp_path / "ae", local_files_only=True).eval()
    assert type(stock) is stock_cls
    assert torch.equal(reconstruct(stock, x), ref)
    ours = load_pretrained(tmp_path / "ae", "kl" if preset.startswith("kl") else "vq").eval()
    assert torch.equal(reconstruct(ours, x), ref)
    # diffusers' own forward gives the same images (posterior mode / its quantizer)
    out = stock(x, sample_posterior=False).sample if preset.startswith("kl") else stock(x).sample
    assert torch.allclose(out, ref, atol=1e-5)


def test_pipeline_folder_with_vae_subfolder_and_missing_folder(tmp_path: Path) -> None:
    model = _tiny("kl_demo")
    model.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = build_autoencoder(AutoencoderArchConfig(pretrained=str(tmp_path / "pipe"), scaling_factor=0.5), "kl")
    assert loaded.config.scaling_factor == 0.5
    assert torch.equal(reconstruct(loaded.eval(), _images()), reconstruct(model, _images()))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "absent", "kl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no diffusers model"):
        load_pretrained(tmp_path / "empty", "vq")


def test_vq_tokens_round_trip_and_match_diffusers_quantizer() -> None:
    model = _tiny("vq_demo")
    x = _images(3)
    tokens = vq_encode_tokens(model, x)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.quantize.n_e
    _, _, (_, _, idx) = model.quantize(model.encode(x).latents)
    assert torch.equal(tokens.flatten(), idx.flatten())
    assert torch.allclose(vq_decode_tokens(model, tokens, 8, 8), reconstruct(model, x))


def test_scaling_factor_is_one_over_latent_std() -> None:
    model = _tiny("vq_demo")
    x = _images(6)
    expected = 1.0 / float(latent_sample(model, x).double().std())
    got = compute_scaling_factor(model, [x[:4], x[4:]], max_samples=6)
    assert got == pytest.approx(expected, rel=1e-6)
    assert compute_scaling_factor(model, [x[:4], x[4:]], max_samples=4) == pytest.approx(
        1.0 / float(latent_sample(model, x[:4]).double().std()), rel=1e-6)
    with pytest.raises(ValueError, match="no images"):
        compute_scaling_factor(model, [])


def _family(kind: str, **loss: object):  # noqa: ANN202 - test helper
    arch = {"preset": "kl_demo" if kind == "kl_vae" else "vq_demo", **TINY}
    cls = get_family(kind)
    cfg = from_dict(cls.config_class, {"arch": arch, "loss": loss, "disc": {"channels": 8, "n_layers": 2}})
    return cls(cfg)


def test_families_are_registered_with_typed_configs() -> None:
    assert get_family("kl_vae").config_class is KLVAEConfig
    assert get_family("vqgan").config_class is VQGANConfig
    assert get_family("vqgan").data_kind == "images"


@pytest.mark.parametrize("kind", ["kl_vae", "vqgan"])
def test_parts_and_gradient_isolation(kind: str) -> None:
    fam = _family(kind, disc_weight=0.5, disc_start=2)
    torch.manual_seed(0)
    mods = fam.build()
    assert set(mods) == {"model", "disc"}
    assert fam.parts(1) == ["model"] and fam.parts(2) == ["model", "disc"]
    batch = {"image": _images(4)}
    loss, logs = fam.loss("model", mods, batch, 2)
    assert {"psnr", "rec_l1", "adv_weight", "g_loss"} <= set(logs)
    assert ("kl" in logs) == (kind == "kl_vae") and ("perplexity" in logs) == (kind == "vqgan")
    loss.backward()
    assert all(p.grad is None for p in mods["disc"].parameters())  # no generator gradient in the disc
    assert all(p.requires_grad for p in mods["disc"].parameters())  # unfrozen again afterwards
    enc = mods["model"].encoder.conv_in.weight.grad
    assert enc is not None and torch.count_nonzero(enc) > 0  # through the quantizer (straight-through)
    mods["model"].zero_grad(set_to_none=True)
    d_loss, d_logs = fam.loss("disc", mods, batch, 2)
    d_loss.backward()
    assert all(p.grad is None for p in mods["model"].parameters())  # no disc gradient in the generator
    assert any(p.grad is not None and torch.count_nonzero(p.grad) for p in mods["disc"].parameters())
    assert "logits_real" in d_logs


def test_kl_family_without_adversary_builds_one_part() -> None:
    fam = _family("kl_vae")
    assert set(fam.build()) == {"model"} and fam.parts(10**6) == ["model"]


def test_vq_kmeans_init_and_dead_code_restart_reset_adam_moments() -> None:
    fam = _family("vqgan")
    fam.cfg.codebook.restart_every = 2
    torch.manual_seed(0)
    mods = fam.build()
    model = mods["model"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    class Engine(torch.nn.Module):  # what the family sees under plain torch: the module + its optimizer
        def __init__(self) -> None:
            super().__init__()
            self.module, self.optimizer = model, opt

        def forward(self, *a: object, **k: object) -> object:
            return self.module(*a, **k)

    eng = Engine()
    weight = model.quantize.embedding.weight
    before = weight.detach().clone()
    batch = {"image": _images(4)}
    for step in range(2):
        loss, logs = fam.loss("model", {"model": eng}, batch, step)
        if step == 0:  # k-means on the first batch's encoder outputs replaced the uniform init
            assert not torch.allclose(weight, before)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key in ("exp_avg", "exp_avg_sq"):
        opt.state[weight][key].fill_(1.0)
    before = weight.detach().clone()
    loss, logs = fam.loss("model", {"model": eng}, batch, 2)
    # 4 images x 64 tokens cannot cover 512 codes: the restart at step 2 re-seeded the unused ones
    changed = (weight.detach() != before).any(dim=1)
    assert logs["codes_restarted"] == int(changed.sum()) > 0
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[weight][key]
        assert bool((state[changed] == 0).all()) and bool((state[~changed] == 1).all())


def test_evaluate_and_reconstruction_grid() -> None:
    fam = _family("vqgan")
    mods = fam.build()
    logs = fam.evaluate(mods, {"image": _images(3)}, 0)
    assert {"model/psnr", "model/codebook_usage", "model/perplexity"} <= set(logs)
    grid = fam.log_images(mods, {"image": _images(3)})["reconstructions"]
    assert grid.size == (3 * 32, 2 * 32)
    assert recon_grid(_images(10), _images(10)).size == (8 * 32, 64)


def test_scaling_factor_tracked_into_config() -> None:
    fam = _family("kl_vae")
    mods = fam.build()
    fam.loss("model", mods, {"image": _images(4)}, 0)
    sf = fam.cfg.arch.scaling_factor
    assert sf is not None and sf > 0 and mods["model"].config.scaling_factor == sf
