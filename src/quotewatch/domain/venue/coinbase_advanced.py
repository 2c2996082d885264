"""Parsers of the Coinbase Advanced Trade protocol (``l2_data``, ``market_trades``, ``heartbeats``, ``subscriptions``).

One parser per ``channel``; see :mod:`quotewatch.domain.venue.coinbase` for the shared types, the
trade-side convention and the data/control distinction.
"""

from __future__ import annotations

from typing import Any

from quotewatch.core.records import BookLevel, BookSnapshot, BookUpdate, LevelChange, Trade
from quotewatch.domain.venue.coinbase import (
    ADVANCED,
    ADVANCED_AGGRESSOR,
    ADVANCED_BOOK_SIDES,
    E8_CACHE,
    Anomaly,
    ExchangeMessageError,
    FrameError,
    InvalidFieldError,
    JsonMessage,
    MalformedFrameError,
    Parsed,
    ParsedMessage,
    UnknownMessageError,
    decimal_e8,
    parse_time_ns,
    require_field,
    unknown_fields,
    valid_sequence,
)


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
    return valid_sequence(message.get("sequence_num"))


def _advanced_envelope_required(message: JsonMessage, where: str) -> tuple[int, int, list[Any]]:
    sequence = _sequence(message)
    if sequence < 0:
        raise InvalidFieldError(f"{where}: 'sequence_num' missing or not a non-negative integer", book_affected=True)
    ts = parse_time_ns(message.get("timestamp"))
    events = require_field(message, "events", list, where)
    return sequence, ts, events


