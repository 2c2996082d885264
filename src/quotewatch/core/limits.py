"""How large a decoded record may be, per schema: array items and string lengths.

Avro is compact where Python is not: an empty book level is 2 bytes on the wire and ~200 bytes as
a dict, so a 4 MB ``MarketEvent`` of 2 M empty levels decodes in seconds into hundreds of MiB, and
one at the topic's 32 MiB limit would take GBs. :class:`AvroSerde` (every consumer decodes through
it) therefore checks each record against the :class:`RecordLimits` of its schema and raises
:class:`~quotewatch.core.errors.RecordLimitError` -- a :class:`~quotewatch.core.errors.DecodeError`,
so the record is dead-lettered with its coordinates like any undecodable bytes.

- **Array items** (all arrays of a record together) are counted **before** decoding, by a scan of
  the Avro body that reads only block counts and lengths (:class:`ArrayScan`): nothing is built.
  The scan runs only for a body larger than ``max_items`` x the smallest encoded item of the
  writer schema -- a smaller body cannot hold too many items -- so ordinary records (updates,
  trades, ticks, features) never pay for it; a large snapshot pays ~1 ms next to its ~50 ms decode.
- **Strings** are checked after decoding (a string decodes to at most its encoded size, so nothing
  is amplified), by field name, and only for a record longer than the smallest string limit.

The limits are far above anything QuoteWatch writes: the deepest real book in the captures
(BTC-USD, Advanced Trade, 2026) is a snapshot of 46,000 levels; the limit is 250,000.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from quotewatch.core.errors import DecodeError, RecordLimitError

MAX_BOOK_LEVELS: Final = 250_000
"""Levels of one snapshot (bids and asks) or level changes of one update."""
IDENTIFIER_CHARS: Final = 1024
"""Names, ids, symbols, states: any string without a limit of its own."""


@dataclass(frozen=True)
class RecordLimits:
    """The limits of one record schema."""

    max_items: int
    """Items of all the arrays of one record together."""
    max_string: int = IDENTIFIER_CHARS
    """Characters (or bytes) of a string or bytes field not named in ``strings``."""
    strings: Mapping[str, int | None] = field(default_factory=dict)
    """Own limits of fields by name (at any depth); None: only the message size bounds it."""

    def string_limit(self, field_name: str) -> int | None:
        return self.strings.get(field_name, self.max_string)


DEFAULT_LIMITS: Final = RecordLimits(max_items=1_000_000, max_string=1024 * 1024)
"""For a record schema without an entry in :data:`RECORD_LIMITS` (none in the catalog)."""

RECORD_LIMITS: Final[Mapping[str, RecordLimits]] = {
    "quotewatch.MarketEvent": RecordLimits(max_items=MAX_BOOK_LEVELS, strings={"detail": 8192}),
    # text: a whole WebSocket frame (a snapshot is MBs): the topic's message size bounds it.
    "quotewatch.RawFrame": RecordLimits(max_items=10_000, strings={"text": None}),
    "quotewatch.BookTop": RecordLimits(max_items=1_000),
    "quotewatch.FeatureVector": RecordLimits(max_items=10_000),
    "quotewatch.Label": RecordLimits(max_items=0),
    "quotewatch.Prediction": RecordLimits(max_items=0),
    "quotewatch.Snapshot": RecordLimits(max_items=10_000),
    # The original bytes of a dead letter are whatever was refused (bounded by the message size).
    "quotewatch.DeadLetter": RecordLimits(
        max_items=0, strings={"source_value": None, "source_key": None, "reason": 1024 * 1024}
    ),
}


def limits_for(schema_name: str) -> RecordLimits:
    """The limits of the record schema ``schema_name`` (full name)."""
    return RECORD_LIMITS.get(schema_name, DEFAULT_LIMITS)


# -- the array scan (before decoding) ----------------------------------------------------------------

_Skip = Callable[["_Cursor", int], int]


class _Cursor:
    """The bytes being scanned, the items counted so far, and where varints end (computed lazily)."""

    __slots__ = ("_ends", "data", "items", "max_items", "what")

    def __init__(self, data: bytes, max_items: int, what: str) -> None:
        self.data = data
        self.items = 0
        self.max_items = max_items
        self.what = what
        self._ends: NDArray[np.intp] | None = None

    def long(self, position: int) -> tuple[int, int]:
        """The zig-zag varint at ``position`` and the position after it."""
        data = self.data
        shift = result = 0
        while True:
            if position >= len(data) or shift > 63:
                raise DecodeError(f"{self.what}: truncated or invalid varint")
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return (result >> 1) ^ -(result & 1), position
            shift += 7

    def skip_varints(self, position: int, count: int) -> int:
        """The position after ``count`` varints starting at ``position`` (vectorised: no Python loop)."""
        if count == 0:
            return position
        if self._ends is None:
            self._ends = np.flatnonzero(np.frombuffer(self.data, dtype=np.uint8) < 0x80)
        first = int(np.searchsorted(self._ends, position))
        last = first + count - 1
        if last >= len(self._ends):
            raise DecodeError(f"{self.what}: truncated array")
        return int(self._ends[last]) + 1

    def skip_bytes(self, position: int, count: int) -> int:
        end = position + count
        if count < 0 or end > len(self.data):
            raise DecodeError(f"{self.what}: truncated or negative length")
        return end

    def add_items(self, count: int) -> None:
        self.items += count
        if self.items > self.max_items:
            raise RecordLimitError(f"{self.what}: more than {self.max_items} array items in one record")


@dataclass(frozen=True)
class _Kind:
    skip: _Skip
    min_bytes: int
    """Smallest encoding of a value of this type."""
    varints: int | None = None
    """When the type is only varints (long, int, enum, boolean, records of them): how many."""
    fixed_size: int | None = None
    """When every value has the same size in bytes (double, float, fixed)."""


class ArrayScan:
    """Counts the array items of an Avro body of one writer schema without decoding it.

    Compiled once per writer schema (the serde caches it). :meth:`check` raises
    :class:`RecordLimitError` as soon as the count passes ``max_items``.
    """

    def __init__(self, schema: Any, limits: RecordLimits, name: str) -> None:
        self._names: dict[str, _Kind] = {}
        self._pending: dict[str, Any] = {}  # not a topic record: named Avro record schemas being compiled
        self._has_arrays = False
        self._min_item_bytes: int | None = None
        self._root = self._compile(schema, "")
        self.max_items = limits.max_items
        self.name = name
        items = self._min_item_bytes
        self.threshold = -1 if not self._has_arrays else 0 if items is None or items == 0 else items * limits.max_items
        """Bodies longer than this are scanned (-1: the schema has no arrays, nothing to scan)."""

    def check(self, data: bytes, offset: int, coordinates: str = "") -> None:
        """Raise :class:`RecordLimitError` when the body at ``data[offset:]`` has too many array items."""
        if self.threshold < 0 or len(data) - offset <= self.threshold:
            return
        cursor = _Cursor(data, self.max_items, f"{self.name} record{coordinates}")
        self._root.skip(cursor, offset)

    # -- compiling -----------------------------------------------------------------------------------

    def _compile(self, schema: Any, namespace: str) -> _Kind:
        if isinstance(schema, str):
            return self._named_or_primitive(schema, namespace)
        if isinstance(schema, list):
            return self._union([self._compile(branch, namespace) for branch in schema])
        kind = schema.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            name = schema["name"]
            full = name if "." in name else f"{schema.get('namespace', namespace)}.{name}".lstrip(".")
            inner = full.rpartition(".")[0]
            if kind == "enum":
                compiled = _Kind(_skip_varint, 1, varints=1)
            elif kind == "fixed":
                size = int(schema["size"])
                compiled = _Kind(lambda c, p: c.skip_bytes(p, size), size, fixed_size=size)
            else:
                self._pending[full] = schema
                fields = [self._compile(f["type"], inner) for f in schema["fields"]]
                del self._pending[full]
                compiled = _record(fields)
            self._names[full] = compiled
            return compiled
        if kind == "array":
            self._has_arrays = True
            return self._array(self._compile(schema["items"], namespace))
        if kind == "map":
            self._has_arrays = True
            return self._map(self._compile(schema["values"], namespace))
        return self._named_or_primitive(kind, namespace)

    def _named_or_primitive(self, name: str, namespace: str) -> _Kind:
        primitive = _PRIMITIVES.get(name)
        if primitive is not None:
            return primitive
        for candidate in (name, f"{namespace}.{name}"):
            if candidate in self._names:
                return self._names[candidate]
            if candidate in self._pending:
                # A recursive record (none in the catalog): walked item by item, never vectorised.
                return _Kind(self._later(candidate), 0)
        raise DecodeError(f"unknown Avro type {name!r} in a writer schema")

    def _later(self, name: str) -> _Skip:
        def skip(cursor: _Cursor, position: int) -> int:
            return self._names[name].skip(cursor, position)

        return skip

    def _union(self, branches: list[_Kind]) -> _Kind:
        def skip(cursor: _Cursor, position: int) -> int:
            index, position = cursor.long(position)
            if not 0 <= index < len(branches):
                raise DecodeError(f"{cursor.what}: union branch {index} does not exist")
            return branches[index].skip(cursor, position)

        return _Kind(skip, 1 + min(branch.min_bytes for branch in branches))

    def _note_item(self, item: _Kind) -> None:
        smallest = item.min_bytes
        self._min_item_bytes = smallest if self._min_item_bytes is None else min(self._min_item_bytes, smallest)

    def _array(self, item: _Kind) -> _Kind:
        self._note_item(item)

        def skip(cursor: _Cursor, position: int) -> int:
            while True:
                count, position = cursor.long(position)
                if count == 0:
                    return position
                if count < 0:  # a block with its size in bytes: the count is what matters
                    count = -count
                    _, position = cursor.long(position)
                cursor.add_items(count)
                if item.varints is not None:
                    position = cursor.skip_varints(position, count * item.varints)
                elif item.fixed_size is not None:
                    position = cursor.skip_bytes(position, count * item.fixed_size)
                else:
                    for _ in range(count):  # at most max_items iterations in all
                        position = item.skip(cursor, position)

        return _Kind(skip, 1)

    def _map(self, value: _Kind) -> _Kind:
        self._note_item(_Kind(_skip_string, 1 + value.min_bytes))

        def skip(cursor: _Cursor, position: int) -> int:
            while True:
                count, position = cursor.long(position)
                if count == 0:
                    return position
                if count < 0:
                    count = -count
                    _, position = cursor.long(position)
                cursor.add_items(count)
                for _ in range(count):
                    position = value.skip(cursor, _skip_string(cursor, position))

        return _Kind(skip, 1)


def _skip_varint(cursor: _Cursor, position: int) -> int:
    return cursor.long(position)[1]


def _skip_string(cursor: _Cursor, position: int) -> int:
    length, position = cursor.long(position)
    return cursor.skip_bytes(position, length)


def _record(fields: list[_Kind]) -> _Kind:
    varints = None if any(f.varints is None for f in fields) else sum(f.varints or 0 for f in fields)
    sizes = [f.fixed_size for f in fields]
    fixed = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None

    def skip(cursor: _Cursor, position: int) -> int:
        for compiled in fields:
            position = compiled.skip(cursor, position)
        return position

    return _Kind(skip, sum(f.min_bytes for f in fields), varints=varints, fixed_size=fixed)


_PRIMITIVES: Final[dict[str, _Kind]] = {
    "null": _Kind(lambda c, p: p, 0, fixed_size=0),
    "boolean": _Kind(_skip_varint, 1, varints=1),  # one byte, 0 or 1: a one-byte varint
    "int": _Kind(_skip_varint, 1, varints=1),
    "long": _Kind(_skip_varint, 1, varints=1),
    "float": _Kind(lambda c, p: c.skip_bytes(p, 4), 4, fixed_size=4),
    "double": _Kind(lambda c, p: c.skip_bytes(p, 8), 8, fixed_size=8),
    "string": _Kind(_skip_string, 1),
    "bytes": _Kind(_skip_string, 1),
}


# -- the string check (after decoding) ----------------------------------------------------------------

_Check = Callable[[Any], None]


class StringCheck:
    """Checks the string and bytes fields of a decoded record (reader schema) against their limits."""

    def __init__(self, schema: Any, limits: RecordLimits, name: str) -> None:
        self.name = name
        self._limits = limits
        self._names: dict[str, Any] = {}  # not a topic record: compiled checks of named schemas
        self._check = self._compile(schema, None, "")
        own = [limit for limit in limits.strings.values() if limit is not None]
        self.threshold = min([limits.max_string, *own]) if self._check is not None else -1
        """Records longer than this (encoded) are checked (-1: no string to check)."""

    def check(self, record: Any, encoded_length: int) -> None:
        """Raise :class:`RecordLimitError` when a string of ``record`` is longer than its limit."""
        if self._check is not None and encoded_length > self.threshold:
            self._check(record)

    def _compile(self, schema: Any, field_name: str | None, namespace: str) -> _Check | None:
        if isinstance(schema, str):
            if schema in ("string", "bytes"):
                return self._string(field_name)
            named = self._names.get(schema) or self._names.get(f"{namespace}.{schema}")
            return named
        if isinstance(schema, list):
            return self._union([self._compile(branch, field_name, namespace) for branch in schema], schema)
        kind = schema.get("type")
        if kind in ("record", "error"):
            name = schema["name"]
            full = name if "." in name else f"{schema.get('namespace', namespace)}.{name}".lstrip(".")
            inner = full.rpartition(".")[0]
            checks = []
            for item in schema["fields"]:
                compiled = self._compile(item["type"], item["name"], inner)
                if compiled is not None:
                    checks.append((item["name"], compiled))
            record_check = _record_check(checks) if checks else None
            self._names[full] = record_check
            return record_check
        if kind == "array":
            item_check = self._compile(schema["items"], field_name, namespace)
            return None if item_check is None else _each(item_check)
        if kind == "map":
            value_check = self._compile(schema["values"], field_name, namespace)
            key_check = self._string(field_name)
            return _map_check(key_check, value_check)
        if kind in ("string", "bytes"):
            return self._string(field_name)
        return None

    def _string(self, field_name: str | None) -> _Check | None:
        limit = self._limits.string_limit(field_name or "")
        if limit is None:
            return None
        name = self.name

        def check(value: Any) -> None:
            if value is not None and len(value) > limit:
                raise RecordLimitError(f"{name} record: {field_name!r} is {len(value)} long, more than {limit}")

        return check

    def _union(self, checks: list[_Check | None], branches: list[Any]) -> _Check | None:
        by_type: dict[type, _Check] = {}
        for compiled, branch in zip(checks, branches, strict=True):
            if compiled is None:
                continue
            kind = branch if isinstance(branch, str) else branch.get("type")
            python_type = {"string": str, "bytes": bytes, "array": list, "map": dict}.get(kind, dict)
            by_type.setdefault(python_type, compiled)
        if not by_type:
            return None

        def check(value: Any) -> None:
            compiled = by_type.get(type(value))
            if compiled is not None:
                compiled(value)

        return check


def _record_check(checks: list[tuple[str, _Check]]) -> _Check:
    def check(value: Any) -> None:
        if isinstance(value, dict):
            for name, compiled in checks:
                compiled(value.get(name))

    return check


def _each(item_check: _Check) -> _Check:
    def check(value: Any) -> None:
        for item in value or ():
            item_check(item)

    return check


def _map_check(key_check: _Check | None, value_check: _Check | None) -> _Check | None:
    if key_check is None and value_check is None:
        return None

    def check(value: Any) -> None:
        for key, item in (value or {}).items():
            if key_check is not None:
                key_check(key)
            if value_check is not None:
                value_check(item)

    return check
