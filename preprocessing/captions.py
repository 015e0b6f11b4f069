"""Caption normalisation and the empty/missing-caption policy.

A caption arrives as raw bytes (a ``.txt`` sidecar or tar member), a string (a table cell,
a JSON field) or nothing. Normalisation is: strict UTF-8 decode, Unicode NFC, control
characters removed, whitespace runs collapsed to one space, strip, cap to ``max_chars``
(cut at a word boundary when one is near). Bad captions raise ``CaptionError`` whose
``reason`` is the skip reason counted in the shard stats; the policy ``keep`` instead
stores an empty caption (useful for unconditional or classifier-free-guidance data).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

# Skip reasons this module can produce (see pipeline/shard.py for the full list).
MISSING = "no_caption"
EMPTY = "empty_caption"
NOT_UTF8 = "caption_not_utf8"

_WS = re.compile(r"\s+")


class CaptionError(ValueError):
    """A caption that the policy rejects; ``reason`` is the counted skip reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class CaptionConfig:
    """How captions are cleaned and what happens to samples without one."""

    max_chars: int = 512          # cap after normalisation (0: no cap)
    empty: Literal["skip", "keep"] = "skip"   # policy for missing or empty captions
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {self.max_chars}")


def _strip_controls(text: str) -> str:
    # Category C* (controls, format chars, surrogates, unassigned) except ordinary whitespace,
    # which the collapse below turns into single spaces. Printable text (the common case) has none.
    if text.isprintable():
        return text
    return "".join(ch for ch in text if ch.isspace() or not unicodedata.category(ch).startswith("C"))


def _cap(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space >= max_chars * 3 // 4:  # a word boundary close to the cap
        cut = cut[:space]
    return cut.rstrip()


def normalize_caption(raw: str | bytes | None, cfg: CaptionConfig) -> str:
    """The cleaned caption, or ``CaptionError`` (missing/empty/not UTF-8) under policy ``skip``.

    Under policy ``keep`` a missing or empty caption becomes ``""``; undecodable bytes are
    always an error (storing mojibake would be silent corruption).
    """
    if raw is None:
        if cfg.empty == "keep":
            return ""
        raise CaptionError(MISSING)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CaptionError(NOT_UTF8, str(e)) from None
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the caption
    else:
        text = raw
    text = unicodedata.normalize("NFC", text)
    text = _WS.sub(" ", _strip_controls(text)).strip()
    if cfg.lowercase:
        text = text.lower()
    text = _cap(text, cfg.max_chars)
    if not text and cfg.empty == "skip":
        raise CaptionError(EMPTY)
    return text


__all__ = ["EMPTY", "MISSING", "NOT_UTF8", "CaptionConfig", "CaptionError", "normalize_caption"]
