"""Backbones: shapes, text conditioning through cross-attention, masking, the CFG null slot, presets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from training.guidance import TextCond
from training.models import BackboneSpec, Denoiser, build_denoiser, presets

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
