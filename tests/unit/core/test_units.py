from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotewatch.core.units import format_e8, parse_e8, to_float


def test_trimmed_and_padded_spellings_give_the_same_key() -> None:
    assert parse_e8("8041.33000000") == parse_e8("8041.33") == 804_133_000_000
    assert parse_e8("8042.9") == parse_e8("8042.90000000") == 804_290_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 100_000_000),
        ("0.00000001", 1),
        (".5", 50_000_000),
        ("12.", 1_200_000_000),
        ("0.000000010000", 1),
        ("65000.01", 6_500_001_000_000),
    ],
)
def test_parse_exact_values(text: str, expected: int) -> None:
    assert parse_e8(text) == expected


@pytest.mark.parametrize("text", ["", ".", "-1", "1e5", "abc", "1.2.3", "0.000000001", "１２", " 1", "1,5", "nan"])
def test_parse_rejects_what_it_cannot_represent_exactly(text: str) -> None:
    with pytest.raises(ValueError, match=r"decimal|significant"):
        parse_e8(text)


@given(st.decimals(min_value=0, max_value=10**10, places=8, allow_nan=False, allow_infinity=False))
def test_parse_matches_decimal_and_round_trips(value: Decimal) -> None:
    text = format(value, "f")
    parsed = parse_e8(text)
    assert parsed == int(value * 10**8)
    assert Decimal(format_e8(parsed)) == value
    assert parse_e8(format_e8(parsed)) == parsed


def test_format_is_canonical() -> None:
    assert format_e8(804_133_000_000) == "8041.33"
    assert format_e8(100_000_000) == "1"
    assert format_e8(1) == "0.00000001"
    assert to_float(50_000_000) == 0.5
