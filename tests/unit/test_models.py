"""Backbones: shapes, text conditioning through cross-attention, masking, the CFG null slot, presets."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from latentpipe.training.guidance import TextCond
from latentpipe.training.models import BackboneSpec, Denoiser, build_denoiser, presets

SPEC = BackboneSpec(in_channels=4, sample_size=8, text_dim=32)
DEMOS = ["unet_demo", "dit_demo"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _model(name: str, null: str = "learned") -> Denoiser:
    m = build_denoiser(name, SPEC, 1000.0, null)  # type: ignore[arg-type]
    with torch.no_grad():  # a non-zero null token, and no zero-initialised output layers
        m.null_text.normal_()
        for p in m.backbone.parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.02)
    return m.eval()


def _inputs(b: int = 3, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, TextCond]:
    x = torch.randn(b, 4, 8, 8)
    t = torch.rand(b)
    mask = torch.arange(n)[None, :] < torch.tensor([6, 3, 1])[:b, None]  # real lengths 6, 3, 1
    return x, t, TextCond.of(torch.randn(b, n, 32) * mask[..., None], mask)


@pytest.mark.parametrize("name", DEMOS)
@torch.no_grad()
def test_forward_shape_and_text_conditioning(name: str) -> None:
    m = _model(name)
    x, t, cond = _inputs()
    out = m(x, t, cond)
    assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
    other = TextCond(torch.randn_like(cond.text) * cond.mask[..., None], cond.mask, cond.drop)
    assert float((m(x, t, other) - out).abs().amax(dim=(1, 2, 3)).min()) > 1e-4  # every row reads its text
    assert float((m(x, t + 0.5, cond) - out).abs().max()) > 1e-4  # and the time


@pytest.mark.parametrize("name", DEMOS)
@torch.no_grad()
def test_padding_is_masked(name: str) -> None:
    m = _model(name)
    x, t, cond = _inputs()
    junk = cond.text + torch.randn_like(cond.text) * (~cond.mask)[..., None]  # change only the padding
    torch.testing.assert_close(m(x, t, TextCond(junk, cond.mask, cond.drop)), m(x, t, cond), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DEMOS)
@pytest.mark.parametrize("null", ["learned", "zero"])
@torch.no_grad()
def test_dropped_captions_see_only_the_null_embedding(name: str, null: str) -> None:
    m = _model(name, null)
    x, t, cond = _inputs()
    a = m(x, t, cond.null())
    b = m(x, t, TextCond(torch.randn_like(cond.text), torch.ones_like(cond.mask), torch.ones_like(cond.drop)))
    torch.testing.assert_close(a, b)
    assert float((a - m(x, t, cond)).abs().max()) > 1e-4
    assert ("null_text" in dict(m.named_parameters())) == (null == "learned")


@pytest.mark.parametrize("name", DEMOS)
@torch.no_grad()
def test_cfg_double_batch_matches_separate_passes(name: str) -> None:
    m = _model(name)
    x, t, cond = _inputs()
    both = m(torch.cat([x, x]), torch.cat([t, t]), cond.cat(cond.null()))
    torch.testing.assert_close(both, torch.cat([m(x, t, cond), m(x, t, cond.null())]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DEMOS)
def test_gradients_reach_the_null_embedding_and_the_backbone(name: str) -> None:
    m = build_denoiser(name, SPEC, 1000.0, "learned").train()
    x, t, cond = _inputs()
    cond = TextCond(cond.text, cond.mask, torch.tensor([True, False, False]))
    m(x, t, cond).pow(2).mean().backward()
    assert m.null_text.grad is not None and float(m.null_text.grad.abs().sum()) > 0
    out_layer = m.backbone.get_submodule("conv_out" if name == "unet_demo" else "proj_out")
    assert isinstance(out_layer, torch.nn.Module) and out_layer.weight.grad is not None


@pytest.mark.parametrize("name", DEMOS)
@torch.no_grad()
def test_low_precision_parameters_keep_float32_io(name: str) -> None:
    m = _model(name).to(torch.bfloat16)
    x, t, cond = _inputs()
    out = m(x, t, cond)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_presets_build_with_their_sizes() -> None:
    """The 256 px presets are built on the meta device (no memory) and counted."""
    expected = {  # parameters in millions at D = 768, 32x32 latents
        "unet_base": (90, 120), "unet_sd": (850, 870), "dit_b2": (110, 130), "dit_xl2": (590, 620),
    }
    assert set(expected) | set(DEMOS) == set(presets())
    for name, (lo, hi) in expected.items():
        with torch.device("meta"):
            m = build_denoiser(name, BackboneSpec(4, 32, 768), 1.0, "learned")
        assert lo < m.num_parameters() / 1e6 < hi, name
    with pytest.raises(ValueError, match="known: dit_b2"):
        build_denoiser("unet_huge", SPEC, 1.0, "zero")
    with pytest.raises(ValueError, match="patch size"):
        build_denoiser("dit_demo", BackboneSpec(4, 7, 32), 1.0, "zero")


# ----------------------------------------------------------------- the ddpm / flow families around them


def _batch(b: int, mean: float = 0.0, logvar: float = 0.0, text_dim: int = 32) -> dict[str, Any]:
    lat = torch.cat([torch.full((b, 4, 8, 8), mean), torch.full((b, 4, 8, 8), logvar)], dim=1)  # [B, 8, 8, 8]
    mask = torch.arange(5)[None, :] < torch.randint(1, 6, (b, 1))
    return {"latent": lat, "text": torch.randn(b, 5, text_dim) * mask[..., None], "text_mask": mask,
            "caption": ["c"] * b, "__key__": [str(i) for i in range(b)]}


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_family_draws_scaled_posterior_samples_and_drops_captions(kind: str) -> None:
    from latentpipe.training.families import family_from_config

    fam = family_from_config({"kind": kind, "text_dim": 32, "scaling_factor": 0.5, "shift_factor": 0.2,
                              "cond_drop": 0.3})
    inputs = fam._inputs(_batch(4000, mean=1.0, logvar=math.log(0.25)), torch.device("cpu"), None, drop=True)  # type: ignore[attr-defined]
    assert inputs.x.shape == (4000, 4, 8, 8)
    assert inputs.x.mean().item() == pytest.approx((1.0 - 0.2) * 0.5, abs=0.005)  # (z - shift) * scale
    assert inputs.x.std().item() == pytest.approx(0.5 * 0.5, rel=0.01)  # exp(logvar / 2) * scale
    assert inputs.cond.drop.float().mean().item() == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ValueError, match=r"expected \[B, 8, 8, 8\]"):
        fam._inputs({**_batch(2), "latent": torch.zeros(2, 8, 4, 4)}, torch.device("cpu"), None, drop=True)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="text_dim is 32"):
        fam._inputs(_batch(2, text_dim=16), torch.device("cpu"), None, drop=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kind", "backbone"), [("ddpm", "unet_demo"), ("flow", "dit_demo"), ("flow", "unet_demo")])
def test_family_loss_eval_and_grid(kind: str, backbone: str) -> None:
    from latentpipe.training.families import family_from_config

    fam = family_from_config({"kind": kind, "backbone": backbone, "text_dim": 32, "grid_samples": 3,
                              "sample": {"steps": 3, "guidance": 2.0}})
    modules = fam.build()
    batch = _batch(4)
    loss, logs = fam.loss("model", modules, batch, 0)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and "loss" not in logs
    loss.backward()
    assert all(p.grad is not None for n, p in modules["model"].named_parameters() if n.startswith("backbone.conv_in")
               or n.startswith("backbone.pos_embed"))
    modules["model"].eval()
    assert fam.evaluate(modules, batch, 0) == fam.evaluate(modules, batch, 10)  # fixed noise and times
    grid = fam.log_images(modules, batch)["samples"]
    assert grid.size == (3 * 8 * 4, 2 * 8 * 4)  # data latents over samples, 4x nearest upscaling


def test_family_grid_decodes_with_a_configured_vae(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from latentpipe.training.families import family_from_config

    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")  # type: ignore[attr-defined]  # f4: 32 px <-> 8x8
    fam = family_from_config({"kind": "flow", "text_dim": 32, "grid_samples": 2, "vae": str(tmp_path / "vae"),
                              "scaling_factor": 0.5, "sample": {"steps": 2}})
    modules = fam.build()
    grid = fam.log_images(modules, _batch(3))["samples"]
    assert grid.size == (2 * 32, 2 * 32)  # data decoded over samples decoded
    z, images = fam.generate(modules["model"], TextCond.of(torch.randn(2, 5, 32)), steps=2)  # type: ignore[attr-defined]
    assert z.shape == (2, 4, 8, 8) and images is not None and images.shape == (2, 3, 32, 32)


def test_training_draws_are_a_function_of_step_and_micro_batch() -> None:
    """A resumed run redraws what the uninterrupted run drew (no dependence on the global RNG)."""
    from latentpipe.training.families import family_from_config

    cfg = {"kind": "flow", "text_dim": 32, "cond_drop": 0.5}
    a, b = family_from_config(cfg), family_from_config(cfg)
    modules = a.build()
    batch = _batch(8)
    first = a.loss("model", modules, batch, 7)[0].item()
    torch.manual_seed(123)  # other code consuming random numbers changes nothing
    assert b.loss("model", modules, batch, 7)[0].item() == first
    assert a.loss("model", modules, batch, 7)[0].item() != first  # the next micro-batch of step 7
    assert a.loss("model", modules, batch, 8)[0].item() != first
