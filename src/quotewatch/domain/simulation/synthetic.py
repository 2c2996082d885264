"""A deterministic synthetic level-2 market, emitted in either Coinbase protocol.

Pure: a seed and a start time give the same events and messages every time, whatever else runs.
The local feed server serves it live (``quotewatch feed serve --synthetic``); backtests and
benchmarks generate hours of it in-process with :func:`synthetic_raw_frames`.

The process (one per symbol, each with its own random stream derived from the seed and the
symbol, so adding a symbol does not change the others):

- A price grid with a tick size; a book of a few hundred levels per side, dense near the touch.
- Events arrive as a Poisson process whose intensity follows a Markov chain of activity
  regimes (quiet / normal / busy). Each event is a limit **add** (mostly near the touch; inside
  the spread when it is wider than a tick), a **cancel** (partial or whole level, mostly near the
  touch), or a **market order** that consumes the opposite touch, level by level, printing trades.
- A persistent latent order-flow imbalance ``flow`` in [-1, 1] (an AR(1)) tilts everything:
  under buying pressure market orders are mostly buys, liquidity is added on the bid and
  cancelled on the ask. The pressure is therefore visible in the book (thin ask touch, bid-heavy
  imbalance, recent trade signs) *before* the ask is consumed and the quote moves, and a thin touch
  level is more likely to disappear: best-quote changes are partly predictable from the book.

``rate`` is the mean number of level updates per second per symbol; messages are batched every
``batch_ns`` of event time (like Coinbase's ``level2_batch``).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from quotewatch.core.records import RawFrame, RawKind
from quotewatch.core.units import SCALE
from quotewatch.domain.venue import coinbase_messages as msgs
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FEED_EXCHANGE
from quotewatch.domain.venue.coinbase_messages import Change, TradePrint
from quotewatch.domain.venue.normaliser import CONNECTING, control_text

_REGIME_MULTIPLIERS = (0.3, 1.0, 2.4)
_REGIME_MEAN = sum(_REGIME_MULTIPLIERS) / len(_REGIME_MULTIPLIERS)
_REGIME_SWITCHES_PER_SECOND = 0.1
_P_MARKET = 0.015
_P_CANCEL = 0.42
_DISTANCE_DECAY = 0.07
"""Adds and cancels land a geometric number of ticks from the touch, mean 1/_DISTANCE_DECAY."""


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """Price grid and size scale of one synthetic product."""

    symbol: str
    tick_e8: int
    start_price_e8: int
    median_size_e8: int


_KNOWN_SPECS = {
    "BTC-USD": SymbolSpec("BTC-USD", 1_000_000, 65_000 * SCALE, 5_000_000),
    "ETH-USD": SymbolSpec("ETH-USD", 1_000_000, 1_900 * SCALE, 50_000_000),
    "SOL-USD": SymbolSpec("SOL-USD", 1_000_000, 150 * SCALE, 500_000_000),
}


def symbol_spec(symbol: str) -> SymbolSpec:
    """The grid of a known product; any other symbol trades around 100.00 with a 0.01 tick."""
    return _KNOWN_SPECS.get(symbol) or SymbolSpec(symbol, 1_000_000, 100 * SCALE, 100_000_000)


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the synthetic market."""

    symbols: tuple[str, ...] = ("BTC-USD",)
    seed: int = 1
    start_ns: int = 1_786_300_000_000_000_000
    rate: float = 200.0
    """Mean level updates per second per symbol (the regimes vary it around this mean)."""
    batch_ns: int = 50_000_000
    """Event time covered by one batch (one book message per symbol)."""
    depth: int = 200
    """Levels per side the book keeps near the touch."""

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("the synthetic market needs at least one symbol")
        if self.rate <= 0 or self.batch_ns <= 0 or self.depth < 10:
            raise ValueError("rate and batch_ns must be positive and depth at least 10")


@dataclass(slots=True)
class SyntheticBatch:
    """What one symbol did during one batch window: level changes in order, and trades."""

    symbol: str
    ts_ns: int
    """Event time of the batch (its last event)."""
    changes: list[Change] = field(default_factory=list)
    trades: list[TradePrint] = field(default_factory=list)