def parse_advanced_l2_data(message: JsonMessage) -> ParsedMessage:
    """Level-2 book events: ``snapshot`` (full depth) and ``update`` (new absolute quantity; "0" deletes).

    Sample (2026 capture, truncated)::

        {"channel":"l2_data","timestamp":"2026-08-09T21:05:48.505350477Z","sequence_num":14,
         "events":[{"type":"update","product_id":"BTC-USD","updates":[{"side":"bid",
         "event_time":"2026-08-09T21:05:48.210883Z","price_level":"65062.5","new_quantity":"0.00583"}]}]}

    The event time is the latest ``event_time`` of the event's updates (the message ``timestamp``,
    the send time, when an event has no updates).

    One frame may carry events of several products. An event that does not parse fails its product
    only: it goes to ``failed`` (with its ``symbol``), every other event of that product in the frame
    is dropped too (the product's book is no longer in sync), and the other products' events are
    returned. A bad event that names no product fails the whole frame (:class:`InvalidFieldError`).
    """
    sequence, ts, events = _advanced_envelope_required(message, "l2_data")
    parsed: list[Parsed] = []
    failed: list[FrameError] = []
    for event in events:
        try:
            parsed.append(_advanced_book_event(event, ts))
        except (FrameError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            symbol = event.get("product_id") if isinstance(event, dict) else None
            if type(symbol) is not str:
                if isinstance(exc, FrameError):
                    raise
                raise InvalidFieldError(f"l2_data: {exc}", book_affected=True) from None
            error = exc if isinstance(exc, FrameError) else InvalidFieldError(f"l2_data: {exc}", book_affected=True)
            error.book_affected = True
            error.symbol = symbol
            failed.append(error)
    if failed:
        bad = {error.symbol for error in failed}
        parsed = [item for item in parsed if item.symbol not in bad]
    confirmed = tuple(item.symbol for item in parsed if item.kind == "SNAPSHOT" and item.symbol is not None)
    return ParsedMessage(events=parsed, sequence=sequence, ts_event=ts, confirmed=confirmed, failed=failed)


def _advanced_book_event(event: Any, ts: int) -> Parsed:
    """One ``l2_data`` event (one product's snapshot or update)."""
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
    sides = ADVANCED_BOOK_SIDES
    if kind == "update":
        cached = E8_CACHE.get
        changes: list[LevelChange] = []
        for u in updates:
            side = sides.get(u["side"])
            if side is None:
                raise InvalidFieldError(f"l2_data: unknown side {u['side']!r:.20}", book_affected=True, symbol=symbol)
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
        return Parsed("UPDATE", symbol, ts_event, BookUpdate(changes=tuple(changes)))
    if kind == "snapshot":
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
                raise InvalidFieldError(f"l2_data: unknown side {u['side']!r:.20}", book_affected=True, symbol=symbol)
        return Parsed("SNAPSHOT", symbol, ts_event, BookSnapshot(bids=tuple(bids), asks=tuple(asks)))
    raise InvalidFieldError(f"l2_data: unknown event type {kind!r:.30}", book_affected=True, symbol=symbol)


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
    """A connection-wide heartbeat (once a second; a control frame): a HEARTBEAT for every subscribed symbol.

    Sample (2026 capture)::

        {"channel":"heartbeats","timestamp":"2026-08-09T21:05:48.856364007Z","sequence_num":35,
         "events":[{"current_time":"2026-08-09 21:05:48.854840045 +0000 UTC m=+41691.260485341",
         "heartbeat_counter":41691}]}

    The ingest uses the ``timestamp`` (the HEARTBEAT's time) and ``sequence_num`` (the gap check);
    without a valid ``timestamp`` the frame is an ``unusable`` anomaly, not a reject.
    """
    sequence, ts, anomalies = _control_envelope(message, "heartbeats")
    for event in _control_events(message, "heartbeats", anomalies):
        anomalies.extend(unknown_fields(event, _HEARTBEAT_EVENT_FIELDS, "heartbeats event"))
    if ts is None:
        anomalies.append(Anomaly("unusable", "heartbeats: no valid timestamp, no HEARTBEAT event"))
        return ParsedMessage(sequence=sequence, control="heartbeats", anomalies=anomalies)
    return ParsedMessage(
        events=[Parsed("HEARTBEAT", None, ts)],
        sequence=sequence,
        ts_event=ts,
        control="heartbeats",
        anomalies=anomalies,
    )


def parse_advanced_subscriptions(message: JsonMessage) -> ParsedMessage:
    """The server's list of active subscriptions (a control frame); confirms the ``level2`` products.

    Sample (2026 capture)::

        {"channel":"subscriptions","timestamp":"2026-08-09T21:05:48.629627857Z","sequence_num":24,
         "events":[{"subscriptions":{"level2":["BTC-USD","ETH-USD"],"market_trades":["BTC-USD","ETH-USD"]}}]}

    Only ``events[].subscriptions`` is used (and ``sequence_num`` by the gap check). An empty or
    invalid ``timestamp``, a missing ``sequence_num`` or an unknown field is an anomaly: the
    subscription is confirmed all the same.
    """
    sequence, ts, anomalies = _control_envelope(message, "subscriptions")
    confirmed: list[str] = []
    for event in _control_events(message, "subscriptions", anomalies):
        anomalies.extend(unknown_fields(event, _SUBSCRIPTIONS_EVENT_FIELDS, "subscriptions event"))
        subscriptions = event.get("subscriptions")
        if not isinstance(subscriptions, dict):
            anomalies.append(Anomaly("invalid_field", "subscriptions: event without a 'subscriptions' object"))
            continue
        for name, products in subscriptions.items():
            if name in ADVANCED.book_channels:
                if isinstance(products, list):
                    confirmed.extend(p for p in products if isinstance(p, str))
                else:
                    anomalies.append(Anomaly("invalid_field", f"subscriptions: {name} is not a list of products"))
    return ParsedMessage(
        sequence=sequence,
        ts_event=ts,
        confirmed=tuple(dict.fromkeys(confirmed)),
        control="subscriptions",
        anomalies=anomalies,
    )


def _control_envelope(message: JsonMessage, where: str) -> tuple[int, int | None, list[Anomaly]]:
    """``(sequence_num or -1, timestamp ns or None, anomalies)`` of a control frame's envelope."""
    anomalies = unknown_fields(message, _ENVELOPE_FIELDS, where)
    sequence = _sequence(message)
    if sequence < 0:
        anomalies.append(Anomaly("invalid_field", f"{where}: 'sequence_num' missing or not a non-negative integer"))
    try:
        ts: int | None = parse_time_ns(message.get("timestamp"))
    except ValueError as exc:
        anomalies.append(Anomaly("invalid_field", f"{where}: 'timestamp' {message.get('timestamp')!r:.40}: {exc}"))
        ts = None
    return sequence, ts, anomalies


def _control_events(message: JsonMessage, where: str, anomalies: list[Anomaly]) -> list[JsonMessage]:
    """The object events of a control frame; anything else in ``events`` is an anomaly."""
    events = message.get("events")
    if not isinstance(events, list):
        anomalies.append(Anomaly("invalid_field", f"{where}: 'events' missing or not a list"))
        return []
    objects = [e for e in events if isinstance(e, dict)]
    if len(objects) != len(events):
        anomalies.append(Anomaly("invalid_field", f"{where}: {len(events) - len(objects)} events are not objects"))
    return objects


_ENVELOPE_FIELDS = frozenset({"channel", "client_id", "timestamp", "sequence_num", "events"})
_SUBSCRIPTIONS_EVENT_FIELDS = frozenset({"subscriptions"})
_HEARTBEAT_EVENT_FIELDS = frozenset({"current_time", "heartbeat_counter"})


_ADVANCED_PARSERS = {
    "l2_data": parse_advanced_l2_data,
    "market_trades": parse_advanced_market_trades,
    "heartbeats": parse_advanced_heartbeats,
    "subscriptions": parse_advanced_subscriptions,
}
