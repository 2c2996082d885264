"""Bounded parsing of JSON we did not write: size and nesting are checked before parsing, types after.

Every JSON text that comes from outside the process -- a control record's text on ``md.raw``, the
offset metadata a consumer group stores, a Parquet footer in the lake, a webhook body -- goes
through :func:`parse_json` (or :func:`parse_json_object`), then its fields through
:func:`field_int` / :func:`field_str`. All of them raise
:class:`~quotewatch.core.errors.UntrustedInputError` and nothing else, so a crafted text can cost at
most ``max_bytes`` of parsing and never escapes as ``RecursionError`` or ``OverflowError``.

Why not ``json.loads`` alone: the standard parser recurses once per ``[``, so about a thousand of
them raise ``RecursionError`` (not a ``ValueError``), and ``1e999`` parses to ``inf``, which
``int()`` turns into ``OverflowError``. The depth is checked on the raw text first: counting the
brackets is enough for nearly every text (fewer brackets than the limit cannot nest deeper), and
only a text with more brackets is scanned, strings blanked out, up to the first excess. Parsing is
orjson's (no recursion limit to hit: it refuses more than 1024 levels itself; ``NaN``,
``Infinity`` and out-of-range numbers are errors, not values).
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from quotewatch.core.errors import UntrustedInputError

JsonObject = dict[str, Any]  # not a topic record: a parsed JSON object of text we did not write
DEFAULT_MAX_DEPTH: Final = 16
"""Nesting deeper than this is refused (QuoteWatch's own JSON texts nest at most 3 levels)."""
INT64_MAX: Final = 2**63 - 1

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_OPENERS = frozenset(b"[{")


def check_depth(data: bytes, max_depth: int, what: str) -> None:
    """Raise when the JSON text ``data`` nests arrays/objects deeper than ``max_depth``.

    Cheap for ordinary texts: with at most ``max_depth`` opening brackets (inside strings or not)
    the text cannot be deeper. Otherwise strings are blanked out and the brackets walked, stopping
    at the first level too deep.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if match.group()[0] in _OPENERS:
            depth += 1
            if depth > max_depth:
                raise UntrustedInputError(f"{what}: JSON nested deeper than {max_depth} levels")
        else:
            depth -= 1


def parse_json(text: str | bytes, *, what: str, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse the JSON ``text`` of at most ``max_bytes`` bytes and ``max_depth`` levels of nesting.

    Args:
        what: names the text in the error message (e.g. ``"offset metadata of qw.md.events[0]"``).

    Raises:
        UntrustedInputError: too long, too deep, or not JSON.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > max_bytes:
        raise UntrustedInputError(f"{what}: {len(data)} bytes of JSON, more than the {max_bytes} allowed")
    check_depth(data, max_depth, what)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UntrustedInputError(f"{what}: not JSON: {exc}") from None


def parse_json_object(
    text: str | bytes, *, what: str, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH
) -> JsonObject:
    """:func:`parse_json`, and the value must be a JSON object."""
    value = parse_json(text, what=what, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(value, dict):
        raise UntrustedInputError(f"{what}: a JSON {type(value).__name__}, not an object")
    return value


def field_int(payload: JsonObject, key: str, *, what: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """``payload[key]`` as an integer in ``[minimum, maximum]`` (a JSON integer: no bool, no float)."""
    value = payload.get(key)
    if type(value) is not int:
        raise UntrustedInputError(f"{what}: {key!r} is {_describe(value)}, not an integer")
    if not minimum <= value <= maximum:
        raise UntrustedInputError(f"{what}: {key!r} = {value} is outside [{minimum}, {maximum}]")
    return value


def field_str(payload: JsonObject, key: str, *, what: str, max_length: int) -> str:
    """``payload[key]`` as a string of at most ``max_length`` characters."""
    value = payload.get(key)
    if not isinstance(value, str):
        raise UntrustedInputError(f"{what}: {key!r} is {_describe(value)}, not a string")
    if len(value) > max_length:
        raise UntrustedInputError(f"{what}: {key!r} is {len(value)} characters long, more than {max_length}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "missing or null"
    return f"a {type(value).__name__}"