class _SymbolMarket:
    """The L2 process of one symbol. Prices are kept in ticks, sizes in e8 units."""

    def __init__(self, spec: SymbolSpec, seed: int, start_ns: int, rate: float, depth: int) -> None:
        self.spec = spec
        self.rng = random.Random(seed * 1_000_003 + zlib.crc32(spec.symbol.encode()))  # noqa: S311 - a simulation
        self.rate = rate
        self.depth = depth
        self.flow = 0.0
        self.regime = 1
        self.trade_id = 1_000_000
        self.sequence = 10_000_000
        self.events = 0
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        mid = spec.start_price_e8 // spec.tick_e8
        self.best_bid = mid - 1
        self.best_ask = mid + 1
        rng = self.rng
        for i in range(depth * 2):
            if i == 0 or rng.random() < 0.75:
                self.bids[self.best_bid - i] = self._size()
                self.asks[self.best_ask + i] = self._size()
        self.next_ns = start_ns + self._wait_ns()

    # -- sampling ----------------------------------------------------------------------------

    def _size(self, median: int | None = None) -> int:
        median = median or self.spec.median_size_e8
        return max(1, int(median * math.exp(self.rng.gauss(0.0, 1.0))))

    def _wait_ns(self) -> int:
        intensity = self.rate * _REGIME_MULTIPLIERS[self.regime] / _REGIME_MEAN
        return 1 + int(self.rng.expovariate(intensity) * 1e9)

    # -- events ------------------------------------------------------------------------------

    def step(self, ts_ns: int, changes: list[Change], trades: list[TradePrint]) -> None:
        """Apply one event at ``ts_ns``; append its level changes and trades."""
        rng = self.rng
        self.events += 1
        self.flow = max(-1.0, min(1.0, 0.995 * self.flow + 0.07 * rng.gauss(0.0, 1.0)))
        intensity = self.rate * _REGIME_MULTIPLIERS[self.regime] / _REGIME_MEAN
        if rng.random() < _REGIME_SWITCHES_PER_SECOND / intensity:
            self.regime = rng.randrange(len(_REGIME_MULTIPLIERS))
        u = rng.random()
        if u < _P_MARKET:
            self._market_order(ts_ns, changes, trades)
        elif u < _P_MARKET + _P_CANCEL:
            self._cancel(changes)
        else:
            self._add(changes)
        if self.events % 512 == 0:
            self._prune(changes)
        self.next_ns = ts_ns + self._wait_ns()

    def _add(self, changes: list[Change]) -> None:
        rng = self.rng
        bid = rng.random() < 0.5 + 0.25 * self.flow
        spread = self.best_ask - self.best_bid
        if spread > 1 and rng.random() < 0.2:
            offset = rng.randint(1, spread - 1)
            tick = self.best_bid + offset if bid else self.best_ask - offset
        else:
            distance = int(rng.expovariate(_DISTANCE_DECAY))
            tick = self.best_bid - distance if bid else self.best_ask + distance
        levels = self.bids if bid else self.asks
        size = levels.get(tick, 0) + self._size()
        levels[tick] = size
        if bid:
            self.best_bid = max(self.best_bid, tick)
        else:
            self.best_ask = min(self.best_ask, tick)
        changes.append(("BID" if bid else "ASK", tick * self.spec.tick_e8, size))

    def _cancel(self, changes: list[Change]) -> None:
        rng = self.rng
        ask = rng.random() < 0.5 + 0.25 * self.flow
        levels = self.asks if ask else self.bids
        if len(levels) <= self.depth // 4:
            self._add(changes)
            return
        step = 1 if ask else -1
        tick = (self.best_ask if ask else self.best_bid) + step * int(rng.expovariate(_DISTANCE_DECAY))
        for _ in range(64):
            if tick in levels:
                break
            tick += step
        else:
            return
        size = levels[tick]
        touch = tick == (self.best_ask if ask else self.best_bid)
        # Away from the touch a cancel often removes the whole level; at the touch mostly a part of
        # it, unless the level is already thin (a thin touch is the likeliest to vanish).
        if size < self.spec.median_size_e8 // 3 or rng.random() < (0.15 if touch else 0.5):
            del levels[tick]
            new_size = 0
            self._repair_touch(ask, tick)
        else:
            new_size = max(1, int(size * rng.uniform(0.2, 0.8)))
            levels[tick] = new_size
        changes.append(("ASK" if ask else "BID", tick * self.spec.tick_e8, new_size))

    def _market_order(self, ts_ns: int, changes: list[Change], trades: list[TradePrint]) -> None:
        rng = self.rng
        buy = rng.random() < 0.5 + 0.35 * self.flow
        levels = self.asks if buy else self.bids
        remaining = self._size(self.spec.median_size_e8)
        for _ in range(4):
            if remaining <= 0 or len(levels) <= self.depth // 4:
                break
            tick = self.best_ask if buy else self.best_bid
            size = levels[tick]
            filled = min(size, remaining)
            remaining -= filled
            self.trade_id += 1
            trades.append(
                TradePrint(
                    self.spec.symbol, self.trade_id, "BUY" if buy else "SELL", tick * self.spec.tick_e8, filled, ts_ns
                )
            )
            if filled == size:
                del levels[tick]
                self._repair_touch(buy, tick)
                changes.append(("ASK" if buy else "BID", tick * self.spec.tick_e8, 0))
            else:
                levels[tick] = size - filled
                changes.append(("ASK" if buy else "BID", tick * self.spec.tick_e8, size - filled))

    def _repair_touch(self, ask: bool, removed: int) -> None:
        """After removing level ``removed``: move the touch outward to the next existing level."""
        if ask:
            if removed == self.best_ask:
                tick = removed + 1
                while tick not in self.asks:
                    tick += 1
                self.best_ask = tick
        elif removed == self.best_bid:
            tick = removed - 1
            while tick not in self.bids:
                tick -= 1
            self.best_bid = tick

    def _prune(self, changes: list[Change]) -> None:
        """Drop levels far from the touch (the book drifts) and refill a thin side's depth."""
        limit = self.depth * 3
        for levels, side, best, sign in ((self.bids, "BID", self.best_bid, -1), (self.asks, "ASK", self.best_ask, 1)):
            far = [tick for tick in levels if (tick - best) * sign > limit]
            for tick in sorted(far):
                del levels[tick]
                changes.append((side, tick * self.spec.tick_e8, 0))
            while len(levels) < self.depth:
                tick = best + sign * self.rng.randint(1, self.depth * 2)
                if tick not in levels:
                    levels[tick] = self._size()
                    changes.append((side, tick * self.spec.tick_e8, levels[tick]))

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence


