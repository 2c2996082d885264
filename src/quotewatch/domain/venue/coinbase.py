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

Prices and sizes are parsed exactly with :func:`quotewatch.core.units.parse_e8`.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from quotewatch.core.records import (
    AggressorSide,
    BookLevel,
    BookSnapshot,
    BookUpdate,
    EventKind,
    LevelChange,
    Side,
    Trade,
)
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


# -- scalar fields -------------------------------------------------------------------------------

_E8_CACHE: dict[str, int] = {}
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
    value = _E8_CACHE.get(text) if type(text) is str else None
    if value is None:
        if type(text) is not str:
            raise ValueError(f"{what} must be a decimal string, got {type(text).__name__} {text!r:.40}")
        try:
            value = parse_e8(text)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if value > _MAX_LONG:
            raise ValueError(f"{what} {text!r:.40} is too large")
        if len(_E8_CACHE) >= _CACHE_LIMIT:
            _E8_CACHE.clear()
        _E8_CACHE[text] = value
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


def _require(message: JsonMessage, key: str, kind: type | tuple[type, ...], where: str) -> Any:
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


# -- Exchange parsers ----------------------------------------------------------------------------


def parse_exchange_message(message: Any) -> ParsedMessage:
    """Dispatch one decoded Exchange message by its ``type``.

    Raises:
        FrameError: malformed, unknown type, invalid field, or an exchange ``error`` message.
    """
    if not isinstance(message, dict):
        raise MalformedFrameError(f"message is a JSON {type(message).__name__}, not an object", book_affected=True)
    kind = message.get("type")
    if not isinstance(kind, str):
        raise MalformedFrameError("message has no string 'type'", book_affected=True)
    parser = _EXCHANGE_PARSERS.get(kind)
    if parser is not None:
        symbol = message.get("product_id") if isinstance(message.get("product_id"), str) else None
        try:
            return parser(message)
        except FrameError as exc:
            exc.book_affected = kind in _EXCHANGE_BOOK_TYPES
            exc.symbol = exc.symbol or symbol
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise InvalidFieldError(
                f"{kind}: {exc}", book_affected=kind in _EXCHANGE_BOOK_TYPES, symbol=symbol
            ) from None
    if kind in EXCHANGE.ignored:
        return ParsedMessage(ignored=True)
    if kind == "error":
        raise ExchangeMessageError(
            f"exchange error: {message.get('message')!s:.200} ({message.get('reason')!s:.500})", book_affected=False
        )
    raise UnknownMessageError(f"unknown Exchange message type {kind!r:.60}", book_affected=False)


def parse_exchange_snapshot(message: JsonMessage) -> ParsedMessage:
    """A full-depth book.

    Sample (2018 capture, truncated)::

        {"type":"snapshot","product_id":"BTC-USD","bids":[["8042.9","9.11800903"],["8042.83","0.002487"]],
         "asks":[["8042.91","1.99984311"]]}

    Recorded 2018 snapshots carry no ``time``; the event time is then unknown (-1) and the normaliser
    stamps the frame's receive time instead.
    """
    symbol = _require(message, "product_id", str, "snapshot")
    bids = tuple(
        BookLevel(price_e8=decimal_e8(p, "price"), size_e8=decimal_e8(s, "size")) for p, s, *_ in message["bids"]
    )
    asks = tuple(
        BookLevel(price_e8=decimal_e8(p, "price"), size_e8=decimal_e8(s, "size")) for p, s, *_ in message["asks"]
    )
    time = message.get("time")
    ts_event = parse_time_ns(time) if time is not None else -1
    return ParsedMessage(
        events=[Parsed("SNAPSHOT", symbol, ts_event, BookSnapshot(bids=bids, asks=asks))], confirmed=(symbol,)
    )


