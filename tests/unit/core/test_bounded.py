"""Bounded JSON (quotewatch.core.bounded) and the parsers of offset metadata built on it.

Before: ``json.loads("[" * 1000)`` raised RecursionError (not a ValueError), and offset metadata
of ``[`` x 1000 raised it inside the processor's ``_on_assign``/``_rewind``: a crash loop for
whoever may commit offsets for the group.
"""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from quotewatch.core.bounded import check_depth, field_int, field_str, parse_json, parse_json_object
from quotewatch.core.errors import UntrustedInputError
from quotewatch.core.runtime import restart_offset_from_metadata

# JSON-ish text: brackets, quotes, escapes, numbers (1e999 among them), and any other characters.
hostile_text = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.sampled_from(["[", "]", "{", "}", '"', "\\", ",", ":", "1e999", "-1", '"restart"', "null", "9" * 30, " "]),
        max_size=2000,
    ).map("".join),
    st.integers(min_value=1, max_value=5000).map(lambda n: "[" * n),
)


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_is_refused_before_parsing(opener: str) -> None:
    with pytest.raises(UntrustedInputError, match="nested deeper than 16 levels"):
        parse_json(opener * 100_000, what="text", max_bytes=10**7)
    assert parse_json("[" * 16 + "]" * 16, what="text", max_bytes=100) == [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = json.dumps({"reason": "[" * 500 + '\\"{' * 50})
    assert parse_json_object(text, what="text", max_bytes=10_000)["reason"].startswith("[[[")
    check_depth(text.encode(), 1, "text")


def test_size_numbers_and_types_are_checked() -> None:
    with pytest.raises(UntrustedInputError, match="more than the 10 allowed"):
        parse_json('{"a": 1234567}', what="text", max_bytes=10)
    with pytest.raises(UntrustedInputError, match="not JSON"):
        parse_json("1e999", what="text", max_bytes=100)
    with pytest.raises(UntrustedInputError, match="not JSON"):
        parse_json("NaN", what="text", max_bytes=100)
    with pytest.raises(UntrustedInputError, match="not an object"):
        parse_json_object("[1]", what="text", max_bytes=100)
    payload = parse_json_object(
        '{"n": 5, "b": true, "f": 5.0, "s": "x", "big": 99999999999999999999}', what="t", max_bytes=100
    )
    assert field_int(payload, "n", what="t", maximum=5) == 5
    for key in ("b", "f", "s", "missing", "big"):
        with pytest.raises(UntrustedInputError, match="not an integer"):
            field_int(payload, key, what="t")
    with pytest.raises(UntrustedInputError, match="outside"):
        field_int(payload, "n", what="t", minimum=6)
    assert field_str(payload, "s", what="t", max_length=1) == "x"
    with pytest.raises(UntrustedInputError, match="more than 0"):
        field_str(payload, "s", what="t", max_length=0)


@hypothesis_settings(max_examples=300)
@given(text=hostile_text)
def test_bounded_json_raises_only_its_own_error(text: str) -> None:
    with contextlib.suppress(UntrustedInputError):
        parse_json(text, what="fuzz", max_bytes=4096, max_depth=8)


def test_offset_metadata_of_a_thousand_brackets_is_ignored_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="quotewatch.core.runtime"):
        assert restart_offset_from_metadata("[" * 1000, "qw.md.events[0]") is None
    assert "offset metadata of qw.md.events[0]: JSON nested deeper" in caplog.text
    assert restart_offset_from_metadata('{"restart": 41}') == 41
    for foreign in (
        '{"restart": -1}',
        '{"restart": 1e999}',
        '{"restart": true}',
        '{"restart": "7"}',
        "[41]",
        "x" * 5000,
    ):
        assert restart_offset_from_metadata(foreign) is None, foreign
    assert restart_offset_from_metadata('{"restart": null}') is None
    assert restart_offset_from_metadata("") is None


@hypothesis_settings(max_examples=300)
@given(text=hostile_text)
def test_offset_metadata_fuzz_gives_an_offset_or_none(text: str) -> None:
    restart = restart_offset_from_metadata(text)
    assert restart is None or (isinstance(restart, int) and restart >= 0)
