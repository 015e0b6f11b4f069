"""AR prior: model, objective and sampler (training/models/ar.py, objectives/autoregressive.py,
ar_sampling.py, families/ar.py).

The learning test trains a tiny model on a synthetic token set with a known conditional law:
caption c picks the first code from P[c], and every later code is (t_0 + j * (c + 1)) mod K.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from latentpipe.preprocessing.config import ConfigError, load_config, read_yaml
from latentpipe.training.ar_sampling import ARSampleConfig, filter_logits, sample_tokens
from latentpipe.training.export import load_export, save_export
from latentpipe.training.families import family_from_config, model_config_dict
from latentpipe.training.families.ar import ARFamily, ARFamilyConfig, fit_text
from latentpipe.training.guidance import mix
from latentpipe.training.models.ar import PRESETS, ARConfig, ARPrior, build_ar
from latentpipe.training.models.autoencoders import vq_decode_tokens
from latentpipe.training.objectives.autoregressive import AutoregressiveObjective, keyed_uniform

ROOT = Path(__file__).resolve().parents[2]
K, GRID, L, D = 8, (2, 2), 3, 8
P = torch.tensor([
    [0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.6, 0.4, 0.0, 0.0, 0.0],
    [0.1, 0.0, 0.0, 0.0, 0.0, 0.2, 0.3, 0.4],
])
LENS = (1, 2, 3)  # caption c has LENS[c] real text tokens (exercises the padding)


def tiny(arch: str = "llama", extra_tokens: int = 0, seed: int = 0) -> ARPrior:
    torch.manual_seed(seed)
    return build_ar(ARConfig(arch=arch, codebook_size=K, grid=GRID, text_dim=D, text_len=L, width=32, depth=2,
                             heads=2, extra_tokens=extra_tokens))


def captions(c: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text [B, L, D] (zero padded) and mask [B, L] for caption ids c [B]."""
    mask = torch.arange(L)[None, :] < torch.tensor(LENS)[c][:, None]  # [B, L]
    return emb[c] * mask[..., None], mask


