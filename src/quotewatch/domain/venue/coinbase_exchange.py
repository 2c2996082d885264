"""Parsers of the Coinbase Exchange protocol (``level2``/``level2_batch``, ``matches``, ``heartbeat``).

One parser per message ``type``; see :mod:`quotewatch.domain.venue.coinbase` for the shared types,
the trade-side convention and the data/control distinction.
"""

from __future__ import annotations

from typing import Any

from quotewatch.core.records import BookLevel, BookSnapshot, BookUpdate, LevelChange, Trade
from quotewatch.domain.venue.coinbase import (
    E8_CACHE,
    EXCHANGE,
    EXCHANGE_AGGRESSOR,
    EXCHANGE_BOOK_SIDES,
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
    symbol = require_field(message, "product_id", str, "snapshot")
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
    symbol = require_field(message, "product_id", str, "l2update")
    ts_event = parse_time_ns(message["time"])
    sides = EXCHANGE_BOOK_SIDES
    cached = E8_CACHE.get
    changes: list[LevelChange] = []
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
    symbol = require_field(message, "product_id", str, "match")
    trade_id = require_field(message, "trade_id", (int, str), "match")
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
        sequence=valid_sequence(sequence),
    )


def parse_exchange_heartbeat(message: JsonMessage) -> ParsedMessage:
    """A per-product heartbeat (once a second on the ``heartbeat`` channel); a control frame.

    Sample (Exchange docs)::

        {"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD",
         "time":"2014-11-07T08:19:28.464459Z"}

    The ingest uses ``product_id`` and ``time`` (a HEARTBEAT event); without both valid the frame is
    an ``unusable`` anomaly, not a reject.
    """
    anomalies = unknown_fields(message, _HEARTBEAT_FIELDS, "heartbeat")
    symbol = message.get("product_id")
    sequence = valid_sequence(message.get("sequence"))
    try:
        ts = parse_time_ns(message.get("time"))
    except ValueError as exc:
        anomalies.append(Anomaly("unusable", f"heartbeat: no valid time ({exc})"))
        return ParsedMessage(sequence=sequence, control="heartbeat", anomalies=anomalies)
    if not isinstance(symbol, str):
        anomalies.append(Anomaly("unusable", "heartbeat: no string product_id"))
        return ParsedMessage(sequence=sequence, control="heartbeat", anomalies=anomalies)
    return ParsedMessage(
        events=[Parsed("HEARTBEAT", symbol, ts)], sequence=sequence, control="heartbeat", anomalies=anomalies
    )


def parse_exchange_subscriptions(message: JsonMessage) -> ParsedMessage:
    """The server's list of active subscriptions (a control frame); confirms the book channel's products.

    Sample (2018 capture)::

        {"type":"subscriptions","channels":[{"name":"level2","product_ids":["BTC-USD"]},
         {"name":"matches","product_ids":["BTC-USD"]}]}

    Only ``channels[].name`` and ``channels[].product_ids`` are used; anything else odd is an anomaly.
    """
    anomalies = unknown_fields(message, _SUBSCRIPTIONS_FIELDS, "subscriptions")
    confirmed: list[str] = []
    channels = message.get("channels")
    if not isinstance(channels, list):
        anomalies.append(Anomaly("invalid_field", "subscriptions: 'channels' missing or not a list"))
        channels = []
    for channel in channels:
        if not isinstance(channel, dict):
            anomalies.append(Anomaly("invalid_field", f"subscriptions: channel {channel!r:.60} is not an object"))
            continue
        anomalies.extend(unknown_fields(channel, _CHANNEL_FIELDS, "subscriptions channel"))
        if channel.get("name") in EXCHANGE.book_channels:
            products = channel.get("product_ids")
            if not isinstance(products, list):
                anomalies.append(Anomaly("invalid_field", "subscriptions: book channel without a product_ids list"))
                continue
            confirmed.extend(p for p in products if isinstance(p, str))
    return ParsedMessage(confirmed=tuple(dict.fromkeys(confirmed)), control="subscriptions", anomalies=anomalies)


_HEARTBEAT_FIELDS = frozenset({"type", "sequence", "last_trade_id", "product_id", "time"})
_SUBSCRIPTIONS_FIELDS = frozenset({"type", "channels"})
_CHANNEL_FIELDS = frozenset({"name", "product_ids", "account_ids"})


_EXCHANGE_PARSERS = {
    "snapshot": parse_exchange_snapshot,
    "l2update": parse_exchange_l2update,
    "match": parse_exchange_match,
    "heartbeat": parse_exchange_heartbeat,
    "subscriptions": parse_exchange_subscriptions,
}
_EXCHANGE_BOOK_TYPES = frozenset({"snapshot", "l2update"})
