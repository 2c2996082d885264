"""What the dashboard knows of the pipeline upstream of its snapshot topic, to say why it waits.

Before the first snapshot the dashboard has nothing of its own to show, and "waiting" alone does
not tell a user which stage is stuck: the feed, the book, or a service that is not running. The
answer is already on the topics; :class:`UpstreamTracker` folds what the dashboard's
:class:`~quotewatch.services.dashboard.probe.UpstreamProbe` reads of them into one
:class:`SymbolUpstream` per symbol:

- ``md.events`` (decoded): the latest STATUS (the ingest's feed state), SNAPSHOTs and GAPs (is the
  book synced?), and the newest exchange time (has event time passed the first tick?);
- ``book.top3``, ``features``, ``predictions``: records per symbol (keys only, never decoded).

Pure: no Kafka, no clock. :func:`quotewatch.services.dashboard.view.waiting_reasons` turns the
result into text. The rules follow the book (:mod:`quotewatch.domain.market.book_pipeline`): a
SNAPSHOT syncs a symbol, a GAP unsyncs it, and only exchange-timed events (not GAP or STATUS)
move its time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from quotewatch.core.records import MarketEvent

TIMED_KINDS = frozenset(("SNAPSHOT", "UPDATE", "TRADE", "HEARTBEAT", "CLOCK"))
"""Event kinds stamped with the exchange's time: the only ones that move a book's time."""
SUBSCRIBED = "SUBSCRIBED"
Stage = Literal["top3", "features", "predictions"]


@dataclass(slots=True)
class SymbolUpstream:
    """One symbol's progress through the pipeline, as far as the records read show it.

    Mutable for the tracker; everybody else gets copies (:meth:`UpstreamTracker.copy`).
    """

    events: int = 0
    """``md.events`` records of the symbol read."""
    feed_state: str | None = None
    """State of the latest STATUS event (None: no STATUS read)."""
    feed_detail: str = ""
    snapshot_ns: int | None = None
    """Exchange time of the SNAPSHOT that synced the book, None while unsynced (or none read)."""
    synced_at_ns: int | None = None
    """The symbol's newest exchange time when that snapshot arrived (the book's watermark then)."""
    gap: str | None = None
    """``reason: detail`` of the GAP that unsynced a synced book (None: synced, or never synced)."""
    gap_ns: int | None = None
    event_time_ns: int | None = None
    """Newest exchange time of the symbol (SNAPSHOT, UPDATE, TRADE, HEARTBEAT, CLOCK)."""
    top3: int = 0
    features: int = 0
    predictions: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """A copy of what the probe knows, with the topics it read (for the messages)."""

    md_raw: str
    md_events: str
    book_top3: str
    features: str
    predictions: str
    tick_ms: int
    raw_records: int
    """Records on ``md.raw`` (its retained offsets): has the ingest written anything?"""
    symbols: Mapping[str, SymbolUpstream] = field(default_factory=dict)
    configured: tuple[str, ...] = ()
    """The dashboard's SYMBOLS: listed even before any record of theirs was read."""


class UpstreamTracker:
    """Folds records into :class:`SymbolUpstream` values; who calls it: the probe's thread only.

    Events must be given per symbol in stream order (``md.events`` is keyed by symbol, so one
    partition's order is enough).
    """

    def __init__(self) -> None:
        self.symbols: dict[str, SymbolUpstream] = {}

    def on_event(self, event: MarketEvent) -> None:
        """One decoded ``quotewatch.MarketEvent``."""
        state = self._state(event.symbol)
        state.events += 1
        kind = event.kind
        if kind == "STATUS":
            status = event.status
            state.feed_state = status.state if status is not None else ""
            state.feed_detail = status.detail if status is not None else ""
        elif kind == "GAP":
            if state.snapshot_ns is not None:  # a synced book loses its sync
                gap = event.gap
                state.gap = f"{gap.reason}: {gap.detail}" if gap is not None else "None: None"
                state.gap_ns = state.event_time_ns
                state.snapshot_ns = state.synced_at_ns = None
        elif kind in TIMED_KINDS:
            ts = event.ts_event
            if state.event_time_ns is None or ts > state.event_time_ns:
                state.event_time_ns = ts
            if kind == "SNAPSHOT":
                state.snapshot_ns, state.synced_at_ns = ts, state.event_time_ns
                state.gap = state.gap_ns = None

    def on_output(self, stage: Stage, symbol: str) -> None:
        """One record of ``symbol`` on ``book.top3``, ``features`` or ``predictions``."""
        state = self._state(symbol)
        setattr(state, stage, getattr(state, stage) + 1)

    def copy(self) -> dict[str, SymbolUpstream]:
        """A copy of every symbol's state (for other threads)."""
        return {symbol: replace(state) for symbol, state in self.symbols.items()}

    def _state(self, symbol: str) -> SymbolUpstream:
        state = self.symbols.get(symbol)
        if state is None:
            state = self.symbols[symbol] = SymbolUpstream()
        return state
