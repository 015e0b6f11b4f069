"""Autoregressive prior over VQGAN token grids: a decoder-only transformer with a text prefix.

The sequence is ``[text prefix (L)] + [BOS] + image tokens (h*w, raster order)``, as in DALL·E
(Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation"). The transformer body is a stock
transformers causal LM (GPT-2 or Llama config) driven through ``inputs_embeds``; the prefix is the
precomputed per-token text embeddings projected to the model width. Padded text positions are
filled with a learned per-position embedding (DALL·E's "special padding token for each of the text
positions"); a dropped caption (classifier-free guidance) is the same learned prefix at every
position, so the unconditional model is the all-padding prefix.

Vocabulary: ``codebook_size`` image codes, then BOS (id ``codebook_size``), then ``extra_tokens``
spare special ids. The head scores the whole vocabulary; objective and sampler only ever use the
first ``codebook_size`` columns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import Cache, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


@dataclass
class ARConfig:
    """Size and vocabulary of the AR prior (the ``model.net`` section of a config)."""

    arch: Literal["llama", "gpt2"] = "llama"
    codebook_size: int = 512  # VQGAN codes (num_vq_embeddings of the VQGAN that made the tokens)
    grid: tuple[int, int] = (8, 8)  # token grid (h, w) of the VQGAN latents
    text_dim: int = 384  # per-token text embedding width (MiniLM: 384)
    text_len: int = 32  # prefix length; must equal data.max_text_len
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    extra_tokens: int = 0  # spare special ids after BOS (vocab = codebook_size + 1 + extra_tokens)

    def __post_init__(self) -> None:
        for name in ("codebook_size", "text_dim", "text_len", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be two positive ints (h, w), got {self.grid}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.extra_tokens < 0:
            raise ValueError(f"extra_tokens must be >= 0, got {self.extra_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + self.extra_tokens

    @property
    def max_len(self) -> int:
        """Longest sequence fed to the transformer: prefix + BOS + all image tokens but the last."""
        return self.text_len + self.num_image_tokens


def _lm(cfg: ARConfig) -> LlamaForCausalLM | GPT2LMHeadModel:
    """The transformers causal LM of ``cfg`` (randomly initialised)."""
    common: dict[str, Any] = {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.codebook_size, "eos_token_id": None,
              "pad_token_id": None, "tie_word_embeddings": False}
    if cfg.arch == "llama":
        lcfg = LlamaConfig(
            hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
            num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_len, attention_dropout=cfg.dropout, **common,
        )
        lcfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(lcfg)
    gcfg = GPT2Config(
        n_embd=cfg.width, n_layer=cfg.depth, n_head=cfg.heads, n_inner=int(cfg.width * cfg.mlp_ratio),
        n_positions=cfg.max_len, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        **common,
    )
    gcfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(gcfg)


class ARPrior(nn.Module):
    """Text-prefixed decoder-only transformer over VQGAN token ids."""

    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm: LlamaForCausalLM | GPT2LMHeadModel = _lm(cfg)
        # transformers renamed the KV-cache argument and output field past_key_values -> cache (5.2x)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.text_proj = nn.Linear(cfg.text_dim, cfg.width)
        # Learned per-position padding / null prefix: [L, width].
        self.null_prefix = nn.Parameter(torch.randn(cfg.text_len, cfg.width) * 0.02)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def bos_id(self) -> int:
        return self.cfg.codebook_size

    def prefix(self, batch: int, text: torch.Tensor | None, text_mask: torch.Tensor | None) -> torch.Tensor:
        """Prefix embeddings [B, L, width]: projected text where ``text_mask``, the null prefix elsewhere.

        Args:
            text: [B, L, text_dim] per-token text embeddings (zero padded), or None (unconditional).
            text_mask: [B, L] bool, True at real text tokens; None means all real.
        """
        null = self.null_prefix.unsqueeze(0).expand(batch, -1, -1)  # [B, L, W]
        if text is None:
            return null
        if text.shape != (batch, self.cfg.text_len, self.cfg.text_dim):
            raise ValueError(
                f"text must be [B={batch}, text_len={self.cfg.text_len}, text_dim={self.cfg.text_dim}], "
                f"got {list(text.shape)} (data.max_text_len must equal model text_len)"
            )
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        proj = self.text_proj(text.to(self.text_proj.weight.dtype))  # [B, L, W]
        return torch.where(text_mask.bool().unsqueeze(-1), proj, null)

    def forward(
        self,
        ids: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        keep: int = 0,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Logits for the next token after each position of ``ids``.

        With an empty (or no) ``cache`` the text prefix is prepended, so ``ids`` starts with BOS:
        ``ids = [BOS, t_0, ..., t_{n-2}]`` gives the logits of ``t_0 .. t_{n-1}``. With a filled
        cache only the new ids are fed; the prefix and earlier ids are in the cache.

        Args:
            ids: [B, n] int64 token ids (image codes or BOS).
            text, text_mask: see ``prefix``; ignored once the cache holds the prefix.
            cache: a transformers KV cache (``DynamicCache``) or None.
            use_cache: return the updated cache.
            keep: return logits for the last ``keep`` positions only (0: all positions, prefix included).

        Returns:
            logits [B, keep or L+n, vocab_size] (float32) and the cache (None unless ``use_cache``).
        """
        embeds = self.lm.get_input_embeddings()(ids)  # [B, n, W]
        if cache is None or cache.get_seq_length() == 0:
            embeds = torch.cat([self.prefix(ids.shape[0], text, text_mask).to(embeds.dtype), embeds], dim=1)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=embeds, use_cache=use_cache, logits_to_keep=keep, **{self._cache_kw: cache})
        return out.logits.float(), (getattr(out, self._cache_kw) if use_cache else None)


def ar_demo() -> ARConfig:
    """8x8 tokens of the 32 px demo VQGAN (512 codes), MiniLM text; ~4.6M parameters."""
    return ARConfig(codebook_size=512, grid=(8, 8), text_dim=384, text_len=32, width=256, depth=4, heads=4)


def ar_16x16() -> ARConfig:
    """16x16 tokens (a 256 px image at factor 16), 1024 codes; ~52M parameters."""
    return ARConfig(codebook_size=1024, grid=(16, 16), text_dim=384, text_len=77, width=512, depth=12,
                    heads=8)


def ar_32x32() -> ARConfig:
    """32x32 tokens (256 px at factor 8, the ``vq_f8_256`` VQGAN), 16384 codes; ~437M parameters."""
    return ARConfig(codebook_size=16384, grid=(32, 32), text_dim=384, text_len=77, width=1024, depth=24,
                    heads=16)


PRESETS: dict[str, Callable[[], ARConfig]] = {"demo": ar_demo, "16x16": ar_16x16, "32x32": ar_32x32}


def build_ar(cfg: ARConfig) -> ARPrior:
    """The AR prior of ``cfg`` (randomly initialised)."""
    return ARPrior(cfg)


__all__ = ["PRESETS", "ARConfig", "ARPrior", "ar_16x16", "ar_32x32", "ar_demo", "build_ar"]
