"""Image processing: every bad-input kind gives its reason; modes, orientation, resize, formats."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from latentpipe.preprocessing import images as im
from latentpipe.preprocessing.images import ImageConfig, ImageError, process_image
from latentpipe.preprocessing.synthetic import make_scene


def _bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _png_with_broken_stream() -> bytes:
    """A PNG with a valid header and CRCs whose compressed pixel stream is garbage."""
    buf = io.BytesIO()
    make_scene(0, 1, 64).image.save(buf, format="PNG")
    d = buf.getvalue()
    i = d.index(b"IDAT")
    n = struct.unpack(">I", d[i - 4:i])[0]
    bad = d[i + 4:i + 6] + bytes((x * 7 + 3) % 256 for x in range(n - 2))
    return d[:i + 4] + bad + struct.pack(">I", zlib.crc32(b"IDAT" + bad)) + d[i + 8 + n:]


def _reason(data: bytes, cfg: ImageConfig | None = None) -> str:
    with pytest.raises(ImageError) as e:
        process_image(data, cfg or ImageConfig(size=32))
    return e.value.reason


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_bad_inputs_have_specific_reasons() -> None:
    jpeg = _bytes(make_scene(0, 1, 64).image, "JPEG")
    assert _reason(b"") == im.EMPTY_FILE
    assert _reason(b"hello, I am a text file named cat.jpg") == im.NOT_IMAGE
    assert _reason(b"<html><body>404</body></html>") == im.NOT_IMAGE
    assert _reason(jpeg[: len(jpeg) // 2]) == im.CORRUPT          # truncated
    assert _reason(_png_with_broken_stream()) == im.CORRUPT         # valid header, garbage pixel stream
    assert _reason(_bytes(Image.new("F", (8, 8)), "TIFF")) == im.UNSUPPORTED_MODE
    # a PSD is a real image format, but not one we agree to decode
    assert _reason(b"8BPS" + b"\0" * 40) == im.NOT_IMAGE


def test_decompression_bomb_rejected_from_the_header() -> None:
    bomb = _png_claiming(100_000, 100_000)  # 10^10 px claimed by < 100 bytes
    assert len(bomb) < 100
    assert _reason(bomb) == im.TOO_MANY_PIXELS
    # even with our own limit raised past Pillow's, Pillow's DecompressionBombError is caught by name
    assert _reason(bomb, ImageConfig(size=32, max_pixels=10**12)) == im.TOO_MANY_PIXELS
    # and a real, decodable image over a small configured limit
    assert _reason(_bytes(Image.new("RGB", (300, 300)), "PNG"), ImageConfig(size=32, max_pixels=50_000)) == \
        im.TOO_MANY_PIXELS
    with pytest.raises(ImageError):
        im.open_checked(bomb, 10**6)


def test_size_and_aspect_filters_use_oriented_size() -> None:
    img = _bytes(Image.new("RGB", (100, 20), (10, 20, 30)), "PNG")
    assert _reason(img, ImageConfig(size=32, min_size=32)) == im.TOO_SMALL
    assert _reason(img, ImageConfig(size=32, max_aspect=4.0)) == im.BAD_ASPECT
    assert process_image(img, ImageConfig(size=32, max_aspect=5.0, min_size=20)).width == 32


def test_modes_convert_to_rgb() -> None:
    cfg = ImageConfig(size=16, resize="none", format="png", background=(0, 255, 0))
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 0  # palette index 0 (red) is transparent
    out = _decoded(process_image(_bytes(pal, "PNG", transparency=0), cfg).data)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (0, 255, 0)  # the matte, not red
    rgba = Image.new("RGBA", (16, 16), (200, 0, 0, 0))
    assert _decoded(process_image(_bytes(rgba, "PNG"), cfg).data).getpixel((0, 0)) == (0, 255, 0)
    la = Image.new("LA", (16, 16), (100, 255))
    assert _decoded(process_image(_bytes(la, "PNG"), cfg).data).getpixel((0, 0)) == (100, 100, 100)
    g16 = Image.fromarray(np.full((16, 16), 65535, np.uint16))
    r = process_image(_bytes(g16, "PNG"), cfg)
    assert r.source_mode.startswith("I") and _decoded(r.data).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((16, 16), 32896, np.uint16))  # 128 * 257
    assert _decoded(process_image(_bytes(half, "PNG"), cfg).data).getpixel((0, 0)) == (128, 128, 128)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    px = _decoded(process_image(_bytes(cmyk, "JPEG", quality=95), cfg).data).getpixel((8, 8))
    assert px[0] > 200 and px[1] < 60 and px[2] < 60
    for mode in ("L", "1"):
        assert _decoded(process_image(_bytes(Image.new(mode, (16, 16), 1), "PNG"), cfg).data).mode == "RGB"
    gif = process_image(_bytes(Image.new("P", (16, 16), 3), "GIF"), cfg)
    assert gif.source_format == "GIF" and _decoded(gif.data).mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 40, 10))  # stored: red top half, blue bottom half
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    r = process_image(_bytes(src, "JPEG", quality=95, exif=exif), ImageConfig(size=16, resize="none", format="png"))
    assert (r.width, r.height, r.source_width, r.source_height) == (20, 40, 20, 40)
    out = _decoded(r.data)
    right, left = out.getpixel((17, 20)), out.getpixel((2, 20))
    assert right[0] > 200 and right[2] < 60  # the top went to the right
    assert left[2] > 200 and left[0] < 60


def test_resize_modes() -> None:
    src = Image.new("RGB", (80, 40), (250, 0, 0))
    src.paste((0, 0, 250), (0, 0, 20, 40))  # a blue left quarter that centre-crop removes
    data = _bytes(src, "PNG")
    crop = _decoded(process_image(data, ImageConfig(size=32, resize="center-crop", format="png")).data)
    assert crop.size == (32, 32) and crop.getpixel((0, 16))[2] < 30
    pad = _decoded(process_image(data, ImageConfig(size=32, resize="pad", format="png", background=(0, 0, 0))).data)
    assert pad.size == (32, 32) and pad.getpixel((16, 1)) == (0, 0, 0) and pad.getpixel((28, 16))[0] > 200
    none = process_image(data, ImageConfig(size=32, resize="none", format="png"))
    assert (none.width, none.height) == (80, 40)


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats(fmt: str, pil: str) -> None:
    r = process_image(_bytes(make_scene(0, 2, 64).image, "PNG"), ImageConfig(size=32, format=fmt))  # type: ignore[arg-type]
    out = _decoded(r.data)
    assert r.ext == fmt and out.format == pil and out.size == (32, 32) and out.mode == "RGB"


def test_draft_mode_keeps_quality() -> None:
    data = _bytes(make_scene(0, 3, 256).image, "JPEG", quality=95)
    exact = process_image(data, ImageConfig(size=64, draft=False, format="png"))
    fast = process_image(data, ImageConfig(size=64, draft=True, format="png"))
    a = np.asarray(_decoded(exact.data), np.float64)
    b = np.asarray(_decoded(fast.data), np.float64)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-9))
    assert a.shape == b.shape == (64, 64, 3)
    assert psnr > 30.0, psnr


def test_config_validation() -> None:
    for bad in ({"size": 2}, {"quality": 0}, {"max_aspect": 0.5}, {"max_pixels": 0}, {"background": (0, 0, 300)}):
        with pytest.raises(ValueError):
            ImageConfig(**bad)  # type: ignore[arg-type]
