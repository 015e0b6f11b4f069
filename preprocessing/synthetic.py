"""The built-in captioned-scene generator: the embedded default dataset.

For a ``(seed, index)`` pair it deterministically draws 1 to 3 objects (shape, colour,
size, position) on a coloured background, anti-aliased by supersampling, and a caption
from several templates, including spatial relations ("a red circle to the left of a blue
square") and counts ("two small green triangles at the top and at the bottom"). Every
caption states every object's shape, colour, size and position, so the structured
attributes that come with each sample are exactly what a generated image can be scored
against (``training/evaluation.py``).
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (35, 70, 215),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Muted backgrounds; object colours too close to a background are not drawn on it.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (214, 200, 170),
    "dark": (50, 50, 60),
    "teal": (60, 110, 110),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
COUNT_WORDS = {2: "two", 3: "three"}

# Object centre as a fraction of the image side; radius likewise, per size.
# Centres are 0.28 apart at the closest, so even two large objects never overlap.
_CENTRES = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "centre": (0.5, 0.5)}
_RADII = {"small": 0.085, "large": 0.135}
_POS_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_MIN_CONTRAST = 90.0  # Euclidean RGB distance between an object colour and its background


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self, article: bool = True) -> str:
        words = f"{self.size} {self.colour} {self.shape}"
        return f"a {words}" if article else words


@dataclass(frozen=True)
class Scene:
    """One generated sample: the image, its caption and its structured attributes."""

    image: Image.Image
    caption: str
    attributes: dict[str, Any]


def _rng(seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across platforms/runs.
    return random.Random(f"latentpipe-synth:{seed}:{index}")


def _allowed_colours(background: str) -> list[str]:
    bg = BACKGROUNDS[background]
    return [name for name, rgb in COLOURS.items() if math.dist(rgb, bg) >= _MIN_CONTRAST]


def sample_attributes(seed: int, index: int) -> dict[str, Any]:
    """The scene description for ``(seed, index)``: background and 1 to 3 objects."""
    rng = _rng(seed, index)
    background = rng.choice(list(BACKGROUNDS))
    colours = _allowed_colours(background)
    n = rng.choice((1, 1, 2, 2, 2, 3))
    positions = rng.sample(POSITIONS, n)
    if n > 1 and rng.random() < 0.3:  # a counted group of identical objects
        shape, colour, size = rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES)
        objs = [SceneObject(shape, colour, size, p) for p in positions]
    else:
        objs = [SceneObject(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), p) for p in positions]
    objs.sort(key=lambda o: POSITIONS.index(o.position))
    return {
        "background": background,
        "count": n,
        "objects": [o.__dict__.copy() for o in objs],
        "template": rng.randrange(1 << 30),  # drives caption wording only
    }


def caption_for(attributes: dict[str, Any]) -> str:
    """A caption that states every object's shape, colour, size and position."""
    rng = random.Random(attributes["template"])
    objs = [SceneObject(**o) for o in attributes["objects"]]
    bg = attributes["background"]
    positions = {o.position for o in objs}
    same = len({(o.shape, o.colour, o.size) for o in objs}) == 1
    if len(objs) > 1 and same:
        o = objs[0]
        where = " and ".join(_POS_PHRASE[x.position] for x in objs)
        text = f"{COUNT_WORDS[len(objs)]} {o.size} {o.colour} {o.shape}s {where}"
    elif len(objs) == 2 and positions in ({"left", "right"}, {"top", "bottom"}) and rng.random() < 0.7:
        first, second = objs if rng.random() < 0.5 else objs[::-1]
        relation = {
            "left": "to the left of",
            "right": "to the right of",
            "top": "above",
            "bottom": "below",
        }[first.position]
        text = f"{first.phrase()} {relation} {second.phrase()}"
    elif len(objs) == 1 and rng.random() < 0.5:
        o = objs[0]
        text = f"{_POS_PHRASE[o.position]}, {o.phrase()}"
        text = text[0].upper() + text[1:] if rng.random() < 0.3 else text
    else:
        parts = [f"{o.phrase()} {_POS_PHRASE[o.position]}" for o in objs]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    style = rng.randrange(3)
    if style == 1:
        text += f" on a {bg} background"
    elif style == 2:
        text = f"{bg} background with {text}"
    return text


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(k: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(phase + 2 * math.pi * i / k), cy + radius * math.sin(phase + 2 * math.pi * i / k))
            for i in range(k)
        ]

    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring(3, r * 1.05, -math.pi / 2)
    if shape == "diamond":
        return ring(4, r * 1.05, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r * 1.05, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


def render(attributes: dict[str, Any], size: int) -> Image.Image:
    """Draw the scene at ``size`` x ``size`` RGB, anti-aliased by supersampling."""
    if not 32 <= size <= 512:
        raise ValueError(f"image size must be between 32 and 512 px, got {size}")
    ss = 4 if size <= 128 else 2
    big = size * ss
    img = Image.new("RGB", (big, big), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(img)
    for o in attributes["objects"]:
        fx, fy = _CENTRES[o["position"]]
        cx, cy, r = fx * big, fy * big, _RADII[o["size"]] * big
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(o["shape"], cx, cy, r), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def make_scene(seed: int, index: int, size: int = 32) -> Scene:
    """The sample ``index`` of the dataset ``seed``: image, caption and attributes."""
    attributes = sample_attributes(seed, index)
    return Scene(render(attributes, size), caption_for(attributes), attributes)


def iter_scenes(n: int, seed: int = 0, size: int = 32, start: int = 0) -> Iterator[tuple[int, Scene]]:
    for index in range(start, start + n):
        yield index, make_scene(seed, index, size)


ImageFormat = Literal["png", "jpg", "webp"]


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """Image bytes in ``fmt`` (png is lossless; jpg/webp at ``quality``)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r} (png, jpg or webp)")
    return buf.getvalue()


def sample_key(index: int) -> str:
    return f"{index:08d}"


def write_folder(out: Path, scenes: Iterator[tuple[int, Scene]], fmt: str = "png") -> int:
    """Write ``<key>.<fmt>``, ``<key>.txt`` and ``<key>.json`` per scene; returns the count."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for index, scene in scenes:
        key = sample_key(index)
        (out / f"{key}.{fmt}").write_bytes(encode_image(scene.image, fmt))
        (out / f"{key}.txt").write_text(scene.caption, encoding="utf-8")
        (out / f"{key}.json").write_text(json.dumps(scene.attributes), encoding="utf-8")
        n += 1
    return n


def write_parquet(
    path: Path, scenes: Iterator[tuple[int, Scene]], fmt: str = "png", rows_per_group: int = 1000
) -> int:
    """Write one parquet table with columns key, image (bytes), caption, attributes (JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("attributes", pa.string())]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        rows: dict[str, list[Any]] = {name: [] for name in schema.names}

        def flush() -> None:
            if rows["key"]:
                writer.write_table(pa.table(rows, schema=schema))
                for v in rows.values():
                    v.clear()

        for index, scene in scenes:
            rows["key"].append(sample_key(index))
            rows["image"].append(encode_image(scene.image, fmt))
            rows["caption"].append(scene.caption)
            rows["attributes"].append(json.dumps(scene.attributes))
            n += 1
            if len(rows["key"]) >= rows_per_group:
                flush()
        flush()
    tmp.replace(path)
    return n
