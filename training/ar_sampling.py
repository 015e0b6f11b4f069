"""Sampling VQGAN token grids from the AR prior: temperature, top-k, top-p, classifier-free guidance.

One token per step in raster order. Guidance mixes the conditional and unconditional next-token
logits, ``l = s * l_cond + (1 - s) * l_uncond`` (= ``l_uncond + s (l_cond - l_uncond)``, Ho &
Salimans 2022; for AR image priors as in Make-A-Scene / Parti), both computed in one batched
forward ``[cond rows; uncond rows]``. The written form is exact at ``s = 0`` (unconditional) and
``s = 1`` (conditional). Then temperature, top-k (Fan et al. 2018), top-p / nucleus (Holtzman et al.
2020), and a Gumbel-max draw from a ``torch.Generator``: the random numbers drawn never depend on
the logits, so the same seed gives the same tokens with and without the KV cache. Only the first
``codebook_size`` logits are ever drawn from, so ids are always valid codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentpipe.training.guidance import mix
from latentpipe.training.models.ar import ARPrior


@dataclass
class ARSampleConfig:
    """How to draw tokens (the ``model.sample`` section of an AR config)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely codes
    top_p: float | None = None  # keep the smallest set of codes with total probability >= top_p
    guidance: float | None = 3.0  # CFG scale; None: conditional only (no unconditional pass)
    use_cache: bool = True  # KV cache (transformers DynamicCache); False recomputes the whole prefix

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or null, got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` [B, K] with everything outside the top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of codes, most likely first, whose probability sums to at
    least ``top_p``; the most likely code is always kept.
    """
    out = logits
    if top_k is not None and top_k < logits.shape[-1]:
        idx = logits.topk(top_k, dim=-1).indices  # [B, k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)  # [B, K]
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the codes ranked above each code
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def draw(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One id per row of ``logits`` [B, K] -> [B] int64, by Gumbel-max over the filtered logits."""
    # Draw the noise first, always the same amount, so the RNG stream never depends on the logits.
    dev = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=dev, dtype=torch.float32).to(logits.device)
    if temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
    return (filtered + gumbel).argmax(-1)


@torch.no_grad()
def sample_tokens(
    model: ARPrior,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    cfg: ARSampleConfig | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Sample token grids in raster order.

    Args:
        model: the AR prior (unwrapped module).
        text: [B, L, D] per-token text embeddings (zero padded) or None for unconditional samples.
        text_mask: [B, L] bool, True at real text tokens (None: all real).
        cfg: sampling settings; guidance applies only when ``text`` is given.
        generator: RNG of the draws (same seed, same tokens).
        batch_size: number of samples when ``text`` is None.

    Returns:
        int64 [B, h*w] code ids, all in [0, codebook_size).
    """
    cfg = cfg or ARSampleConfig()
    if text is None:
        if batch_size is None:
            raise ValueError("unconditional sampling needs batch_size")
        b = batch_size
    else:
        b = text.shape[0]
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    guided = text is not None and cfg.guidance is not None
    if guided:
        assert text is not None and text_mask is not None
        # Rows [0, B) conditional, [B, 2B) unconditional (an all-False mask is the null prefix).
        text = torch.cat([text, torch.zeros_like(text)])  # [2B, L, D]
        text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])  # [2B, L]
    rows = 2 * b if guided else b
    k = model.codebook_size
    device = next(model.parameters()).device
    ids = torch.full((rows, 1), model.bos_id, dtype=torch.long, device=device)  # [rows, 1]
    cache: Any = None
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(model.cfg.num_image_tokens):
            if cfg.use_cache:
                step_ids = ids if i == 0 else ids[:, -1:]
                logits, cache = model(step_ids, text, text_mask, cache=cache, use_cache=True, keep=1)
            else:
                logits, _ = model(ids, text, text_mask, keep=1)
            logits = logits[:, -1, :k]  # [rows, K]: image codes only, never BOS or spare ids
            if guided:
                assert cfg.guidance is not None
                logits = mix(logits[:b], logits[b:], cfg.guidance)  # [B, K]
            nxt = draw(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)  # [B]
            out.append(nxt)
            feed = torch.cat([nxt, nxt]) if guided else nxt  # [rows]
            ids = torch.cat([ids, feed.unsqueeze(1)], dim=1)
    finally:
        model.train(was_training)
    return torch.stack(out, dim=1)  # [B, N]


__all__ = [
    "ARSampleConfig",
    "draw",
    "filter_logits",
    "sample_tokens",
]
