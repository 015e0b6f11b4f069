"""Caption normalisation and the empty/missing-caption policy."""

from __future__ import annotations

import pytest

from latentpipe.preprocessing.captions import (
    EMPTY,
    MISSING,
    NOT_UTF8,
    CaptionConfig,
    CaptionError,
    normalize_caption,
)


def test_nfc_whitespace_and_controls() -> None:
    raw = "  Cafe\u0301 \t\n au   lait\u0000\u200b!\r\n"  # decomposed e + acute, NUL, zero-width space
    assert normalize_caption(raw, CaptionConfig()) == "Caf\u00e9 au lait!"


def test_bytes_are_strict_utf8_and_bom_is_dropped() -> None:
    assert normalize_caption("\ufeffa red circle".encode(), CaptionConfig()) == "a red circle"
    with pytest.raises(CaptionError) as e:
        normalize_caption(b"caf\xe9 latin-1", CaptionConfig())
    assert e.value.reason == NOT_UTF8
    with pytest.raises(CaptionError):  # even when empty captions are kept: mojibake is never stored
        normalize_caption(b"\xff\xfe", CaptionConfig(empty="keep"))


def test_length_cap_prefers_a_word_boundary() -> None:
    text = "one two three four five six seven eight nine ten"
    out = normalize_caption(text, CaptionConfig(max_chars=20))
    assert out == "one two three four"
    assert normalize_caption("x" * 50, CaptionConfig(max_chars=10)) == "x" * 10
    assert normalize_caption(text, CaptionConfig(max_chars=0)) == text


def test_empty_and_missing_policy() -> None:
    skip, keep = CaptionConfig(empty="skip"), CaptionConfig(empty="keep")
    for raw, reason in ((None, MISSING), ("", EMPTY), (" \n\t ", EMPTY), (b"", EMPTY), ("\u200b", EMPTY)):
        with pytest.raises(CaptionError) as e:
            normalize_caption(raw, skip)
        assert e.value.reason == reason
        assert normalize_caption(raw, keep) == ""


def test_lowercase_option_and_bad_config() -> None:
    assert normalize_caption("A Red Circle", CaptionConfig(lowercase=True)) == "a red circle"
    with pytest.raises(ValueError, match="max_chars"):
        CaptionConfig(max_chars=-1)