class SyntheticMarket:
    """The synthetic market of several symbols, advanced in event time.

    Who calls it: the feed server (``advance`` to the wall clock every batch interval) and
    :func:`synthetic_raw_frames` (backtests, benchmarks).
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self._markets = {
            s: _SymbolMarket(symbol_spec(s), config.seed, config.start_ns, config.rate, config.depth)
            for s in config.symbols
        }
        self.now_ns = config.start_ns
        self.level_updates = 0
        self.trades = 0

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.config.symbols

    def advance(self, until_ns: int) -> list[SyntheticBatch]:
        """Generate every event up to ``until_ns`` (whole batch windows only), as batches.

        Batches come in window order, then symbol order; empty ones are left out.
        """
        batch_ns = self.config.batch_ns
        out: list[SyntheticBatch] = []
        while self.now_ns + batch_ns <= until_ns:
            window_end = self.now_ns + batch_ns
            for symbol, market in self._markets.items():
                batch = SyntheticBatch(symbol, window_end)
                while market.next_ns <= window_end:
                    batch.ts_ns = market.next_ns
                    market.step(market.next_ns, batch.changes, batch.trades)
                if batch.changes or batch.trades:
                    self.level_updates += len(batch.changes)
                    self.trades += len(batch.trades)
                    out.append(batch)
            self.now_ns = window_end
        return out

    def book_levels(self, symbol: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The full book of ``symbol`` now: bids best first, asks best first, as (price_e8, size_e8)."""
        market = self._markets[symbol]
        tick = market.spec.tick_e8
        bids = [(p * tick, s) for p, s in sorted(market.bids.items(), reverse=True)]
        asks = [(p * tick, s) for p, s in sorted(market.asks.items())]
        return bids, asks

    def book(self, symbol: str) -> dict[str, dict[int, int]]:
        """The book of ``symbol`` as ``{"BID": {price_e8: size_e8}, "ASK": {...}}`` (test references)."""
        bids, asks = self.book_levels(symbol)
        return {"BID": dict(bids), "ASK": dict(asks)}

    def best(self, symbol: str) -> tuple[int, int]:
        """(best bid, best ask) of ``symbol`` in e8."""
        market = self._markets[symbol]
        return market.best_bid * market.spec.tick_e8, market.best_ask * market.spec.tick_e8

    def next_exchange_sequence(self, symbol: str) -> int:
        """The next Exchange-style per-product sequence number (matches and heartbeats carry one)."""
        return self._markets[symbol].next_sequence()

    def last_trade_id(self, symbol: str) -> int:
        return self._markets[symbol].trade_id


# -- the market as a raw log (backtests and benchmarks) ----------------------------------------------


