from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentpipe.preprocessing.synthetic import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    encode_image,
    make_scene,
)


def test_same_seed_and_index_give_identical_bytes() -> None:
    for index in (0, 7, 123):
        a, b = make_scene(3, index, 64), make_scene(3, index, 64)
        assert encode_image(a.image) == encode_image(b.image)
        assert a.caption == b.caption and a.attributes == b.attributes
    assert encode_image(make_scene(3, 0).image) != encode_image(make_scene(4, 0).image) or (
        make_scene(3, 0).caption != make_scene(4, 0).caption
    )


def _expected_mentions(caption: str, attrs: dict) -> None:
    objs = attrs["objects"]
    assert 1 <= len(objs) <= 3 and attrs["count"] == len(objs)
    words = caption.lower()
    for o in objs:
        assert o["colour"] in words and o["shape"] in words and o["size"] in words, (caption, o)
    # Every object's colour-shape phrase occurs once per object, or as a counted plural.
    groups = Counter((o["size"], o["colour"], o["shape"]) for o in objs)
    for (size, colour, shape), k in groups.items():
        if k > 1 and re.search(rf"\b{COUNT_WORDS[k]} {size} {colour} {shape}s\b", words):
            continue
        assert len(re.findall(rf"\b{size} {colour} {shape}\b", words)) == k, (caption, objs)
    # Positions: stated as a phrase, or implied by a left/right or above/below relation.
    relation = re.search(r"to the (left|right) of|\b(above|below)\b", words)
    if relation is None:
        for o in objs:
            phrase = {"left": "on the left", "right": "on the right", "top": "at the top",
                      "bottom": "at the bottom", "centre": "in the centre"}[o["position"]]
            assert phrase in words, (caption, o)
    else:
        assert len(objs) == 2
        first = words.split(relation.group(0))[0]
        first_obj = next(o for o in objs if f"{o['size']} {o['colour']} {o['shape']}" in first)
        rel = relation.group(1) or relation.group(2)
        expected = {"left": "left", "right": "right", "above": "top", "below": "bottom"}[rel]
        assert first_obj["position"] == expected, (caption, objs)
    if attrs["background"] in words:
        assert f"{attrs['background']} background" in words


def test_captions_agree_with_attributes_and_coverage() -> None:
    seen: dict[str, set[str]] = {"shape": set(), "colour": set(), "size": set(), "position": set()}
    counts, backgrounds, relations, counted = set(), set(), 0, 0
    for i in range(2000):
        s = make_scene(0, i, 32)
        _expected_mentions(s.caption, s.attributes)
        counts.add(s.attributes["count"])
        backgrounds.add(s.attributes["background"])
        relations += bool(re.search(r"to the (left|right) of|above|below", s.caption))
        counted += bool(re.search(r"\b(two|three) ", s.caption))
        for o in s.attributes["objects"]:
            for k in seen:
                seen[k].add(o[k])
    assert seen["shape"] == set(SHAPES) and len(SHAPES) >= 5
    assert seen["colour"] == set(COLOURS) and len(COLOURS) >= 8
    assert seen["size"] == set(SIZES)
    assert seen["position"] == set(POSITIONS)
    assert counts == {1, 2, 3}
    assert backgrounds == set(BACKGROUNDS)
    assert relations > 50 and counted > 50


@pytest.mark.parametrize("size", [32, 57, 256, 512])
def test_any_size_and_antialiased(size: int) -> None:
    img = make_scene(1, 5, size).image
    assert img.size == (size, size) and img.mode == "RGB"
    # Anti-aliased: edge pixels take colours between the background and the object.
    assert len({tuple(p) for p in np.asarray(img).reshape(-1, 3)}) > 3


def test_size_out_of_range() -> None:
    with pytest.raises(ValueError, match="between 32 and 512"):
        make_scene(0, 0, 16)


def test_objects_are_drawn_where_attributes_say() -> None:
    centres = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
               "centre": (0.5, 0.5)}
    for i in range(50):
        s = make_scene(2, i, 128)
        arr = np.asarray(s.image).astype(int)
        for o in s.attributes["objects"]:
            fx, fy = centres[o["position"]]
            px = arr[int(fy * 128), int(fx * 128)]
            assert np.abs(px - np.array(COLOURS[o["colour"]])).max() <= 2, (s.caption, o)


def test_encode_formats() -> None:
    img = make_scene(0, 0, 32).image
    for fmt in ("png", "jpg", "webp"):
        data = encode_image(img, fmt)
        import io

        assert Image.open(io.BytesIO(data)).size == (32, 32)
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(img, "bmp")
