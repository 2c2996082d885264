"""Market events in, grid ticks out: the order book and features on event time, per symbol.

:class:`SymbolPipeline` consumes one symbol's ``MarketEvent`` records in stream order and
returns, for every grid tick it closes, the ``BookTop`` and ``FeatureVector`` records
(:mod:`quotewatch.core.records`). :class:`BookPipeline` routes many symbols. The live book
service and the batch backtest call exactly this code, so they produce identical records.

**The grid.** Tick ``t = k x TICK_MS`` (in ns) describes the book after every event with
``ts_event <= t``. A tick is closed, and emitted, when the first event with ``ts_event > t``
arrives: output lags input by at most one event, and nothing but event timestamps moves time
(updates, trades, heartbeats and the ingest's CLOCK events). The first tick of a stream is the
first grid time at or after its first event.

**Quiet ticks** carry the state forward: an event that jumps over several ticks closes each of
them with the unchanged book. A jump longer than :data:`MAX_CARRIED_MS` (5 s, the longest
feature window; live, CLOCK events arrive every tick, so such a jump means the ingest was down)
emits only the first ``MAX_CARRIED_MS / TICK_MS`` ticks and skips the rest; the feature windows
are advanced exactly as if every skipped tick had been closed, so later values do not depend on
the bound.

**One clock.** Only events stamped with the exchange's time move the grid: SNAPSHOT, UPDATE,
TRADE, HEARTBEAT and CLOCK (the ingest's exchange-time estimate). GAP and STATUS events come from
the ingest's control records (a connection opened or closed, a buffer overflow), which may be
stamped before the connection's exchange time is known, with the local clock, which may be
months ahead of a recorded session or minutes ahead of a live one; they take effect at the
current watermark and close no tick. So a GAP never closes, as synced, a tick it may already
have invalidated (at most the open tick is lost, live CLOCKs close ticks every ``TICK_MS``), and
no local clock can push a symbol's time past what the exchange later says
(docs/architecture.md, "Time").

**Out-of-order event times** never move time backwards: an event older than the newest one seen
(the watermark) is applied at the watermark, i.e. it counts in the currently open tick.

**Sync.** A SNAPSHOT replaces the book and starts a new ``epoch`` (= the snapshot's ``ts_event``,
so the same snapshot gives the same epoch in live, in a restarted service and in a backtest that
starts at it) and resets the feature state. A GAP, an invalid update or a crossed book marks the
symbol unsynced: no BookTop and no FeatureVector until the next snapshot. STATUS sets the feed
state carried in ``FeatureVector.feed_state``. CLOCK and HEARTBEAT only advance time. A synced
tick with a one-sided book yields a BookTop but no FeatureVector (mid is undefined).

**Determinism.** ``ts_init`` of every output is the ``ts_init`` of the input event that closed the
tick. The state is a pure function of the events since a *restart position*
(:attr:`SymbolPipeline.restart_position`): feeding a fresh pipeline the events from there gives
the same state, and so the same outputs, as an uninterrupted run. That is what makes crash
recovery of the book service exact.
"""

from __future__ import annotations

from typing import NamedTuple

from quotewatch.core.errors import PoisonRecordError
from quotewatch.core.records import BookLevel, BookTop, FeatureVector, MarketEvent
from quotewatch.domain.market.features import FEATURE_SPEC_ID, MAX_WINDOW_MS, FeatureState
from quotewatch.domain.market.orderbook import BookError, Level, OrderBook

MAX_CARRIED_MS = MAX_WINDOW_MS
"""Quiet ticks emitted after the last event before a jump; the rest of a longer jump is skipped."""
TOP_LEVELS = 3
"""Levels per side in BookTop and FeatureVector."""
UNKNOWN_FEED_STATE = "UNKNOWN"
_MS = 1_000_000


class MarketEventError(PoisonRecordError, ValueError):
    """A market event the pipeline cannot use (a missing body, a book change it cannot apply).

    ``outputs`` are the ticks the event closed before it was found bad: they are valid and must
    still be emitted.
    """

    def __init__(self, message: str, outputs: list[TickOutput] | None = None) -> None:
        super().__init__(message)
        self.outputs: list[TickOutput] = outputs or []


class TickOutput(NamedTuple):
    """What one closed grid tick yields: always a BookTop, a FeatureVector unless a side is empty.

    A named tuple (immutable, like the frozen dataclass it was, and three times cheaper to build:
    one is made per tick).
    """

    book_top: BookTop
    features: FeatureVector | None


def _levels(levels: tuple[Level, ...]) -> tuple[BookLevel, ...]:
    return tuple([BookLevel(price_e8=price, size_e8=size) for price, size in levels])