def parse_exchange_l2update(message: JsonMessage) -> ParsedMessage:
    """A batch of level changes (``level2`` and ``level2_batch``): side, price, new absolute size.

    Sample (2018 capture)::

        {"type":"l2update","product_id":"BTC-USD","time":"2018-04-17T00:55:04.358Z",
         "changes":[["buy","8041.33000000","0"]]}
    """
    symbol = _require(message, "product_id", str, "l2update")
    ts_event = parse_time_ns(message["time"])
    sides = EXCHANGE_BOOK_SIDES
    cached = _E8_CACHE.get
    changes = []
    for side, price, size in message["changes"]:
        book_side = sides.get(side)
        if book_side is None:
            raise InvalidFieldError(f"l2update: unknown side {side!r:.20}", book_affected=True, symbol=symbol)
        # Hot loop: the decimal cache is consulted inline, decimal_e8 only on a miss.
        price_e8 = cached(price)
        if price_e8 is None:
            price_e8 = decimal_e8(price, "price")
        size_e8 = cached(size)
        if size_e8 is None:
            size_e8 = decimal_e8(size, "size")
        changes.append(LevelChange(side=book_side, price_e8=price_e8, size_e8=size_e8))
    return ParsedMessage(events=[Parsed("UPDATE", symbol, ts_event, BookUpdate(changes=tuple(changes)))])


def parse_exchange_match(message: JsonMessage) -> ParsedMessage:
    """A trade; ``side`` is the maker's side, so the aggressor is the opposite.

    Sample (2018 capture)::

        {"type":"match","trade_id":41766821,"maker_order_id":"88a7fa8d-...","taker_order_id":"b8f2f93a-...",
         "side":"buy","size":"0.15520000","price":"8042.90000000","product_id":"BTC-USD",
         "sequence":5693130267,"time":"2018-04-17T00:55:11.045000Z"}
    """
    symbol = _require(message, "product_id", str, "match")
    trade_id = _require(message, "trade_id", (int, str), "match")
    aggressor = EXCHANGE_AGGRESSOR.get(message.get("side"))  # type: ignore[arg-type]  # any value: .get is total
    if aggressor is None:
        raise InvalidFieldError(f"match: unknown side {message.get('side')!r:.20}", book_affected=False, symbol=symbol)
    sequence = message.get("sequence")
    return ParsedMessage(
        events=[
            Parsed(
                "TRADE",
                symbol,
                parse_time_ns(message["time"]),
                Trade(
                    trade_id=str(trade_id),
                    aggressor_side=aggressor,
                    price_e8=decimal_e8(message["price"], "price"),
                    size_e8=decimal_e8(message["size"], "size"),
                ),
            )
        ],
        sequence=_valid_sequence(sequence),
    )


def parse_exchange_heartbeat(message: JsonMessage) -> ParsedMessage:
    """A per-product heartbeat (once a second on the ``heartbeat`` channel).

    Sample (Exchange docs)::

        {"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD",
         "time":"2014-11-07T08:19:28.464459Z"}
    """
    symbol = _require(message, "product_id", str, "heartbeat")
    sequence = message.get("sequence")
    return ParsedMessage(
        events=[Parsed("HEARTBEAT", symbol, parse_time_ns(message["time"]))],
        sequence=_valid_sequence(sequence),
    )


def parse_exchange_subscriptions(message: JsonMessage) -> ParsedMessage:
    """The server's list of active subscriptions; confirms the book channel's products.

    Sample (2018 capture)::

        {"type":"subscriptions","channels":[{"name":"level2","product_ids":["BTC-USD"]},
         {"name":"matches","product_ids":["BTC-USD"]}]}
    """
    confirmed: list[str] = []
    for channel in _require(message, "channels", list, "subscriptions"):
        if isinstance(channel, dict) and channel.get("name") in EXCHANGE.book_channels:
            confirmed.extend(p for p in channel.get("product_ids") or () if isinstance(p, str))
    return ParsedMessage(confirmed=tuple(dict.fromkeys(confirmed)))


_EXCHANGE_PARSERS = {
    "snapshot": parse_exchange_snapshot,
    "l2update": parse_exchange_l2update,
    "match": parse_exchange_match,
    "heartbeat": parse_exchange_heartbeat,
    "subscriptions": parse_exchange_subscriptions,
}
_EXCHANGE_BOOK_TYPES = frozenset({"snapshot", "l2update"})


# -- Advanced Trade parsers ----------------------------------------------------------------------


