"""Next-token cross-entropy on VQGAN image tokens, with caption dropout for classifier-free guidance.

Teacher forcing over ``[text prefix] + [BOS] + tokens[:-1]`` -> ``tokens``: the loss is the mean
negative log-likelihood of each image token given the caption and the tokens before it in raster
order (DALL·E, Ramesh et al. 2021; the text-token loss is not used since captions are embeddings,
not ids). The softmax runs over the ``codebook_size`` image codes only, the same support the sampler
draws from. With probability ``cond_drop`` a caption is replaced by the learned null prefix
(Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; for AR priors as in Parti / Make-A-Scene).

In training the dropout draw of a sample is a pure function of (sample key, step): the same
captions are dropped whatever the world size, and a resumed run drops exactly what an
uninterrupted one would, independent of any global RNG state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# model(ids [B, n], text, text_mask, keep=n) -> (logits [B, n, vocab], cache); see training/models/ar.py
ARModel = Callable[..., tuple[torch.Tensor, Any]]


def keyed_uniform(keys: Sequence[str], step: int) -> torch.Tensor:
    """One uniform draw in [0, 1) per key, a pure function of (key, step): float64 [B]."""
    words = [hashlib.blake2b(f"{step}:{k}".encode(), digest_size=8).digest() for k in keys]
    return torch.tensor([int.from_bytes(w, "little") >> 11 for w in words], dtype=torch.float64) / 2.0**53


class AutoregressiveObjective:
    """Next-token cross-entropy of the image tokens of a batch."""

    def __init__(self, codebook_size: int, cond_drop: float = 0.1) -> None:
        if not 0.0 <= cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {cond_drop}")
        self.codebook_size = codebook_size
        self.cond_drop = cond_drop

    def drop_mask(self, text_mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``text_mask`` [B, L] with row i cleared where ``u[i] < cond_drop`` (caption dropped); u: [B] in [0, 1)."""
        return text_mask & (u.to(text_mask.device) >= self.cond_drop).unsqueeze(1)

    def loss(
        self,
        model: ARModel,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Mean cross-entropy (nats per image token) and logs.

        Args:
            model: the AR prior (or its DeepSpeed engine).
            batch: ``tokens`` int [B, N] in raster order, ``text`` float [B, L, D] and
                ``text_mask`` bool [B, L] (the latent-shard batch of training/data.py).
            generator: RNG for caption dropout when ``step`` is None (default: the global RNG).
            step: training step; with the batch's ``__key__`` list the dropout is keyed on (key, step).
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
        mask = text_mask
        if self.cond_drop > 0:
            if step is not None and "__key__" in batch:
                u = keyed_uniform(batch["__key__"], step)  # [B]
            else:
                u = torch.rand(b, generator=generator, device=generator.device if generator else text_mask.device)
            mask = self.drop_mask(text_mask, u)
        bos = torch.full((b, 1), self.codebook_size, dtype=torch.long, device=tokens.device)
        ids = torch.cat([bos, tokens[:, :-1]], dim=1)  # [B, N]: BOS, t_0 .. t_{N-2}
        logits, _ = model(ids, batch["text"], mask, keep=n)  # [B, N, vocab]
        logits = logits[..., : self.codebook_size]  # [B, N, K]
        loss = F.cross_entropy(logits.reshape(b * n, -1), tokens.reshape(b * n))
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens).float().mean()
            dropped = (text_mask.any(1) & ~mask.any(1)).float().mean()
        return loss, {"ce": loss.detach(), "token_acc": acc, "cond_dropped": dropped}


__all__ = ["ARModel", "AutoregressiveObjective", "keyed_uniform"]