class SymbolPipeline:
    """Order book + features + grid of one symbol.

    Args:
        symbol: the product id (events of other symbols are rejected).
        tick_ms: the grid step ``TICK_MS``.
        max_carried_ms: bound on quiet ticks emitted over a time jump (see the module doc).
    """

    def __init__(self, symbol: str, tick_ms: int, max_carried_ms: int = MAX_CARRIED_MS) -> None:
        if tick_ms <= 0:
            raise ValueError(f"TICK_MS must be positive, got {tick_ms}")
        self.symbol = symbol
        self.tick_ms = tick_ms
        self.tick_ns = tick_ms * _MS
        self.max_carried_ticks = max(1, max_carried_ms // tick_ms)
        self.book = OrderBook(TOP_LEVELS)
        self.features = FeatureState(tick_ms)
        self.exchange = ""
        self.synced = False
        self.epoch = -1
        self.feed_state = UNKNOWN_FEED_STATE
        self.unsynced_reason = "no snapshot yet"
        self.watermark_ns: int | None = None
        """The newest event time seen (time never goes back below it)."""
        self.next_tick_ns: int | None = None
        """The oldest grid tick not closed yet."""
        self._top: tuple[tuple[Level, ...], tuple[Level, ...]] = ((), ())
        # The BookLevel lists of the last emitted top, reused while the top is the same object
        # (records of consecutive ticks then share them, as the quiet ticks of one jump always did).
        self._levels_top: tuple[tuple[Level, ...], tuple[Level, ...]] | None = None
        self._levels_cache: tuple[tuple[BookLevel, ...], tuple[BookLevel, ...]] = ((), ())
        # Restart bookkeeping (positions are the caller's, e.g. Kafka offsets; None = unknown).
        self._watermark_position: int | None = None
        self._status_position: int | None = None
        self._book_position: int | None = None

    # -- restart ----------------------------------------------------------------------------

    @property
    def restart_position(self) -> int | None:
        """The earliest input position from which a fresh pipeline rebuilds this exact state.

        The minimum of: the event that set the current watermark (reproduces time), the last
        STATUS event (reproduces the feed state) and, while synced, the epoch's snapshot — or, for
        a snapshot that arrived out of order, the event that set the watermark before it. Any
        earlier position works too. None when the state needs no input (nothing seen yet, or
        positions were not given).
        """
        positions = [p for p in (self._watermark_position, self._status_position) if p is not None]
        if self.synced and self._book_position is not None:
            positions.append(self._book_position)
        return min(positions) if positions else None

    # -- processing -------------------------------------------------------------------------

    def process(self, event: MarketEvent, position: int | None = None) -> list[TickOutput]:
        """Consume one MarketEvent; return the ticks it closed, oldest first.

        ``position`` is the event's place in the input (the Kafka offset live); it only feeds
        :attr:`restart_position`.

        Raises:
            MarketEventError: the event is unusable (it is then also dropped from the book,
                which turns unsynced if it was a book change). Its ``outputs`` must be emitted.
        """
        kind = event.kind
        if event.symbol != self.symbol:
            raise MarketEventError(f"event of {event.symbol!r} sent to the pipeline of {self.symbol!r}")
        if kind == "GAP" or kind == "STATUS":
            # Control events never move time (module doc, "One clock"): apply at the watermark.
            if not self.exchange:
                self.exchange = event.exchange
            if kind == "GAP":
                gap = event.gap
                if gap is None:
                    raise MarketEventError("GAP event without its 'gap' body")
                self._unsync(f"gap {gap.reason}: {gap.detail}")
            else:
                status = event.status
                if status is None:
                    raise MarketEventError("STATUS event without its 'status' body")
                self.feed_state = status.state
                self._status_position = position
            return []
        # The body of the event's kind, checked before anything changes (a missing one is poison).
        update = event.update
        if kind == "UPDATE" and update is None:
            raise MarketEventError("UPDATE event without its 'update' body")
        trade = event.trade
        if kind == "TRADE" and trade is None:
            raise MarketEventError("TRADE event without its 'trade' body")
        snapshot = event.snapshot
        if kind == "SNAPSHOT" and snapshot is None:
            raise MarketEventError("SNAPSHOT event without its 'snapshot' body")
        ts = event.ts_event
        previous = self.watermark_ns
        if previous is None or ts >= previous:
            in_order = True
            self.watermark_ns = watermark = ts
            self._watermark_position = position
        else:
            in_order = False
            watermark = previous
        if not self.exchange:
            self.exchange = event.exchange
        outputs: list[TickOutput] = []
        next_tick = self.next_tick_ns
        if next_tick is None:
            self.next_tick_ns = -(-watermark // self.tick_ns) * self.tick_ns  # first tick at or after
        elif next_tick < watermark:
            self._close_ticks(watermark, event.ts_init, outputs)

        if kind == "UPDATE" and update is not None:
            if self.synced:
                # Hot path (once per update batch), inlined.
                changes = update.changes
                book = self.book
                try:
                    book.apply(changes)
                except BookError as exc:
                    self._unsync(f"invalid update: {exc}")
                    raise MarketEventError(f"invalid update: {exc}", outputs) from exc
                before = self._top
                top = book.top()  # the same cached object unless a change touched the top levels
                self.features.on_update(watermark, len(changes), before, top)
                if top is not before:
                    self._top = top
                    bids, asks = top
                    if bids and asks and bids[0][0] >= asks[0][0]:
                        self._unsync(f"crossed book: bid {bids[0][0]} >= ask {asks[0][0]}")
        elif kind == "TRADE" and trade is not None:
            if self.synced:
                self.features.on_trade(trade)
        elif kind == "SNAPSHOT" and snapshot is not None:
            try:
                self.book.load(snapshot.bids, snapshot.asks)
            except BookError as exc:
                self._unsync(f"invalid snapshot: {exc}")
                raise MarketEventError(f"invalid snapshot: {exc}", outputs) from exc
            self.synced = True
            self.unsynced_reason = ""
            self.epoch = ts
            # Replaying from an in-order snapshot rebuilds everything; from an out-of-order one,
            # the watermark before it must be rebuilt too (see restart_position).
            self._book_position = position if in_order else self._book_position_before(position)
            self.features.reset(watermark, [level.price_e8 for level in (*snapshot.bids, *snapshot.asks)])
            self._top = self.book.top()
            if self.book.is_crossed():
                self._unsync("crossed snapshot")
        # HEARTBEAT and CLOCK: time only (handled above).
        return outputs

    def _book_position_before(self, position: int | None) -> int | None:
        # The snapshot is older than the watermark: replay must start where the watermark was set.
        return self._watermark_position if self._watermark_position is not None else position

    def _unsync(self, reason: str) -> None:
        self.synced = False
        self.unsynced_reason = reason
        self._book_position = None

    def _close_ticks(self, until_ns: int, ts_init: int, outputs: list[TickOutput]) -> None:
        """Close every grid tick before ``until_ns`` (the watermark)."""
        tick_ns = self.tick_ns
        t = self.next_tick_ns
        assert t is not None
        count = (until_ns - t + tick_ns - 1) // tick_ns
        self.next_tick_ns = t + count * tick_ns
        if not self.synced:
            return  # nothing is emitted while unsynced; the feature state restarts at the snapshot
        emitted = min(count, self.max_carried_ticks)
        top = self._top
        bids, asks = top
        if top is self._levels_top:
            book_bids, book_asks = self._levels_cache  # the top has not changed since the last tick
        else:
            book_bids = _levels(bids)
            book_asks = _levels(asks)
            self._levels_top = top
            self._levels_cache = (book_bids, book_asks)
        symbol, exchange, epoch, tick_ms = self.symbol, self.exchange, self.epoch, self.tick_ms
        for _ in range(emitted):
            values = self.features.close_tick(t, bids, asks)
            book_top = BookTop(
                ts_event=t,
                ts_init=ts_init,
                exchange=exchange,
                symbol=symbol,
                tick_ms=tick_ms,
                epoch=epoch,
                bids=book_bids,
                asks=book_asks,
            )
            vector = None
            if values is not None:
                vector = FeatureVector(
                    ts_event=t,
                    ts_init=ts_init,
                    exchange=exchange,
                    symbol=symbol,
                    tick_ms=tick_ms,
                    epoch=epoch,
                    feature_spec_id=FEATURE_SPEC_ID,
                    values=values,
                    bids=book_bids,
                    asks=book_asks,
                    feed_state=self.feed_state,
                )
            outputs.append(TickOutput(book_top, vector))
            t += tick_ns
        if count > emitted:
            self.features.skip_ticks(count - emitted)


class BookPipeline:
    """:class:`SymbolPipeline` per symbol, created on a symbol's first event.

    Args:
        tick_ms: the grid step ``TICK_MS``.
        max_carried_ms: see :class:`SymbolPipeline`.
    """

    def __init__(self, tick_ms: int, max_carried_ms: int = MAX_CARRIED_MS) -> None:
        self.tick_ms = tick_ms
        self.max_carried_ms = max_carried_ms
        self.pipelines: dict[str, SymbolPipeline] = {}
        FeatureState(tick_ms)  # fail fast when TICK_MS does not divide the feature windows

    def process(self, event: MarketEvent, position: int | None = None) -> list[TickOutput]:
        """Route one MarketEvent to its symbol's pipeline (see :meth:`SymbolPipeline.process`)."""
        symbol = event.symbol
        pipeline = self.pipelines.get(symbol)
        if pipeline is None:
            pipeline = self.pipelines[symbol] = SymbolPipeline(symbol, self.tick_ms, self.max_carried_ms)
        return pipeline.process(event, position)

    def restart_position(self, symbols: set[str] | None = None) -> int | None:
        """The earliest restart position over ``symbols`` (default: all)."""
        positions = [
            position
            for symbol, pipeline in self.pipelines.items()
            if (symbols is None or symbol in symbols) and (position := pipeline.restart_position) is not None
        ]
        return min(positions) if positions else None

    def drop(self, symbols: set[str]) -> None:
        """Forget the state of ``symbols``."""
        for symbol in symbols:
            self.pipelines.pop(symbol, None)