def synthetic_batch(n: int, emb: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = torch.randint(0, 3, (n,), generator=g)
    t0 = torch.multinomial(P[c], 1, generator=g)[:, 0]
    tokens = torch.stack([(t0 + j * (c + 1)) % K for j in range(GRID[0] * GRID[1])], dim=1)  # [B, 4]
    text, mask = captions(c, emb)
    return {"tokens": tokens, "text": text, "text_mask": mask}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster, and far faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread: None) -> tuple[ARPrior, torch.Tensor]:
    """A tiny Llama-config prior trained 300 steps on the synthetic law; returns (model, caption embeddings)."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, L, D, generator=g)
    model = tiny()
    obj = AutoregressiveObjective(K, cond_drop=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 300)  # linear decay: a calm last iterate
    for _ in range(300):
        loss, _ = obj.loss(model, synthetic_batch(128, emb, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), emb


def cond(c: int, n: int, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return captions(torch.full((n,), c), emb)


def test_learns_known_conditional_distribution(trained: tuple[ARPrior, torch.Tensor]) -> None:
    model, emb = trained
    n = 600
    for c in range(3):
        text, mask = cond(c, n, emb)
        out = sample_tokens(model, text, mask, ARSampleConfig(guidance=None), torch.Generator().manual_seed(c))
        assert out.shape == (n, 4)
        freq = torch.bincount(out[:, 0], minlength=K).float() / n
        tv = 0.5 * (freq - P[c]).abs().sum().item()
        assert tv < 0.08, (c, freq, tv)
        follows = ((out - out[:, :1]) % K == (torch.arange(4) * (c + 1)) % K).all(1).float().mean().item()
        assert follows > 0.9, (c, follows)
    # The unconditional model (learned from the 10% dropped captions) matches the caption mixture.
    out = sample_tokens(model, None, None, ARSampleConfig(), torch.Generator().manual_seed(9), batch_size=n)
    freq = torch.bincount(out[:, 0], minlength=K).float() / n
    assert 0.5 * (freq - P.mean(0)).abs().sum().item() < 0.15, freq  # one caption in ten trains it


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_gives_identical_tokens(arch: str) -> None:
    model = tiny(arch, seed=3)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, L, D, generator=g)
    text, mask = captions(torch.tensor([0, 1, 2, 1, 0, 2]), emb)
    for sc in (ARSampleConfig(guidance=2.5, top_k=5, top_p=0.95), ARSampleConfig(guidance=None, temperature=1.3)):
        runs = [sample_tokens(model, text, mask, ARSampleConfig(**{**vars(sc), "use_cache": c}),
                              torch.Generator().manual_seed(7)) for c in (True, False)]
        assert torch.equal(runs[0], runs[1])
    # And the incremental logits equal the full recomputation.
    ids = torch.cat([torch.full((6, 1), model.bos_id), torch.randint(0, K, (6, 3), generator=g)], dim=1)
    full, _ = model(ids, text, mask, keep=4)
    step, cache = model(ids[:, :1], text, mask, use_cache=True, keep=1)
    steps = [step]
    for i in range(1, 4):
        step, cache = model(ids[:, i:i + 1], cache=cache, use_cache=True, keep=1)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_guidance_zero_is_unconditional_and_one_is_conditional(trained: tuple[ARPrior, torch.Tensor]) -> None:
    model, emb = trained
    text, mask = captions(torch.tensor([0, 1, 2] * 20), emb)
    def run(t: torch.Tensor | None, m: torch.Tensor | None, guidance: float | None) -> torch.Tensor:
        return sample_tokens(model, t, m, ARSampleConfig(guidance=guidance, top_p=0.98),
                             torch.Generator().manual_seed(5), batch_size=60)
    uncond, cond_only = run(None, None, None), run(text, mask, None)
    assert not torch.equal(uncond, cond_only)  # the caption matters, so the checks below discriminate
    assert torch.equal(run(text, mask, 0.0), uncond)
    assert torch.equal(run(text, mask, 1.0), cond_only)
    assert not torch.equal(run(text, mask, 3.0), cond_only)
    a, b = torch.randn(4, K), torch.randn(4, K)
    assert torch.equal(mix(a, b, 0.0), b) and torch.equal(mix(a, b, 1.0), a)
    torch.testing.assert_close(mix(a, b, 3.0), b + 3.0 * (a - b))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ids_inside_codebook_with_extra_special_tokens(arch: str) -> None:
    model = tiny(arch, extra_tokens=5, seed=1)
    assert model.cfg.vocab_size == K + 6
    # Make BOS and the spare ids the most likely outputs by far.
    boost = torch.zeros(K + 6)
    boost[K:] = 100.0
    model.lm.lm_head.register_forward_hook(lambda _m, _i, out: out + boost)
    text, mask = captions(torch.tensor([0, 1, 2, 0]), torch.randn(3, L, D))
    logits, _ = model(torch.full((4, 1), model.bos_id), text, mask, keep=1)
    assert (logits[:, -1].argmax(-1) >= K).all()  # unrestricted, the head would emit special ids
    for sc in (ARSampleConfig(), ARSampleConfig(temperature=0.0), ARSampleConfig(temperature=5.0, top_k=K + 6),
               ARSampleConfig(guidance=None, top_p=1.0)):
        out = sample_tokens(model, text, mask, sc, torch.Generator().manual_seed(0))
        assert out.dtype == torch.int64 and out.min() >= 0 and out.max() < K


def test_top_k_one_equals_greedy(trained: tuple[ARPrior, torch.Tensor]) -> None:
    model, emb = trained
    text, mask = captions(torch.tensor([0, 1, 2, 2, 1]), emb)
    greedy = sample_tokens(model, text, mask, ARSampleConfig(temperature=0.0), torch.Generator().manual_seed(0))
    for seed in (1, 2):
        topk1 = sample_tokens(model, text, mask, ARSampleConfig(top_k=1, temperature=1.7),
                              torch.Generator().manual_seed(seed))
        assert torch.equal(topk1, greedy)
    plain = sample_tokens(model, text, mask, ARSampleConfig(temperature=0.0, guidance=None))
    logits, _ = model(torch.full((5, 1), model.bos_id), text, mask, keep=1)
    assert torch.equal(plain[:, 0], logits[:, -1, :K].argmax(-1))


def test_top_p_keeps_the_minimal_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15]])
    logits = probs.log()
    for p, kept in ((0.45, {1}), (0.6, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 3, 4, 2}), (1.0, {0, 1, 2, 3, 4})):
        out = filter_logits(logits, top_p=p)
        assert set(torch.isfinite(out[0]).nonzero()[:, 0].tolist()) == kept, p
        torch.testing.assert_close(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    # Random logits against the definition: the smallest top-ranked set with mass >= p.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 20, generator=g) * 2
    for p in (0.3, 0.7, 0.95):
        keep = torch.isfinite(filter_logits(x, top_p=p))
        for row, k in zip(x, keep):
            pr, order = row.softmax(-1).sort(descending=True)
            n = int((pr.cumsum(0) < p).sum()) + 1
            assert set(order[:n].tolist()) == set(k.nonzero()[:, 0].tolist())
    both = filter_logits(x, top_k=3, top_p=0.99)
    assert (torch.isfinite(both).sum(-1) <= 3).all()
    assert torch.equal(torch.isfinite(filter_logits(x, top_k=4)).sum(-1), torch.full((50,), 4))


def test_sampling_is_seeded() -> None:
    model = tiny(seed=2)
    text, mask = captions(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(3, L, D))
    a, b, c = (sample_tokens(model, text, mask, ARSampleConfig(temperature=2.0), torch.Generator().manual_seed(s))
               for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_objective_is_teacher_forced_next_token_nll() -> None:
    model = tiny(seed=4).eval()
    g = torch.Generator().manual_seed(2)
    batch = synthetic_batch(5, torch.randn(3, L, D, generator=g), g)
    loss, logs = AutoregressiveObjective(K, cond_drop=0.0).loss(model, batch)
    # Oracle: feed the tokens one at a time through the KV cache and score each next code.
    tokens = batch["tokens"]
    ids, cache, nll = torch.full((5, 1), model.bos_id), None, []
    for i in range(4):
        logits, cache = model(ids, batch["text"], batch["text_mask"], cache=cache, use_cache=True, keep=1)
        logp = logits[:, -1, :K].log_softmax(-1)
        nll.append(-logp.gather(1, tokens[:, i:i + 1])[:, 0])
        ids = tokens[:, i:i + 1]
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-6)
    assert logs["ce"] == pytest.approx(float(loss.detach())) and logs["cond_dropped"] == 0.0
    # A head that outputs zeros gives the uniform law over the codebook: CE = log K, extra ids ignored.
    flat = tiny(extra_tokens=3)
    torch.nn.init.zeros_(flat.lm.lm_head.weight)
    flat_loss, _ = AutoregressiveObjective(K, cond_drop=0.0).loss(flat, batch)
    assert float(flat_loss.detach()) == pytest.approx(math.log(K), abs=1e-6)


def test_caption_dropout_clears_whole_rows_at_rate_p() -> None:
    obj = AutoregressiveObjective(K, cond_drop=0.3)
    mask = torch.ones(20000, L, dtype=torch.bool)
    keys = [f"{i:09d}" for i in range(20000)]
    u = keyed_uniform(keys, step=7)
    assert torch.equal(u, keyed_uniform(keys, 7)) and not torch.equal(u, keyed_uniform(keys, 8))
    assert torch.equal(keyed_uniform(keys[5:9], 7), u[5:9])  # per key: any batch split, any world size
    out = obj.drop_mask(mask, u)
    rows = out.any(1)
    assert torch.equal(out, rows[:, None].expand_as(out))
    assert abs((~rows).float().mean().item() - 0.3) < 0.015
    assert abs(keyed_uniform(keys, 3).mean().item() - 0.5) < 0.01
    assert AutoregressiveObjective(K, 1.0).drop_mask(mask, torch.rand(20000)).sum() == 0
    # A fully dropped caption is exactly the unconditional model.
    model = tiny(seed=5).eval()
    batch = synthetic_batch(6, torch.randn(3, L, D), torch.Generator().manual_seed(3))
    dropped, _ = AutoregressiveObjective(K, 1.0).loss(model, batch)
    ids = torch.cat([torch.full((6, 1), model.bos_id), batch["tokens"][:, :-1]], 1)
    logits, _ = model(ids, None, None, keep=4)
    ref = torch.nn.functional.cross_entropy(logits[..., :K].reshape(24, K), batch["tokens"].reshape(24))
    torch.testing.assert_close(dropped, ref)


def test_bad_inputs_fail_with_clear_errors() -> None:
    model = tiny()
    batch = synthetic_batch(2, torch.randn(3, L, D), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="codebook has 8 codes"):
        AutoregressiveObjective(K).loss(model, {**batch, "tokens": batch["tokens"] + K})
    with pytest.raises(ValueError, match="text_len=3"):
        model(batch["tokens"], torch.zeros(2, 5, D), None)
    with pytest.raises(ValueError, match="no 'text'"):
        AutoregressiveObjective(K).loss(model, {"tokens": batch["tokens"]})
    with pytest.raises(ValueError, match="top_p"):
        ARSampleConfig(top_p=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        sample_tokens(model)


def tiny_vq() -> Any:
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=K,
                   norm_num_groups=4, vq_embed_dim=4, sample_size=8).eval()


def test_decode_through_a_diffusers_vqmodel(tmp_path: Path) -> None:
    vq = tiny_vq()
    with torch.no_grad():
        h = vq.encode(torch.rand(2, 3, 8, 8) * 2 - 1).latents  # [2, 4, 4, 4]
        ref = vq.decode(h).sample  # quantizes to the nearest codes, then decodes
        _, _, (_, _, idx) = vq.quantize(h)
    tokens = idx.reshape(2, 16)  # raster order of the 4x4 grid
    out = vq_decode_tokens(vq, tokens, 4, 4)
    torch.testing.assert_close(out, ref)
    # The family decodes its samples through a VQGAN folder named in model.vqgan.
    vq.save_pretrained(tmp_path / "vq")
    fam = family_from_config({"kind": "ar", "vqgan": str(tmp_path / "vq"),
                              "net": {"codebook_size": K, "grid": [4, 4], "text_dim": D, "text_len": L,
                                      "width": 32, "depth": 1, "heads": 2}})
    assert isinstance(fam, ARFamily)
    module = fam.build()["model"]
    # A text encoder's own length (5 > text_len 3) is truncated like the training loader does.
    tokens, images = fam.generate(module, torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.int64),
                                  torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16) and images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, vq_decode_tokens(vq, tokens, 4, 4))
    bad = family_from_config({"kind": "ar", "vqgan": str(tmp_path / "vq"), "net": {"codebook_size": K + 1}})
    assert isinstance(bad, ARFamily)
    with pytest.raises(ValueError, match="has 8 codes"):
        bad.vqgan()


def test_fit_text_pads_and_truncates_like_the_loader() -> None:
    text, mask = torch.randn(2, 2, D), torch.tensor([[1, 1], [1, 0]])
    t, m = fit_text(text, mask, 4)
    assert t.shape == (2, 4, D) and m.dtype == torch.bool
    assert torch.equal(m, torch.tensor([[True, True, False, False], [True, False, False, False]]))
    assert torch.equal(t[:, :2], text) and not t[:, 2:].any()
    t, m = fit_text(torch.randn(2, 6, D), None, 4)
    assert t.shape == (2, 4, D) and m.all()


def test_family_config_presets_and_export(tmp_path: Path) -> None:
    fam = family_from_config({"kind": "ar", "net": {"codebook_size": K, "grid": [2, 2], "text_dim": D,
                                                     "text_len": L, "width": 32, "depth": 1, "heads": 2}})
    assert isinstance(fam, ARFamily) and fam.data_kind == "latents" and fam.cfg.net.grid == (2, 2)
    with pytest.raises(ConfigError, match="model.net.widht"):
        family_from_config({"kind": "ar", "net": {"widht": 3}})
    modules = fam.build()
    batch = {**synthetic_batch(4, torch.randn(3, L, D), torch.Generator().manual_seed(0)), "caption": ["x"] * 4,
             "__key__": ["a", "b", "c", "d"]}
    loss, logs = fam.loss("model", modules, batch, 0)
    assert loss.ndim == 0 and loss.requires_grad and set(logs) == {"ce", "token_acc", "cond_dropped"}
    # Caption dropout is keyed on (sample key, step), not on the global RNG.
    fam.objective.cond_drop = 0.5
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append([float(fam.loss("model", modules, batch, s)[0].detach()) for s in range(6)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    fam.objective.cond_drop = 0.1
    grid = fam.log_images(modules, batch)["samples"]
    assert grid.size == (4 * 2 * 4, 2 * 4)  # 4 samples of 2x2 codes at 4 px per code
    save_export(tmp_path / "exp", "ar", model_config_dict(fam), modules["model"].state_dict())
    fam2, module = load_export(tmp_path / "exp")
    ids = torch.cat([torch.full((4, 1), K), batch["tokens"][:, :-1]], 1)
    torch.testing.assert_close(module(ids, batch["text"], batch["text_mask"])[0],
                               modules["model"].eval()(ids, batch["text"], batch["text_mask"])[0])
    # The YAML configs use the named presets.
    for name, preset in (("prior_ar_demo.yaml", "demo"), ("prior_ar_256.yaml", "32x32")):
        path = ROOT / "configs" / name
        cfg = load_config(ARFamilyConfig, base={k: v for k, v in read_yaml(path)["model"].items() if k != "kind"})
        assert cfg.net == PRESETS[preset](), name
    assert isinstance(ARFamilyConfig().net, ARConfig)