def parse_advanced_message(message: Any) -> ParsedMessage:
    """Dispatch one decoded Advanced Trade message by its ``channel``.

    ``sequence`` and ``ts_event`` of the result are set whenever the envelope has them, even
    when the body is then rejected (the exception carries them as attributes for the normaliser).

    Raises:
        FrameError: malformed, unknown channel, invalid field, or an ``error`` message.
    """
    if not isinstance(message, dict):
        raise MalformedFrameError(f"message is a JSON {type(message).__name__}, not an object", book_affected=True)
    channel = message.get("channel")
    if not isinstance(channel, str):
        if message.get("type") == "error":
            raise ExchangeMessageError(f"exchange error: {message.get('message')!s:.500}", book_affected=False)
        raise MalformedFrameError("message has no string 'channel'", book_affected=True)
    parser = _ADVANCED_PARSERS.get(channel)
    if parser is None:
        if channel in ADVANCED.ignored:
            return ParsedMessage(ignored=True, sequence=_sequence(message))
        raise UnknownMessageError(f"unknown Advanced Trade channel {channel!r:.60}", book_affected=False)
    try:
        return parser(message)
    except FrameError as exc:
        exc.book_affected = channel == "l2_data"
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise InvalidFieldError(f"{channel}: {exc}", book_affected=channel == "l2_data") from None


def advanced_envelope(message: Any) -> tuple[int, int | None]:
    """``(sequence_num, timestamp ns)`` of an Advanced message, (-1, None) where absent or invalid.

    Read before the body so that a sequence gap is detected even when the body is rejected.
    """
    if not isinstance(message, dict):
        return -1, None
    sequence = _sequence(message)
    try:
        ts = parse_time_ns(message.get("timestamp"))
    except ValueError:
        ts = None
    return sequence, ts


def _sequence(message: JsonMessage) -> int:
    return _valid_sequence(message.get("sequence_num"))


def _valid_sequence(sequence: Any) -> int:
    """A sequence number that a record can carry (0 .. 2**63-1), else -1 (none)."""
    return sequence if type(sequence) is int and 0 <= sequence <= _MAX_LONG else -1


def _advanced_envelope_required(message: JsonMessage, where: str) -> tuple[int, int, list[Any]]:
    sequence = _sequence(message)
    if sequence < 0:
        raise InvalidFieldError(f"{where}: 'sequence_num' missing or not a non-negative integer", book_affected=True)
    ts = parse_time_ns(message.get("timestamp"))
    events = _require(message, "events", list, where)
    return sequence, ts, events


def parse_advanced_l2_data(message: JsonMessage) -> ParsedMessage:
    """Level-2 book events: ``snapshot`` (full depth) and ``update`` (new absolute quantity; "0" deletes).

    Sample (2026 capture, truncated)::

        {"channel":"l2_data","timestamp":"2026-08-09T21:05:48.505350477Z","sequence_num":14,
         "events":[{"type":"update","product_id":"BTC-USD","updates":[{"side":"bid",
         "event_time":"2026-08-09T21:05:48.210883Z","price_level":"65062.5","new_quantity":"0.00583"}]}]}

    The event time is the latest ``event_time`` of the event's updates (the message ``timestamp``,
    the send time, when an event has no updates).
    """
    sequence, ts, events = _advanced_envelope_required(message, "l2_data")
    parsed: list[Parsed] = []
    confirmed: list[str] = []
    sides = ADVANCED_BOOK_SIDES
    cached = _E8_CACHE.get
    for event in events:
        symbol = event["product_id"]
        if type(symbol) is not str:
            raise InvalidFieldError("l2_data: event without a string product_id", book_affected=True)
        kind = event["type"]
        updates = event["updates"]
        times = {u["event_time"] for u in updates}
        if len(times) == 1:
            ts_event = parse_time_ns(next(iter(times)))
        else:
            ts_event = max(parse_time_ns(t) for t in times) if times else ts
        if kind == "update":
            changes = []
            for u in updates:
                side = sides.get(u["side"])
                if side is None:
                    raise InvalidFieldError(
                        f"l2_data: unknown side {u['side']!r:.20}", book_affected=True, symbol=symbol
                    )
                # Hot loop: the decimal cache is consulted inline, decimal_e8 only on a miss (or a
                # value that is not a string, which it rejects).
                price = u["price_level"]
                price_e8 = cached(price) if type(price) is str else None
                if price_e8 is None:
                    price_e8 = decimal_e8(price, "price_level")
                size = u["new_quantity"]
                size_e8 = cached(size) if type(size) is str else None
                if size_e8 is None:
                    size_e8 = decimal_e8(size, "new_quantity")
                changes.append(LevelChange(side=side, price_e8=price_e8, size_e8=size_e8))
            parsed.append(Parsed("UPDATE", symbol, ts_event, BookUpdate(changes=tuple(changes))))
        elif kind == "snapshot":
            bids: list[BookLevel] = []
            asks: list[BookLevel] = []
            for u in updates:
                side = sides.get(u["side"])
                level = BookLevel(
                    price_e8=decimal_e8(u["price_level"], "price_level"),
                    size_e8=decimal_e8(u["new_quantity"], "new_quantity"),
                )
                if side == "BID":
                    bids.append(level)
                elif side == "ASK":
                    asks.append(level)
                else:
                    raise InvalidFieldError(
                        f"l2_data: unknown side {u['side']!r:.20}", book_affected=True, symbol=symbol
                    )
            parsed.append(Parsed("SNAPSHOT", symbol, ts_event, BookSnapshot(bids=tuple(bids), asks=tuple(asks))))
            confirmed.append(symbol)
        else:
            raise InvalidFieldError(f"l2_data: unknown event type {kind!r:.30}", book_affected=True, symbol=symbol)
    return ParsedMessage(events=parsed, sequence=sequence, ts_event=ts, confirmed=tuple(confirmed))


