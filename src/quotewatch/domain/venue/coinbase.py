"""The two Coinbase market-data WebSocket protocols: adapter data and small pure parsers.

An exchange adapter is mostly data (endpoint, channels, message-type maps) plus one parser per
message type. Each parser turns one decoded JSON message into :class:`Parsed` items (the body of
a ``MarketEvent``) and raises :class:`FrameError` on anything it cannot vouch for. The
:class:`~quotewatch.domain.venue.normaliser.Normaliser` adds the envelope (feed, connection, ``ts_init``),
sequence checks, gaps and status.

Two feeds:

- ``coinbase-advanced`` (Advanced Trade, ``wss://advanced-trade-ws.coinbase.com``): one channel per
  subscribe message; book data arrives as ``channel: "l2_data"`` with ``snapshot``/``update``
  events; ``new_quantity`` is the absolute size (``"0"`` deletes); sides ``bid``/``offer``;
  ``sequence_num`` counts messages per connection across all channels.
- ``coinbase-exchange`` (Exchange, ``wss://ws-feed.exchange.coinbase.com``): ``level2_batch``
  (public) or ``level2`` (authenticated since 2023), ``matches``, ``heartbeat``; messages
  ``snapshot`` / ``l2update`` (``changes: [[side, price, size]]``) / ``match`` / ``heartbeat``;
  sides ``buy``/``sell``.

Trade sides. Exchange ``match.side`` is documented as the *maker* order's side ("If the side is
sell this indicates the maker was a sell order and the match is considered an up-tick"), so the
aggressor is the opposite side. For Advanced Trade ``market_trades`` the public sources disagree
(an OpenAPI mirror calls ``side`` the taker side; nautilus_trader's Coinbase adapter and several
client libraries treat it as the maker side). The recorded capture settles it: in
``advanced_trade_level2_BTC-USD_ETH-USD_2026-08-09`` every one of the 48 trades printed at or
above the best offer carries ``"side":"SELL"`` and every one of the 23 printed at or below the
best bid carries ``"side":"BUY"``, so ``side`` is the *maker* side there too and the aggressor is
the opposite (asserted by ``tests/unit/domain/venue/test_coinbase.py``).

Control frames and data frames. The book and trade messages (Advanced ``l2_data`` and
``market_trades``, Exchange ``snapshot``/``l2update``/``match``) are *data*: validated strictly,
rejected (dead-lettered, and a GAP when the book is affected) on any doubt. Subscription
acknowledgements and heartbeats are *control*: validated only for what the ingest uses (the
confirmed products, a heartbeat's time); anything else odd in them (an empty ``timestamp``, a
field nobody documented) is an :class:`Anomaly` on the parsed message, which the ingest logs and
counts, never a reason to reject the frame or lose the subscription.

The parsers live in :mod:`~quotewatch.domain.venue.coinbase_exchange` and
:mod:`~quotewatch.domain.venue.coinbase_advanced`; dispatch and subscribe messages in
:mod:`~quotewatch.domain.venue.coinbase_feeds`; authentication in
:mod:`~quotewatch.domain.venue.coinbase_auth`. This module holds what they share: the feed specs,
the errors, the parsed types and the exact scalar parsers.

Prices and sizes are parsed exactly with :func:`quotewatch.core.units.parse_e8`.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from quotewatch.core.records import AggressorSide, BookSnapshot, BookUpdate, EventKind, Side, Trade
from quotewatch.core.units import parse_e8

JsonMessage = dict[str, Any]  # not a topic record: a decoded Coinbase JSON message

FEED_ADVANCED: Final = "coinbase-advanced"
FEED_EXCHANGE: Final = "coinbase-exchange"
FEEDS: Final = (FEED_ADVANCED, FEED_EXCHANGE)

_MAX_LONG = 2**63 - 1
_MIN_LONG = -(2**63)


@dataclass(frozen=True, slots=True)
class FeedSpec:
    """What differs between the two protocols, as data."""

    name: str
    url: str
    """Public endpoint."""
    channels: tuple[str, ...]
    """Channels subscribed by default (the book channel first)."""
    book_channels: frozenset[str]
    """Subscription names that carry the order book (a confirmation of one of them = subscribed)."""
    ignored: frozenset[str]
    """Channels (Advanced) or message types (Exchange) that are understood and deliberately dropped."""


ADVANCED = FeedSpec(
    name=FEED_ADVANCED,
    url="wss://advanced-trade-ws.coinbase.com",
    channels=("level2", "heartbeats", "market_trades"),
    book_channels=frozenset({"level2", "l2_data"}),
    ignored=frozenset({"ticker", "ticker_batch", "candles", "status"}),
)
EXCHANGE = FeedSpec(
    name=FEED_EXCHANGE,
    url="wss://ws-feed.exchange.coinbase.com",
    channels=("level2_batch", "matches", "heartbeat"),
    book_channels=frozenset({"level2", "level2_batch", "level2_50"}),
    # last_match is the trade before the subscription (history, not a new trade); ticker and
    # status are channels the ingest does not subscribe to but recorded captures contain.
    ignored=frozenset({"ticker", "ticker_batch", "last_match", "status"}),
)
FEED_SPECS: Final[Mapping[str, FeedSpec]] = {ADVANCED.name: ADVANCED, EXCHANGE.name: EXCHANGE}

# Book side of a level change.
ADVANCED_BOOK_SIDES: Final[Mapping[str, Side]] = {"bid": "BID", "offer": "ASK"}
EXCHANGE_BOOK_SIDES: Final[Mapping[str, Side]] = {"buy": "BID", "sell": "ASK"}
# Aggressor (taker) side of a trade, from the maker side both protocols send (see module docstring).
EXCHANGE_AGGRESSOR: Final[Mapping[str, AggressorSide]] = {"buy": "SELL", "sell": "BUY"}
ADVANCED_AGGRESSOR: Final[Mapping[str, AggressorSide]] = {"BUY": "SELL", "SELL": "BUY"}


class FrameError(ValueError):
    """A frame the parsers cannot vouch for (it goes to the DLQ with this reason).

    ``book_affected`` says whether the frame may have carried book changes that are now lost (then
    the book of ``symbol``, or of every symbol when None, is no longer in sync).
    """

    error_type = "FrameError"

    def __init__(self, reason: str, *, book_affected: bool, symbol: str | None = None) -> None:
        super().__init__(reason)
        self.book_affected = book_affected
        self.symbol = symbol


class MalformedFrameError(FrameError):
    """Not JSON, not an object, or without the fields that say what it is."""

    error_type = "MalformedFrame"


class UnknownMessageError(FrameError):
    """Well-formed, but a channel or message type this adapter does not know."""

    error_type = "UnknownMessage"


class InvalidFieldError(FrameError):
    """A known message with a missing or unparseable field."""

    error_type = "InvalidField"


class ExchangeMessageError(FrameError):
    """The exchange sent an ``error`` message (kept with its text in the DLQ)."""

    error_type = "ExchangeError"


@dataclass(slots=True)
class Parsed:
    """One market event parsed from a message, before the normaliser adds its envelope.

    ``symbol`` None means "every symbol subscribed on the connection" (Advanced heartbeats).
    ``body`` is the value of the MarketEvent field named after ``kind`` (snapshot/update/trade).
    """

    kind: EventKind
    symbol: str | None
    ts_event: int
    body: BookSnapshot | BookUpdate | Trade | None = None


@dataclass(slots=True)
class ParsedMessage:
    """What one frame says: its events, its sequence number and which book subscriptions it confirms."""

    events: list[Parsed] = field(default_factory=list)
    sequence: int = -1
    ts_event: int | None = None
    """The message's own timestamp (Advanced ``timestamp``), when it has one."""
    confirmed: tuple[str, ...] = ()
    """Symbols whose book channel subscription this message confirms."""
    ignored: bool = False
    """A message understood and deliberately dropped (ticker, candles, last_match...)."""
    control: str = ""
    """The control message type (``subscriptions``, ``heartbeats``, ``heartbeat``), "" for data."""
    anomalies: list[Anomaly] = field(default_factory=list)
    """Odd things in a control frame that did not stop it being used (logged and counted by the ingest)."""
    failed: list[FrameError] = field(default_factory=list)
    """Per-product failures of a multi-product book frame (each with its ``symbol``); ``events``
    hold the other products' events, which are valid."""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something odd in a control frame that the ingest tolerates (see the module docstring).

    ``code`` is one of a few fixed words (a metric label): ``invalid_field`` (a field the ingest
    does not need is missing or malformed), ``unknown_field`` (a field not in the documented
    message), ``unusable`` (the frame says nothing the ingest can use, e.g. a heartbeat without a
    valid time); ``detail`` says which field and how (for the log).
    """

    code: str
    detail: str


# -- scalar fields -------------------------------------------------------------------------------

E8_CACHE: dict[str, int] = {}
_SECONDS_CACHE: dict[str, int] = {}
_CACHE_LIMIT = 1 << 18
_LAST_TIME: tuple[str, int] = ("", 0)
"""The last timestamp parsed (the empty string never parses, so it never matches)."""
_NANO_SCALE = tuple(10 ** (9 - digits) for digits in range(10))


def decimal_e8(text: Any, what: str = "value") -> int:
    """An exact price or size (x 1e8) from the exchange's decimal string; cached (strings repeat).

    Raises:
        ValueError: not a string, not a plain non-negative decimal, more than 8 significant
            decimals, or too large for an Avro long.
    """
    value = E8_CACHE.get(text) if type(text) is str else None
    if value is None:
        if type(text) is not str:
            raise ValueError(f"{what} must be a decimal string, got {type(text).__name__} {text!r:.40}")
        try:
            value = parse_e8(text)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if value > _MAX_LONG:
            raise ValueError(f"{what} {text!r:.40} is too large")
        if len(E8_CACHE) >= _CACHE_LIMIT:
            E8_CACHE.clear()
        E8_CACHE[text] = value
    return value


def parse_time_ns(text: Any) -> int:
    """Exact ns since the epoch of an RFC 3339 UTC timestamp as Coinbase sends them.

    ``"2018-04-17T00:55:04.358Z"``, ``"2021-04-17T16:43:37.075687Z"`` and
    ``"2026-08-09T21:05:48.228568804Z"`` (up to 9 fractional digits; ``Z`` or ``+00:00``).

    Raises:
        ValueError: any other shape.
    """
    global _LAST_TIME
    if type(text) is not str:
        raise ValueError(f"timestamp must be a string, got {type(text).__name__}")
    last_text, last_ns = _LAST_TIME
    if text == last_text:
        return last_ns  # an Advanced envelope's timestamp is read twice per frame
    if text.endswith("Z"):
        body = text[:-1]
    elif text.endswith("+00:00"):
        body = text[:-6]
    else:
        raise ValueError(f"timestamp {text!r:.60} is not UTC (Z or +00:00)")
    head, dot, frac = body.partition(".")
    seconds = _SECONDS_CACHE.get(head)
    if seconds is None:
        if len(head) != 19 or head[10] not in "T ":
            raise ValueError(f"timestamp {text!r:.60} is not YYYY-MM-DDTHH:MM:SS[.fraction]Z")
        try:
            parsed = datetime.strptime(head.replace(" ", "T"), "%Y-%m-%dT%H:%M:%S")
        except ValueError:
            raise ValueError(f"timestamp {text!r:.60} is not a valid date and time") from None
        seconds = calendar.timegm(parsed.timetuple())
        if len(_SECONDS_CACHE) >= _CACHE_LIMIT:
            _SECONDS_CACHE.clear()
        _SECONDS_CACHE[head] = seconds
    nanos = 0
    if dot:
        if not (0 < len(frac) <= 9 and frac.isascii() and frac.isdigit()):
            raise ValueError(f"timestamp {text!r:.60} has an invalid fraction")
        nanos = int(frac) * _NANO_SCALE[len(frac)]
    ns = seconds * 1_000_000_000 + nanos
    if not _MIN_LONG <= ns <= _MAX_LONG:
        # Past 2262 (or before 1677): no int64 ns timestamp can hold it, and no record could carry it.
        raise ValueError(f"timestamp {text!r:.60} is outside the 64-bit nanosecond range")
    _LAST_TIME = (text, ns)  # one (text, ns) pair, replaced atomically: safe across threads
    return ns


def format_time_ns(ns: int, digits: int = 6) -> str:
    """The RFC 3339 UTC spelling of ``ns`` with ``digits`` (0-9) fractional digits; inverse of :func:`parse_time_ns`."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{head}.{nanos:09d}"[: 20 + digits] + "Z" if digits else f"{head}Z"


def require_field(message: JsonMessage, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``message[key]`` if it is a ``kind`` (never a bool), else :class:`InvalidFieldError`."""
    value = message.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidFieldError(
            f"{where}: field {key!r} missing or not {_kind_name(kind)}", book_affected=False, symbol=None
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "/".join(k.__name__ for k in kind)
    return kind.__name__


def valid_sequence(sequence: Any) -> int:
    """A sequence number that a record can carry (0 .. 2**63-1), else -1 (none)."""
    return sequence if type(sequence) is int and 0 <= sequence <= _MAX_LONG else -1


def unknown_fields(message: JsonMessage, known: frozenset[str], where: str) -> list[Anomaly]:
    """An ``unknown_field`` anomaly for each key of ``message`` not in ``known`` (control frames)."""
    return [Anomaly("unknown_field", f"{where}: unknown field {key!r:.60}") for key in message if key not in known]
