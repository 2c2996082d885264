"""Capture timestamps served as recorded, or moved to now (``quotewatch feed serve --timestamps``).

A recording is served by default with its **original** exchange timestamps, the way a
history-serving proxy (tardis-machine, say) serves it to an unchanged exchange client: the client
must cope with exchange times that are nothing like its own clock. ``now`` moves every exchange
timestamp of the capture by one offset per connection (the connection's start minus the capture's
first exchange time, in whole milliseconds), so the session looks live; the spacing of the times,
their precision and the rest of every message are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final, Literal

from quotewatch.domain.venue.coinbase import format_time_ns, parse_time_ns

Timestamps = Literal["original", "now"]
TIMESTAMPS: Final = ("original", "now")
TIME_KEYS: Final = frozenset({"timestamp", "time", "event_time"})
"""The keys that carry an RFC 3339 exchange time in both protocols (Advanced envelope ``timestamp``,
update ``event_time``, trade ``time``; Exchange ``time`` of l2update, match, ticker, heartbeat)."""
_MS = 1_000_000


def first_exchange_time(messages: list[Any]) -> int | None:
    """The earliest exchange time in the first messages that carry one (None: the capture has none)."""
    for message in messages:
        found = _times(message)
        if found:
            return min(found)
    return None


def shift_for(now_ns: int, first_ns: int) -> int:
    """The offset that moves ``first_ns`` to ``now_ns``, in whole milliseconds (every capture's precision)."""
    return (now_ns - first_ns) // _MS * _MS


def shifted(message: Any, shift_ns: int) -> Any:
    """``message`` with every exchange time moved by ``shift_ns``, each with its own number of digits.

    A value under a time key that is not a valid timestamp is left as recorded.
    """
    if isinstance(message, dict):
        out: dict[str, Any] = {}  # not a topic record: a JSON message
        for key, value in message.items():
            if key in TIME_KEYS and isinstance(value, str):
                out[key] = _shift_text(value, shift_ns)
            else:
                out[key] = shifted(value, shift_ns)
        return out
    if isinstance(message, list):
        return [shifted(item, shift_ns) for item in message]
    return message


def _shift_text(text: str, shift_ns: int) -> str:
    try:
        ns = parse_time_ns(text)
    except ValueError:
        return text
    body = text[:-1] if text.endswith("Z") else text[:-6]
    _, dot, fraction = body.partition(".")
    return format_time_ns(ns + shift_ns, len(fraction) if dot else 0)


def _times(message: Any) -> list[int]:
    found: list[int] = []
    if isinstance(message, dict):
        for key, value in message.items():
            if key in TIME_KEYS and isinstance(value, str):
                with contextlib.suppress(ValueError):  # not a time: left out
                    found.append(parse_time_ns(value))
            else:
                found.extend(_times(value))
    elif isinstance(message, list):
        for item in message:
            found.extend(_times(item))
    return found