def synthetic_raw_frames(
    feed: str,
    config: SyntheticConfig,
    duration_ns: int,
    *,
    tick_ms: int = 100,
    latency_ns: int = 2_000_000,
    exchange: str = "coinbase",
    connection_id: str = "synthetic",
) -> Iterator[RawFrame]:
    """The ``qw.md.raw`` log a live ingest would have written for ``duration_ns`` of the market.

    A CONNECTED record, the subscription confirmation, one snapshot per symbol, then every batch
    as protocol frames (trades, then book changes), one heartbeat frame a second, and a CLOCK
    record every ``tick_ms`` of event time. ``ts_init`` = event time + ``latency_ns``, strictly
    increasing. Feed with :class:`~quotewatch.domain.venue.normaliser.Normaliser` to get MarketEvents.
    """
    if feed not in (FEED_ADVANCED, FEED_EXCHANGE):
        raise ValueError(f"unknown feed {feed!r}")
    market = SyntheticMarket(config)
    symbols = list(config.symbols)
    symbol_tuple = tuple(symbols)
    state = {"ts_init": config.start_ns, "frame_index": 0, "sequence": 0}

    def record(kind: RawKind, text: str, ts_event: int) -> RawFrame:
        ts_init = max(ts_event + latency_ns, state["ts_init"] + 1)
        state["ts_init"] = ts_init
        index = -1
        if kind == "FRAME":
            index = state["frame_index"]
            state["frame_index"] += 1
        return RawFrame(
            ts_event=ts_event if kind != "FRAME" else ts_init,
            ts_init=ts_init,
            exchange=exchange,
            feed=feed,
            symbols=symbol_tuple,
            connection_id=connection_id,
            frame_index=index,
            kind=kind,
            text=text,
        )

    def seq() -> int:
        state["sequence"] += 1
        return state["sequence"] - 1

    start = config.start_ns
    yield record("CONNECTED", control_text(CONNECTING, "synthetic market"), start)
    for text in _session_start(feed, market, symbols, start, seq):
        yield record("FRAME", text, start)
    tick_ns = tick_ms * 1_000_000
    next_clock = (start // tick_ns + 1) * tick_ns
    next_heartbeat = start + 1_000_000_000
    heartbeat_counter = 0
    end = start + duration_ns
    while market.now_ns < end:
        for batch in market.advance(min(end, market.now_ns + config.batch_ns)):
            for text in batch_frames(feed, market, batch, seq):
                yield record("FRAME", text, batch.ts_ns)
        now = market.now_ns
        while next_heartbeat <= now:
            heartbeat_counter += 1
            for text in heartbeat_frames(feed, market, symbols, next_heartbeat, heartbeat_counter, seq):
                yield record("FRAME", text, next_heartbeat)
            next_heartbeat += 1_000_000_000
        while next_clock <= now:
            yield record("CLOCK", "tick", next_clock)
            next_clock += tick_ns


def _session_start(feed: str, market: SyntheticMarket, symbols: list[str], ts_ns: int, seq: Any) -> Iterator[str]:
    """Subscription confirmation and snapshots, as a server sends them after the subscribes."""
    if feed == FEED_ADVANCED:
        subs = {"heartbeats": ["heartbeats"], "level2": symbols, "market_trades": symbols}
        yield msgs.advanced_subscriptions(seq(), ts_ns, subs)
        for symbol in symbols:
            bids, asks = market.book_levels(symbol)
            levels = [("BID", p, s) for p, s in bids] + [("ASK", p, s) for p, s in asks]
            yield msgs.advanced_l2(seq(), ts_ns, symbol, "snapshot", levels, ts_ns)
    else:
        yield msgs.exchange_subscriptions({"level2_batch": symbols, "matches": symbols, "heartbeat": symbols})
        for symbol in symbols:
            bids, asks = market.book_levels(symbol)
            yield msgs.exchange_snapshot(symbol, bids, asks, ts_ns)


def batch_frames(feed: str, market: SyntheticMarket, batch: SyntheticBatch, seq: Any) -> Iterator[str]:
    """The frames of one batch: trades first, then the book changes (they include the trades' effect)."""
    if feed == FEED_ADVANCED:
        if batch.trades:
            yield msgs.advanced_trades(seq(), batch.ts_ns, batch.trades)
        if batch.changes:
            yield msgs.advanced_l2(seq(), batch.ts_ns, batch.symbol, "update", batch.changes, batch.ts_ns)
    else:
        for trade in batch.trades:
            yield msgs.exchange_match(trade, market.next_exchange_sequence(batch.symbol))
        if batch.changes:
            yield msgs.exchange_l2update(batch.symbol, batch.changes, batch.ts_ns)


def heartbeat_frames(
    feed: str, market: SyntheticMarket, symbols: list[str], ts_ns: int, counter: int, seq: Any
) -> Iterator[str]:
    """One connection-wide heartbeat (Advanced) or one per product (Exchange)."""
    if feed == FEED_ADVANCED:
        yield msgs.advanced_heartbeat(seq(), ts_ns, counter)
    else:
        for symbol in symbols:
            yield msgs.exchange_heartbeat(
                symbol, market.next_exchange_sequence(symbol), market.last_trade_id(symbol), ts_ns
            )