def parse_advanced_market_trades(message: JsonMessage) -> ParsedMessage:
    """Trades, batched over up to 250 ms; ``side`` is the maker side (see the module docstring).

    ``snapshot`` events replay recent history from before the subscription and are dropped (like
    Exchange ``last_match``); ``update`` events are new trades.

    Sample (2026 capture)::

        {"channel":"market_trades","timestamp":"2026-08-09T21:05:48.251397169Z","sequence_num":9,
         "events":[{"type":"update","trades":[{"product_id":"BTC-USD","trade_id":"1068572091",
         "price":"65083.67","size":"0.01034361","time":"2026-08-09T21:05:48.167634Z","side":"SELL"}]}]}
    """
    sequence, ts, events = _advanced_envelope_required(message, "market_trades")
    parsed: list[Parsed] = []
    for event in events:
        kind = event["type"]
        if kind == "snapshot":
            continue
        if kind != "update":
            raise InvalidFieldError(f"market_trades: unknown event type {kind!r:.30}", book_affected=False)
        for trade in event["trades"]:
            symbol = trade["product_id"]
            if type(symbol) is not str:
                raise InvalidFieldError("market_trades: trade without a string product_id", book_affected=False)
            aggressor = ADVANCED_AGGRESSOR.get(trade["side"])
            if aggressor is None:
                raise InvalidFieldError(
                    f"market_trades: unknown side {trade['side']!r:.20}", book_affected=False, symbol=symbol
                )
            trade_id = trade["trade_id"]
            if not isinstance(trade_id, str | int) or isinstance(trade_id, bool):
                raise InvalidFieldError("market_trades: trade_id is not a string", book_affected=False, symbol=symbol)
            parsed.append(
                Parsed(
                    "TRADE",
                    symbol,
                    parse_time_ns(trade["time"]),
                    Trade(
                        trade_id=str(trade_id),
                        aggressor_side=aggressor,
                        price_e8=decimal_e8(trade["price"], "price"),
                        size_e8=decimal_e8(trade["size"], "size"),
                    ),
                )
            )
    return ParsedMessage(events=parsed, sequence=sequence, ts_event=ts, ignored=not parsed)


def parse_advanced_heartbeats(message: JsonMessage) -> ParsedMessage:
    """A connection-wide heartbeat (once a second); becomes a HEARTBEAT for every subscribed symbol.

    Sample (2026 capture)::

        {"channel":"heartbeats","timestamp":"2026-08-09T21:05:48.856364007Z","sequence_num":35,
         "events":[{"current_time":"2026-08-09 21:05:48.854840045 +0000 UTC m=+41691.260485341",
         "heartbeat_counter":41691}]}
    """
    sequence, ts, _ = _advanced_envelope_required(message, "heartbeats")
    return ParsedMessage(events=[Parsed("HEARTBEAT", None, ts)], sequence=sequence, ts_event=ts)


