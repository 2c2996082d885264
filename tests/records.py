"""Tests' helpers for the typed records: build one from a plain dict, and read one as a plain dict.

``plain(record)`` is the record as its Avro datum (nested records as dicts, arrays as lists, enums
as strings, bytes as bytes): exactly what the serde hands fastavro, so a test that pins a record's
content field by field can compare it with a literal dict without losing anything.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from quotewatch.core.records import AnyRecord, BookSnapshot, BookUpdate, FeedStatus, Gap, MarketEvent, Trade

R = TypeVar("R", bound=AnyRecord)
B = TypeVar("B", BookSnapshot, BookUpdate, Trade, Gap, FeedStatus)
T = TypeVar("T")


def typed(cls: type[R], fields: dict[str, Any]) -> R:
    """The ``cls`` record of a plain dict (validated: a wrong type or a missing field raises)."""
    return msgspec.convert(fields, cls)


def checked(value: object, cls: type[T]) -> T:
    """``value``, asserted to be a ``cls`` (e.g. the record of an ``OutRecord``, typed as any record)."""
    assert isinstance(value, cls), f"a {type(value).__name__}, not a {cls.__name__}"
    return value


def plain(record: AnyRecord) -> dict[str, Any]:
    """``record`` as a plain Avro datum (see the module docstring)."""
    value = _lists(msgspec.to_builtins(record, builtin_types=(bytes,)))
    assert isinstance(value, dict)
    return value


def _lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    return value


def body(event: MarketEvent, kind: type[B]) -> B:
    """The body of ``event`` named by its kind (``event.update`` of an UPDATE, ...), asserted present and a ``kind``."""
    value = {
        "SNAPSHOT": event.snapshot,
        "UPDATE": event.update,
        "TRADE": event.trade,
        "GAP": event.gap,
        "STATUS": event.status,
    }.get(event.kind)
    assert value is not None, f"a {event.kind} event without its body"
    assert isinstance(value, kind), f"a {event.kind} event's body is a {type(value).__name__}, not a {kind.__name__}"
    return value
