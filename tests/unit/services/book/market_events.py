"""Builders of MarketEvent records for the book and labeler tests, and a seeded synthetic feed."""

from __future__ import annotations

import random
from typing import Any

from quotewatch.core.records import (
    AggressorSide,
    BookLevel,
    BookSnapshot,
    BookUpdate,
    EventKind,
    FeedStatus,
    Gap,
    GapReason,
    LevelChange,
    MarketEvent,
    Side,
    Trade,
)

MS = 1_000_000
T0 = 1_700_000_000_000 * MS  # a grid-aligned event time (ns)
E8 = 100_000_000
BOOK_LEVELS = ([(100 * E8, 1 * E8), (99 * E8, 2 * E8), (98 * E8, 3 * E8)], [(101 * E8, 4 * E8), (102 * E8, 5 * E8)])
"""(bids, asks) of a small book for snapshot(ts, *BOOK_LEVELS)."""


def event(kind: EventKind, ts: int, symbol: str = "BTC-USD", ts_init: int | None = None, **body: Any) -> MarketEvent:
    """A MarketEvent of ``kind`` at event time ``ts`` (ns); ``body`` sets one body field."""
    return MarketEvent(
        ts_event=ts,
        ts_init=ts + 7 if ts_init is None else ts_init,
        exchange="coinbase",
        feed="coinbase-exchange",
        symbol=symbol,
        kind=kind,
        source_sequence=-1,
        connection_id="test",
        **body,
    )


def levels(*pairs: tuple[int, int]) -> tuple[BookLevel, ...]:
    return tuple(BookLevel(price_e8=price, size_e8=size) for price, size in pairs)


def snapshot(ts: int, bids: list[tuple[int, int]], asks: list[tuple[int, int]], **kw: Any) -> MarketEvent:
    return event("SNAPSHOT", ts, snapshot=BookSnapshot(bids=levels(*bids), asks=levels(*asks)), **kw)


def update(ts: int, *changes: tuple[Side, int, int], **kw: Any) -> MarketEvent:
    """UPDATE with changes (side, price_e8, size_e8)."""
    body = BookUpdate(
        changes=tuple(LevelChange(side=side, price_e8=price, size_e8=size) for side, price, size in changes)
    )
    return event("UPDATE", ts, update=body, **kw)


def trade(ts: int, side: AggressorSide = "BUY", price: int = 100 * E8, size: int = E8, **kw: Any) -> MarketEvent:
    body = Trade(trade_id=str(ts), aggressor_side=side, price_e8=price, size_e8=size)
    return event("TRADE", ts, trade=body, **kw)


def gap(ts: int, reason: GapReason = "SEQUENCE_JUMP", **kw: Any) -> MarketEvent:
    body = Gap(reason=reason, detail="test gap", expected_sequence=-1, received_sequence=-1)
    return event("GAP", ts, gap=body, **kw)


def status(ts: int, state: str = "SUBSCRIBED", **kw: Any) -> MarketEvent:
    return event("STATUS", ts, status=FeedStatus(state=state, detail=""), **kw)


def clock(ts: int, **kw: Any) -> MarketEvent:
    return event("CLOCK", ts, **kw)


def synthetic_feed(
    seed: int, symbols: tuple[str, ...] = ("BTC-USD", "ETH-USD"), count: int = 3000
) -> list[MarketEvent]:
    """A seeded random but valid event stream: snapshots, updates around the mid (never crossing),
    trades, clock ticks, occasional gaps followed by a new snapshot, status changes, quiet stretches
    and a few out-of-order timestamps; interleaved over ``symbols``."""
    rng = random.Random(seed)
    events: list[MarketEvent] = []
    ts = T0 + 13 * MS
    mids = {symbol: (100 + 50 * index) * E8 for index, symbol in enumerate(symbols)}
    books: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
    tick = E8 // 100  # 0.01

    def new_snapshot(symbol: str, at: int) -> MarketEvent:
        mid = mids[symbol]
        bids = {mid - tick * (i + 1): rng.randint(1, 50) * E8 // 10 for i in range(20)}
        asks = {mid + tick * (i + 1): rng.randint(1, 50) * E8 // 10 for i in range(20)}
        books[symbol] = (bids, asks)
        return snapshot(at, sorted(bids.items()), sorted(asks.items()), symbol=symbol)

    for symbol in symbols:
        events.append(status(ts, "SUBSCRIBED", symbol=symbol))
        events.append(new_snapshot(symbol, ts))
    for _ in range(count):
        symbol = rng.choice(symbols)
        step = rng.choice((0, 1 * MS, 3 * MS, 17 * MS, 40 * MS, 120 * MS))
        if rng.random() < 0.005:
            step = rng.randint(1, 8) * 1000 * MS  # a quiet stretch (some longer than the carry bound)
        ts += step
        event_ts = ts - rng.randint(1, 30) * MS if rng.random() < 0.02 else ts  # late event
        roll = rng.random()
        bids, asks = books[symbol]
        if roll < 0.01:
            events.append(gap(event_ts, symbol=symbol))
            events.append(clock(event_ts + MS, symbol=symbol))
            events.append(new_snapshot(symbol, event_ts + 2 * MS))
        elif roll < 0.02:
            events.append(status(event_ts, rng.choice(("SUBSCRIBED", "RECONNECTING")), symbol=symbol))
        elif roll < 0.10:
            events.append(
                trade(event_ts, rng.choice(("BUY", "SELL", "UNKNOWN")), mids[symbol], E8 // 10, symbol=symbol)
            )
        elif roll < 0.15:
            events.append(clock(event_ts, symbol=symbol))
        else:
            changes: list[tuple[Side, int, int]] = []
            for _ in range(rng.choice((1, 1, 1, 2, 5))):
                best_bid = max(bids) if bids else (min(asks) if asks else mids[symbol]) - tick
                best_ask = min(asks) if asks else best_bid + 2 * tick
                if rng.random() < 0.5:
                    price = rng.randint(max(1, best_bid // tick - 25), best_ask // tick - 1) * tick
                    size = 0 if rng.random() < 0.3 else rng.randint(1, 40) * E8 // 10
                    changes.append(("BID", price, size))
                    if size:
                        bids[price] = size
                    else:
                        bids.pop(price, None)
                else:
                    price = rng.randint(best_bid // tick + 1, best_ask // tick + 25) * tick
                    size = 0 if rng.random() < 0.3 else rng.randint(1, 40) * E8 // 10
                    changes.append(("ASK", price, size))
                    if size:
                        asks[price] = size
                    else:
                        asks.pop(price, None)
            events.append(update(event_ts, *changes, symbol=symbol))
    return events
