"""Exact fixed-point prices and sizes.

Coinbase sends prices and sizes as decimal strings, sometimes trimmed (``"8042.9"``) and
sometimes padded (``"8041.33000000"``). Every book key must be exact and the same value must
give the same key whatever its spelling, so values are kept as integers scaled by 1e8
(``price_e8``), like satoshis. Parsing never goes through a float.
"""

from __future__ import annotations

SCALE_DIGITS = 8
SCALE = 10**SCALE_DIGITS
_ZEROS = "0" * SCALE_DIGITS
_FRACTION_SCALE = tuple(10 ** (SCALE_DIGITS - digits) for digits in range(SCALE_DIGITS + 1))


def parse_e8(text: str) -> int:
    """Parse a non-negative decimal string into an exact integer scaled by 1e8.

    ``parse_e8("8041.33000000") == parse_e8("8041.33") == 804133000000``.

    Raises:
        ValueError: the string is not a plain non-negative decimal, or it carries a non-zero
            digit beyond the 8th decimal (which cannot be represented exactly).
    """
    whole, _, frac = text.partition(".")
    # Fast path (every price and size the exchange sends): ASCII digits around at most one dot and
    # at most 8 decimals -> one int() of the digits, scaled. Anything else takes the checks below.
    if len(frac) <= SCALE_DIGITS and text.isascii():
        digits = whole + frac
        if digits.isdigit():
            return int(digits) * _FRACTION_SCALE[len(frac)]
    if not (whole or frac) or not _is_digits(whole) or not _is_digits(frac):
        raise ValueError(f"not a non-negative decimal: {text!r}")
    if len(frac) > SCALE_DIGITS:
        if frac[SCALE_DIGITS:].strip("0"):
            raise ValueError(f"more than {SCALE_DIGITS} significant decimals: {text!r}")
        frac = frac[:SCALE_DIGITS]
    return int(whole or "0") * SCALE + int((frac + _ZEROS)[:SCALE_DIGITS])


def _is_digits(part: str) -> bool:
    """ASCII digits only (or empty): ``str.isdigit`` alone accepts other scripts' digits."""
    return part.isascii() and (part.isdigit() or part == "")


def format_e8(value: int) -> str:
    """The canonical decimal string of a value scaled by 1e8 (no trailing zeros)."""
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), SCALE)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:0{SCALE_DIGITS}d}".rstrip("0")


def to_float(value_e8: int) -> float:
    """The nearest float of a value scaled by 1e8, for features and display only."""
    return value_e8 / SCALE
