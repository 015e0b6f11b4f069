"""``synthetic:N`` sources: the built-in captioned scenes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from latentpipe.preprocessing.sources.base import (
    RawSample,
    Source,
)
from latentpipe.preprocessing.synthetic import encode_image, make_scene


class SyntheticSource(Source):
    """``synthetic:N``: the built-in captioned scenes (PNG, lossless, with their attributes)."""

    kind = "synthetic"

    def __init__(self, n: int, seed: int, size: int) -> None:
        self.num_inputs, self.seed, self.size = n, seed, size

    def _fingerprint_items(self) -> Iterable[str]:
        yield f"{self.num_inputs}|{self.seed}|{self.size}"

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for index in range(start, stop):
            scene = make_scene(self.seed, index, self.size)
            yield RawSample(index, f"synthetic:{self.seed}:{index}", data=encode_image(scene.image, "png"),
                            caption=scene.caption, meta={"attributes": scene.attributes})
