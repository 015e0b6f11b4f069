"""Decode, validate, orient, convert, resize and re-encode one image; typed errors for bad input.

Order matters for safety and speed:

1. ``Image.open`` only parses the header (Pillow is lazy). The pixel count is checked there,
   *before* any decoding, so a decompression bomb (a tiny file that claims 50k x 50k pixels)
   is rejected without allocating its pixels. Pillow's own ``DecompressionBombError`` is not
   an ``OSError``, so it is caught by name; its warning is silenced because we enforce our
   own limit. Decoders are restricted to a short list of raster formats.
2. Size and aspect filters also use the header (EXIF orientation swaps width and height).
3. For JPEG, ``Image.draft`` asks libjpeg to decode at 1/2, 1/4 or 1/8 scale in the DCT domain
   when the target is that much smaller (the result stays >= the size the resize needs), which
   is most of the decode cost at 256 -> 64 px.
4. ``load()`` runs inside the guard: truncated or corrupt data raises there, not at ``open``.
5. EXIF orientation (``ImageOps.exif_transpose``), then conversion of every mode to RGB:
   palette and alpha images are composited over ``background`` (dropping alpha would expose
   whatever colour the transparent pixels happen to hold), 16-bit greyscale is scaled to 8 bits,
   CMYK/L/1/YCbCr are converted.
6. Resize: ``center-crop`` (shorter side to ``size``, centre square; crop and resample in one
   pass via ``resize(box=...)``), ``pad`` (longer side to ``size``, centred on ``background``),
   or ``none``; then re-encode as jpg/png/webp.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Skip reasons this module can produce.
EMPTY_FILE = "empty_file"
NOT_IMAGE = "not_image"
CORRUPT = "corrupt"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"
UNSUPPORTED_MODE = "unsupported_mode"

# Raster formats we agree to decode (JPEG includes MPO); anything else is "not_image".
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
EXTENSIONS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot or must not be stored; ``reason`` is the counted skip reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ImageConfig:
    """What a stored image looks like and which inputs are rejected."""

    size: int = 64                          # output side in px (square unless resize == "none")
    resize: Literal["center-crop", "pad", "none"] = "center-crop"
    format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 90                       # jpg/webp quality
    filter: Literal["lanczos", "bicubic", "bilinear", "box"] = "lanczos"
    min_size: int = 0                       # reject if the shorter source side is smaller (px)
    max_aspect: float = 0.0                 # reject if long/short side exceeds this (0: no limit)
    max_pixels: int = 64_000_000            # reject before decoding if width*height exceeds this
    background: tuple[int, int, int] = (255, 255, 255)   # pad colour and alpha matte
    draft: bool = True                      # JPEG DCT-domain downscaling when the target is smaller

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 8192:
            raise ValueError(f"size must be between 8 and 8192, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {self.quality}")
        if self.max_aspect and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1 (or 0 for no limit), got {self.max_aspect}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        self.background = tuple(int(c) for c in self.background)  # type: ignore[assignment]
        if any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background}")


@dataclass(frozen=True)
class ProcessedImage:
    """An image ready to store: encoded bytes plus sizes before and after processing."""

    data: bytes
    ext: str                 # "jpg" | "png" | "webp"
    width: int
    height: int
    source_width: int        # after EXIF orientation
    source_height: int
    source_format: str       # Pillow format name, e.g. "JPEG"
    source_mode: str         # Pillow mode before conversion, e.g. "P", "CMYK", "I;16"


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; reject empty, unknown and oversized images before decoding."""
    if not data:
        raise ImageError(EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(TOO_MANY_PIXELS, str(e)) from None
    except UnidentifiedImageError:
        raise ImageError(NOT_IMAGE) from None
    except Exception as e:  # malformed headers raise SyntaxError, struct.error, ValueError, ...
        raise ImageError(CORRUPT, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(CORRUPT, f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(TOO_MANY_PIXELS, f"{w}x{h} > {max_pixels} px")
    return img


def _apply_orientation(img: Image.Image) -> int:
    """Rotate/flip a loaded image in place per its EXIF orientation; returns the tag (1 = none)."""
    if img.format != "TIFF" and "exif" not in img.info:
        return 1  # no EXIF block (TIFF keeps its orientation in the image tags instead)
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
        if orientation != 1:
            ImageOps.exif_transpose(img, in_place=True)
        return orientation
    except Exception:  # a broken EXIF block does not make the pixels bad
        return 1


def _draft_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int] | None:
    """The smallest decode size that still covers what the resize needs, or None (full decode)."""
    if cfg.resize == "none":
        return None
    side = min(w, h) if cfg.resize == "center-crop" else max(w, h)
    r = cfg.size / side
    if r >= 0.5:  # draft cannot reduce by less than 2x
        return None
    return math.ceil(w * r), math.ceil(h * r)


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB (alpha composited over ``background``, 16-bit scaled to 8-bit)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float32)  # [H, W], 0..65535
        return Image.fromarray(np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    raise ImageError(UNSUPPORTED_MODE, mode)


def resize(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Apply ``cfg.resize`` to an RGB image: [h, w] -> [size, size] (or unchanged for "none")."""
    if cfg.resize == "none":
        return img
    w, h = img.size
    resample = _FILTERS[cfg.filter]
    s = cfg.size
    if cfg.resize == "center-crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        if (w, h) == (s, s):
            return img
        return img.resize((s, s), resample, box=(left, top, left + side, top + side))
    # pad: the longer side becomes s, centred on the background colour
    scale = s / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = img if (nw, nh) == (w, h) else img.resize((nw, nh), resample)
    if (nw, nh) == (s, s):
        return small
    canvas = Image.new("RGB", (s, s), cfg.background)
    canvas.paste(small, ((s - nw) // 2, (s - nh) // 2))
    return canvas


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Source image bytes -> the stored image, or ``ImageError`` with a skip reason."""
    img = open_checked(data, cfg.max_pixels)
    fmt, mode = img.format or "?", img.mode
    w, h = img.size  # as stored; both filters are symmetric in width and height
    if cfg.min_size and min(w, h) < cfg.min_size:
        raise ImageError(TOO_SMALL, f"{w}x{h} < {cfg.min_size}")
    if cfg.max_aspect and max(w, h) / min(w, h) > cfg.max_aspect:
        raise ImageError(BAD_ASPECT, f"{w}x{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if cfg.draft and fmt in ("JPEG", "MPO"):
                target = _draft_size(w, h, cfg)
                if target is not None:
                    img.draft(None, target)
            img.load()  # decoding happens here; never call anything that loads before this guard
            orientation = _apply_orientation(img)
            ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            rgb = to_rgb(img, cfg.background)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(TOO_MANY_PIXELS, str(e)) from None
    except Exception as e:  # truncated data, bad Huffman tables, broken zlib streams, ...
        raise ImageError(CORRUPT, f"{type(e).__name__}: {e}") from None
    out = resize(rgb, cfg)
    return ProcessedImage(
        data=encode(out, cfg.format, cfg.quality), ext=cfg.format, width=out.width, height=out.height,
        source_width=ow, source_height=oh, source_format=fmt, source_mode=mode,
    )


__all__ = [
    "BAD_ASPECT", "CORRUPT", "EMPTY_FILE", "NOT_IMAGE", "TOO_MANY_PIXELS", "TOO_SMALL", "UNSUPPORTED_MODE",
    "ImageConfig", "ImageError", "ProcessedImage", "encode", "open_checked", "process_image", "resize", "to_rgb",
]