def parse_advanced_subscriptions(message: JsonMessage) -> ParsedMessage:
    """The server's list of active subscriptions; confirms the ``level2`` products.

    Sample (2026 capture)::

        {"channel":"subscriptions","timestamp":"2026-08-09T21:05:48.629627857Z","sequence_num":24,
         "events":[{"subscriptions":{"level2":["BTC-USD","ETH-USD"],"market_trades":["BTC-USD","ETH-USD"]}}]}
    """
    sequence, ts, events = _advanced_envelope_required(message, "subscriptions")
    confirmed: list[str] = []
    for event in events:
        subscriptions = event.get("subscriptions") if isinstance(event, dict) else None
        if isinstance(subscriptions, dict):
            for name, products in subscriptions.items():
                if name in ADVANCED.book_channels and isinstance(products, list):
                    confirmed.extend(p for p in products if isinstance(p, str))
    return ParsedMessage(sequence=sequence, ts_event=ts, confirmed=tuple(dict.fromkeys(confirmed)))


_ADVANCED_PARSERS = {
    "l2_data": parse_advanced_l2_data,
    "market_trades": parse_advanced_market_trades,
    "heartbeats": parse_advanced_heartbeats,
    "subscriptions": parse_advanced_subscriptions,
}

PARSERS: Final = {FEED_ADVANCED: parse_advanced_message, FEED_EXCHANGE: parse_exchange_message}


def detect_feed(message: Any) -> str | None:
    """Which protocol a decoded message speaks: Advanced messages have ``channel``, Exchange ``type``."""
    if isinstance(message, dict):
        if "channel" in message:
            return FEED_ADVANCED
        if "type" in message:
            return FEED_EXCHANGE
    return None


# -- subscribing -----------------------------------------------------------------------------------

EXCHANGE_SIGNATURE_PATH: Final = "/users/self/verify"


@dataclass(frozen=True)
class ExchangeCredentials:
    """Coinbase Exchange API credentials (from the environment only; ``repr`` hides them)."""

    key: str = field(repr=False)
    secret_b64: str = field(repr=False)
    passphrase: str = field(repr=False)


def exchange_signature(
    secret_b64: str, timestamp: str, method: str = "GET", path: str = EXCHANGE_SIGNATURE_PATH
) -> str:
    """The ``CB-ACCESS-SIGN`` value: base64(HMAC-SHA256(base64decode(secret), timestamp + method + path)).

    The Exchange WebSocket authenticates a subscribe by signing ``GET /users/self/verify`` exactly
    as a REST request would be signed (Exchange docs, "WebSocket Authentication").

    Raises:
        ValueError: the secret is not base64.
    """
    try:
        key = base64.b64decode(secret_b64, validate=True)
    except ValueError as exc:
        raise ValueError("COINBASE_API_SECRET is not base64") from exc
    digest = hmac.new(key, f"{timestamp}{method}{path}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def subscribe_messages(
    feed: str,
    symbols: Sequence[str],
    *,
    credentials: ExchangeCredentials | None = None,
    timestamp: str | None = None,
) -> list[JsonMessage]:
    """The subscribe messages to send after connecting, in order.

    Advanced Trade takes one channel per message (``level2``, ``heartbeats``, ``market_trades``).
    Exchange takes one message for all channels: ``level2_batch`` + ``matches`` + ``heartbeat``, or
    the authenticated ``level2`` instead of ``level2_batch`` when ``credentials`` are given (then
    ``timestamp``, seconds since the epoch as a string, is signed).
    """
    products = list(symbols)
    if feed == FEED_ADVANCED:
        return [{"type": "subscribe", "product_ids": products, "channel": channel} for channel in ADVANCED.channels]
    if feed != FEED_EXCHANGE:
        raise ValueError(f"unknown feed {feed!r}; one of {', '.join(FEEDS)}")
    channels = list(EXCHANGE.channels)
    message: JsonMessage = {"type": "subscribe", "product_ids": products, "channels": channels}
    if credentials is not None:
        if timestamp is None:
            raise ValueError("an authenticated subscribe needs the signing timestamp")
        channels[0] = "level2"
        message.update(
            {
                "signature": exchange_signature(credentials.secret_b64, timestamp),
                "key": credentials.key,
                "passphrase": credentials.passphrase,
                "timestamp": timestamp,
            }
        )
    return [message]
