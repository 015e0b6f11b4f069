"""Next-token cross-entropy on VQGAN image tokens, with caption dropout for classifier-free guidance.

Teacher forcing over ``[text prefix] + [BOS] + tokens[:-1]`` -> ``tokens``: the loss is the mean
negative log-likelihood of each image token given the caption and the tokens before it in raster
order (DALL·E, Ramesh et al. 2021; the text-token loss is not used since captions are embeddings,
not ids). The softmax runs over the ``codebook_size`` image codes only, the same support the sampler
draws from. With probability ``cond_drop`` a caption is replaced by the learned null prefix
(Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; for AR priors as in Parti / Make-A-Scene).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

# model(ids [B, n], text, text_mask, keep=n) -> (logits [B, n, vocab], cache); see training/models/ar.py
ARModel = Callable[..., tuple[torch.Tensor, Any]]


class AutoregressiveObjective:
    """Next-token cross-entropy of the image tokens of a batch."""

    def __init__(self, codebook_size: int, cond_drop: float = 0.1) -> None:
        if not 0.0 <= cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {cond_drop}")
        self.codebook_size = codebook_size
        self.cond_drop = cond_drop

    def drop_mask(self, text_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``text_mask`` [B, L] with whole rows cleared with probability ``cond_drop`` (caption dropped)."""
        u = torch.rand(text_mask.shape[0], generator=generator, device=text_mask.device)  # [B]
        return text_mask & (u >= self.cond_drop).unsqueeze(1)

    def loss(
        self, model: ARModel, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy (nats per image token) and logs.

        Args:
            model: the AR prior (or its DeepSpeed engine).
            batch: ``tokens`` int [B, N] in raster order, ``text`` float [B, L, D] and
                ``text_mask`` bool [B, L] (the latent-shard batch of training/data.py).
            generator: RNG for caption dropout (default: the global RNG).
        """
        if "tokens" not in batch:
            raise ValueError("batch has no 'tokens': the AR prior needs latent shards encoded with a VQGAN")
        if "text" not in batch or "text_mask" not in batch:
            raise ValueError("batch has no 'text'/'text_mask': encode the latent shards with a text encoder")
        tokens = batch["tokens"].long()  # [B, N]
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(
                f"token ids span [{lo}, {hi}] but the codebook has {self.codebook_size} codes: "
                "the latent shards come from a different VQGAN than model.net.codebook_size says"
            )
        b, n = tokens.shape
        text_mask = batch["text_mask"].bool()
        mask = self.drop_mask(text_mask, generator) if self.cond_drop > 0 else text_mask
        bos = torch.full((b, 1), self.codebook_size, dtype=torch.long, device=tokens.device)
        ids = torch.cat([bos, tokens[:, :-1]], dim=1)  # [B, N]: BOS, t_0 .. t_{N-2}
        logits, _ = model(ids, batch["text"], mask, keep=n)  # [B, N, vocab]
        logits = logits[..., : self.codebook_size]  # [B, N, K]
        loss = F.cross_entropy(logits.reshape(b * n, -1), tokens.reshape(b * n))
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens).float().mean()
            dropped = (text_mask.any(1) & ~mask.any(1)).float().mean()
        return loss, {"ce": float(loss.detach()), "token_acc": float(acc), "cond_dropped": float(dropped)}


__all__ = ["ARModel", "AutoregressiveObjective"]
