"""Builders of Coinbase-protocol messages (the server side of both protocols), as JSON text.

The local feed server and the synthetic market speak the same wire formats the parsers in
:mod:`quotewatch.domain.venue.coinbase` read, so everything downstream is exercised with real message
shapes. Prices and sizes are written as exact decimal strings (:func:`~quotewatch.core.units.format_e8`).
Pure functions: the caller supplies every timestamp and sequence number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from quotewatch.core.units import format_e8
from quotewatch.domain.venue.coinbase import format_time_ns

# Internal book sides -> each protocol's spelling.
ADVANCED_SIDE = {"BID": "bid", "ASK": "offer"}
EXCHANGE_SIDE = {"BID": "buy", "ASK": "sell"}
# Aggressor side -> the maker side both protocols print (see quotewatch.domain.venue.coinbase).
MAKER_SIDE_EXCHANGE = {"BUY": "sell", "SELL": "buy"}
MAKER_SIDE_ADVANCED = {"BUY": "SELL", "SELL": "BUY"}

Change = tuple[str, int, int]
"""(side BID/ASK, price_e8, size_e8): a new absolute size; 0 deletes the level."""


@dataclass(frozen=True, slots=True)
class TradePrint:
    """A trade as the synthetic market or a replay reports it."""

    symbol: str
    trade_id: int
    aggressor: str
    """BUY or SELL (the taker)."""
    price_e8: int
    size_e8: int
    ts_ns: int


def _dumps(message: Mapping[str, Any]) -> str:  # not a topic record: Coinbase JSON
    return orjson.dumps(message).decode()


# -- Advanced Trade --------------------------------------------------------------------------------


def advanced_message(channel: str, sequence: int, ts_ns: int, events: list[Any]) -> str:
    """One Advanced Trade message: ``{"channel", "client_id", "timestamp", "sequence_num", "events"}``."""
    return _dumps(
        {
            "channel": channel,
            "client_id": "",
            "timestamp": format_time_ns(ts_ns, 9),
            "sequence_num": sequence,
            "events": events,
        }
    )


def advanced_l2(sequence: int, ts_ns: int, symbol: str, kind: str, changes: Iterable[Change], event_ns: int) -> str:
    """An ``l2_data`` message with one ``snapshot`` or ``update`` event for ``symbol``."""
    event_time = format_time_ns(event_ns, 6)
    updates = [
        {
            "side": ADVANCED_SIDE[side],
            "event_time": event_time,
            "price_level": format_e8(price),
            "new_quantity": format_e8(size),
        }
        for side, price, size in changes
    ]
    return advanced_message("l2_data", sequence, ts_ns, [{"type": kind, "product_id": symbol, "updates": updates}])


def advanced_trades(sequence: int, ts_ns: int, trades: Sequence[TradePrint], kind: str = "update") -> str:
    """A ``market_trades`` message (``side`` is the maker side)."""
    return advanced_message(
        "market_trades",
        sequence,
        ts_ns,
        [
            {
                "type": kind,
                "trades": [
                    {
                        "product_id": t.symbol,
                        "trade_id": str(t.trade_id),
                        "price": format_e8(t.price_e8),
                        "size": format_e8(t.size_e8),
                        "time": format_time_ns(t.ts_ns, 6),
                        "side": MAKER_SIDE_ADVANCED[t.aggressor],
                    }
                    for t in trades
                ],
            }
        ],
    )


def advanced_heartbeat(sequence: int, ts_ns: int, counter: int) -> str:
    """A ``heartbeats`` message."""
    current = format_time_ns(ts_ns, 9).replace("T", " ").removesuffix("Z") + " +0000 UTC"
    return advanced_message("heartbeats", sequence, ts_ns, [{"current_time": current, "heartbeat_counter": counter}])


def advanced_subscriptions(sequence: int, ts_ns: int, subscriptions: Mapping[str, Sequence[str]]) -> str:
    """The ``subscriptions`` message listing every active channel and its products."""
    return advanced_message(
        "subscriptions", sequence, ts_ns, [{"subscriptions": {k: list(v) for k, v in subscriptions.items()}}]
    )


# -- Exchange --------------------------------------------------------------------------------------


def exchange_snapshot(symbol: str, bids: Iterable[tuple[int, int]], asks: Iterable[tuple[int, int]], ts_ns: int) -> str:
    """A level-2 ``snapshot`` (full depth)."""
    return _dumps(
        {
            "type": "snapshot",
            "product_id": symbol,
            "bids": [[format_e8(p), format_e8(s)] for p, s in bids],
            "asks": [[format_e8(p), format_e8(s)] for p, s in asks],
            "time": format_time_ns(ts_ns, 6),
        }
    )


def exchange_l2update(symbol: str, changes: Iterable[Change], ts_ns: int) -> str:
    """An ``l2update`` with ``changes: [[side, price, size]]``."""
    return _dumps(
        {
            "type": "l2update",
            "product_id": symbol,
            "changes": [[EXCHANGE_SIDE[side], format_e8(price), format_e8(size)] for side, price, size in changes],
            "time": format_time_ns(ts_ns, 6),
        }
    )


def exchange_match(trade: TradePrint, sequence: int) -> str:
    """A ``match`` (``side`` is the maker side)."""
    return _dumps(
        {
            "type": "match",
            "trade_id": trade.trade_id,
            "maker_order_id": f"m-{trade.trade_id}",
            "taker_order_id": f"t-{trade.trade_id}",
            "side": MAKER_SIDE_EXCHANGE[trade.aggressor],
            "size": format_e8(trade.size_e8),
            "price": format_e8(trade.price_e8),
            "product_id": trade.symbol,
            "sequence": sequence,
            "time": format_time_ns(trade.ts_ns, 6),
        }
    )


def exchange_heartbeat(symbol: str, sequence: int, last_trade_id: int, ts_ns: int) -> str:
    """A per-product ``heartbeat``."""
    return _dumps(
        {
            "type": "heartbeat",
            "sequence": sequence,
            "last_trade_id": last_trade_id,
            "product_id": symbol,
            "time": format_time_ns(ts_ns, 6),
        }
    )


def exchange_subscriptions(channels: Mapping[str, Sequence[str]]) -> str:
    """The ``subscriptions`` message listing every active channel and its products."""
    return _dumps(
        {"type": "subscriptions", "channels": [{"name": k, "product_ids": list(v)} for k, v in channels.items()]}
    )


def exchange_error(message: str, reason: str) -> str:
    """An ``error`` message."""
    return _dumps({"type": "error", "message": message, "reason": reason})
