"""The normaliser: ``qw.md.raw`` records in, ``qw.md.events`` records (and rejects) out.

A deterministic, pure state machine over the raw log. The live ingest runs it on every record it
writes to ``qw.md.raw``; a replay (``INGEST_SOURCE=topic``) or a backtest runs it over the stored
log and gets the same events, byte for byte, because the raw log holds every input: frames and
the control records CONNECTED, DISCONNECTED, OVERFLOW and CLOCK.

Rules (per connection; a CONNECTED record resets all state, so processing may start at any
CONNECTED and give what an uninterrupted run gives from there):

- **FRAME** -> the parser's events (SNAPSHOT, UPDATE, TRADE, HEARTBEAT) with ``ts_init`` of the
  frame. A symbol is *synced* from its SNAPSHOT until its next GAP. The first SNAPSHOT or book
  subscription confirmation of a symbol on a connection emits STATUS ``SUBSCRIBED`` for it.
- Advanced Trade ``sequence_num`` must grow by exactly 1 per frame: any other value is a GAP
  (``SEQUENCE_JUMP``) for the synced symbols, and a resync request.
- A frame the parsers reject becomes a :class:`Reject` (for the DLQ). When it may have carried book
  changes (malformed, or a book message with a bad field) it is also a GAP (``PARSE_ERROR``) for the
  affected synced symbols and a resync request; an unknown message type is only a reject.
- **CONNECTED** -> STATUS (``CONNECTING``/``RECONNECTING``) and a GAP (``RECONNECT``) for every
  symbol of the connection: nothing before it can be trusted to continue.
- **DISCONNECTED** -> STATUS (the next state: ``RECONNECTING``, ``BACKOFF`` or ``STOPPED``) and a GAP
  (``RECONNECT``) for the synced symbols.
- **OVERFLOW** -> a GAP (``BUFFER_OVERFLOW``) for the synced symbols, and a resync request.
- **CLOCK** -> one CLOCK event per symbol of the record, ``ts_event`` = the record's exchange-time
  estimate.

Event times (one clock, the exchange's; docs/architecture.md, "Time"): a frame's events carry the
exchange's times. A snapshot without one (Coinbase Exchange snapshots have no ``time``) is
**held** until the next event of its symbol on the connection that has one (its first update,
trade, heartbeat or CLOCK) and emitted just before it, at that event's time: its receive time is
the local clock, which may be months ahead of a recorded session. A held snapshot is dropped when
its connection ends or changes are lost after it (the resync brings a new one). Events made from
control records (STATUS, RECONNECT GAP) carry the record's ``ts_event``: the ingest's exchange-time
estimate, or, before the connection's first exchange time, the latest one known or local time;
the book pipeline never takes its time from them. A GAP for lost book changes
(``SEQUENCE_JUMP``, ``PARSE_ERROR``, ``BUFFER_OVERFLOW``) carries, per symbol, the time of the
latest event emitted for that symbol on the connection: its last good event. Later times are no
bound on the time of the lost change: the revealing frame's ``timestamp`` is its send time, later
than its own updates' ``event_time``, and the latest time on the connection may be another
product's, stamped later than the lost update though sent before it (in the 2026 capture,
sequence 161 is a BTC-USD update at 21:05:52.108 and 162 an ETH-USD one at 21:05:51.982).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from quotewatch.core.records import (
    BookSnapshot,
    BookUpdate,
    EventKind,
    FeedStatus,
    Gap,
    GapReason,
    MarketEvent,
    RawFrame,
    Trade,
)
from quotewatch.domain.venue.coinbase import (
    FEED_ADVANCED,
    PARSERS,
    FrameError,
    MalformedFrameError,
    ParsedMessage,
    advanced_envelope,
)

# Feed states carried by STATUS events and control records (see the ingest's state machine).
INIT: Final = "INIT"
CONNECTING: Final = "CONNECTING"
SUBSCRIBED: Final = "SUBSCRIBED"
RECONNECTING: Final = "RECONNECTING"
BACKOFF: Final = "BACKOFF"
STOPPED: Final = "STOPPED"
FEED_STATES: Final = (INIT, CONNECTING, SUBSCRIBED, RECONNECTING, BACKOFF, STOPPED)
_CONTROL_KINDS: Final = frozenset(("GAP", "STATUS"))


@dataclass(slots=True)
class Reject:
    """A raw record the normaliser could not use: goes to ``qw.dlq`` with the record's coordinates."""

    reason: str
    error_type: str
    raw: RawFrame
    symbol: str | None = None

    @property
    def source_ref(self) -> str:
        """``connection_id:frame_index``: where to find the frame again in ``qw.md.raw``."""
        return f"{self.raw.connection_id}:{self.raw.frame_index}"


@dataclass(slots=True)
class Normalised:
    """The output of one raw record."""

    events: list[MarketEvent] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    resync: str | None = None
    """Why the connection must be resynchronised (resubscribe for fresh snapshots), or None."""


def control_text(state: str, reason: str, **details: Any) -> str:
    """The ``text`` of a control record: a small JSON object with the feed state and the reason."""
    return json.dumps({"state": state, "reason": reason, **details}, sort_keys=True, separators=(",", ":"))


def parse_control_text(text: str, default_state: str) -> tuple[str, str]:
    """``(state, detail)`` of a control record's text; a foreign text keeps ``default_state``."""
    try:
        payload = json.loads(text)
    except ValueError:
        return default_state, text
    if not isinstance(payload, dict):
        return default_state, text
    state = payload.get("state")
    reason = payload.get("reason")
    return (state if state in FEED_STATES else default_state), (reason if isinstance(reason, str) else text)


class Normaliser:
    """Turns RawFrame records into MarketEvent records, deterministically.

    Who calls it: the ingest's writer (live) and the topic-mode stream task (replays), once per
    raw record in log order; the backtest and golden tests over captures. Never raises for bad
    input: everything it cannot use becomes a :class:`Reject`.
    """

    def __init__(self) -> None:
        self._connection: str | None = None
        self._symbols: tuple[str, ...] = ()
        self._last_sequence = -1
        self._synced: set[str] = set()
        self._subscribed: set[str] = set()
        self._last_ts_event = -1
        """The latest exchange time seen on the connection (frames and CLOCKs), -1 before the first."""
        self._control_ts = -1
        """The ``ts_event`` of the connection's CONNECTED record (the ingest's best guess, maybe local time)."""
        self._symbol_ts: dict[str, int] = {}
        """The latest exchange time emitted per symbol on the current connection (GAP/STATUS not counted)."""
        self._held: dict[str, tuple[RawFrame, int, BookSnapshot | None]] = {}
        """Snapshots without an exchange time, per symbol, waiting for the symbol's next timed event."""
        self.frames = 0
        self.rejected = 0

    # -- state -------------------------------------------------------------------------------

    @property
    def connection_id(self) -> str | None:
        return self._connection

    @property
    def synced(self) -> frozenset[str]:
        """Symbols whose book is in sync (snapshot seen, no gap since)."""
        return frozenset(self._synced)

    @property
    def subscribed(self) -> frozenset[str]:
        """Symbols whose book subscription is confirmed on the current connection."""
        return frozenset(self._subscribed)

    def reset(self) -> None:
        """Forget everything (a new log, or a rewind)."""
        self.__init__()  # type: ignore[misc]  # re-initialise in place: the state is only these fields

    def _start(self, raw: RawFrame) -> None:
        self._connection = raw.connection_id
        self._symbols = tuple(raw.symbols)
        self._last_sequence = -1
        self._synced.clear()
        self._subscribed.clear()
        self._symbol_ts.clear()
        self._held.clear()

    # -- processing --------------------------------------------------------------------------

    def process(self, raw: RawFrame) -> Normalised:
        """Normalise one raw record (see the module docstring for the rules)."""
        kind = raw.kind
        out = Normalised()
        try:
            if kind == "FRAME":
                self._frame(raw, out)
            elif kind == "CLOCK":
                ts = raw.ts_event
                self._last_ts_event = max(self._last_ts_event, ts)
                for symbol in raw.symbols:
                    if self._held:
                        self._release(symbol, ts, out.events)
                    out.events.append(self._event(raw, symbol, "CLOCK", ts))
            elif kind == "CONNECTED":
                self._connected(raw, out)
            elif kind == "DISCONNECTED":
                self._disconnected(raw, out)
            elif kind == "OVERFLOW":
                detail = f"local buffer overflow on {raw.connection_id}: {raw.text}"
                self._gap(raw, out, "BUFFER_OVERFLOW", detail, raw.ts_event, self._synced_sorted(), lost=True)
                out.resync = detail
            else:
                out.rejects.append(Reject(f"unknown raw record kind {kind!r:.40}", "InvalidRawRecord", raw))
        except (KeyError, TypeError, ValueError) as exc:
            # A raw record that is not shaped like a RawFrame (a foreign producer): reject it whole.
            out.events.clear()
            out.rejects.append(Reject(f"invalid raw record: {exc!r:.300}", "InvalidRawRecord", raw))
        symbol_ts = self._symbol_ts
        for event in out.events:
            ts = event.ts_event
            if event.kind in _CONTROL_KINDS:
                continue  # a control event's time may be another clock's, never a good event's
            if ts > symbol_ts.get(event.symbol, -1):
                symbol_ts[event.symbol] = ts
        self.rejected += len(out.rejects)
        return out

    def process_all(self, raws: Iterable[RawFrame]) -> tuple[list[MarketEvent], list[Reject]]:
        """Normalise a whole log; returns all events and all rejects (captures, tests, backtests)."""
        events: list[MarketEvent] = []
        rejects: list[Reject] = []
        for raw in raws:
            out = self.process(raw)
            events.extend(out.events)
            rejects.extend(out.rejects)
        return events, rejects

    def _connected(self, raw: RawFrame, out: Normalised) -> None:
        self._start(raw)
        state, detail = parse_control_text(raw.text, CONNECTING)
        ts = raw.ts_event
        # The connection's exchange time is not known yet: a replay (or the topic-mode ingest)
        # starting at this record then stamps every event alike, and no control record's time
        # (maybe the local clock) is taken for an exchange time.
        self._last_ts_event = -1
        self._control_ts = ts
        symbols = self._symbols
        out.events.extend(self._status(raw, symbol, state, detail, ts) for symbol in symbols)
        self._gap(raw, out, "RECONNECT", f"connection {raw.connection_id} opened: {detail}", ts, symbols)

    def _disconnected(self, raw: RawFrame, out: Normalised) -> None:
        state, detail = parse_control_text(raw.text, RECONNECTING)
        ts = raw.ts_event
        symbols = self._symbols if raw.connection_id == self._connection else tuple(raw.symbols)
        if raw.connection_id == self._connection:
            self._held.clear()  # snapshots still waiting for an exchange time: their connection is gone
        out.events.extend(self._status(raw, symbol, state, detail, ts) for symbol in symbols)
        self._gap(raw, out, "RECONNECT", f"connection {raw.connection_id} closed: {detail}", ts, self._synced_sorted())
        self._subscribed.clear()

    def _frame(self, raw: RawFrame, out: Normalised) -> None:
        self.frames += 1
        if raw.connection_id != self._connection:
            # Frames of a connection whose CONNECTED record this normaliser has not seen (it started
            # mid-log, or a producer without control records): adopt it; nothing earlier continues.
            previously_synced = self._synced_sorted()
            self._start(raw)
            if previously_synced:
                detail = f"frames of connection {raw.connection_id} without its CONNECTED record"
                self._gap(raw, out, "RECONNECT", detail, self._latest_ts(), previously_synced)
        feed = raw.feed
        parser = PARSERS.get(feed)
        if parser is None:
            out.rejects.append(Reject(f"unknown feed {feed!r:.40}", "InvalidRawRecord", raw))
            return
        try:
            message = orjson.loads(raw.text)
        except orjson.JSONDecodeError as exc:
            self._rejected(raw, out, MalformedFrameError(f"not JSON: {exc}", book_affected=True))
            return
        if feed == FEED_ADVANCED:
            sequence, _ = advanced_envelope(message)
            if sequence >= 0:
                expected = self._last_sequence + 1
                if self._last_sequence >= 0 and sequence != expected:
                    detail = (
                        f"sequence_num jumped from {self._last_sequence} to {sequence} on {raw.connection_id} "
                        f"(frame {raw.frame_index})"
                    )
                    self._gap(
                        raw,
                        out,
                        "SEQUENCE_JUMP",
                        detail,
                        self._latest_ts(),
                        self._synced_sorted(),
                        expected,
                        sequence,
                        lost=True,
                    )
                    out.resync = detail
                self._last_sequence = sequence
        try:
            parsed = parser(message)
        except FrameError as exc:
            self._rejected(raw, out, exc)
            return
        self._emit(raw, parsed, out)

    def _emit(self, raw: RawFrame, parsed: ParsedMessage, out: Normalised) -> None:
        for symbol in parsed.confirmed:
            self._confirm(raw, symbol, out, parsed.ts_event)
        events = out.events
        sequence = parsed.sequence
        held = self._held
        for item in parsed.events:
            ts = item.ts_event
            kind = item.kind
            if ts < 0:
                if kind == "SNAPSHOT" and item.symbol is not None:
                    # No exchange time in the message (Exchange snapshots): held until the symbol's
                    # next event with one (module doc, "Event times"); a later snapshot replaces it.
                    held_body = item.body if isinstance(item.body, BookSnapshot) else None
                    held[item.symbol] = (raw, sequence, held_body)
                    self._synced.discard(item.symbol)
                    continue
                ts = self._latest_ts()  # no such message today; never taken for an exchange time
            elif ts > self._last_ts_event:
                self._last_ts_event = ts
            if item.symbol is None:
                for symbol in self._symbols:
                    if held:
                        self._release(symbol, ts, events)
                    events.append(self._event(raw, symbol, kind, ts, sequence))
                continue
            if held:
                self._release(item.symbol, ts, events)
            # A parser pairs each kind with its body (a missing one is the pipeline's MarketEventError).
            body = item.body
            if kind == "UPDATE":
                update = body if isinstance(body, BookUpdate) else None
                event = self._event(raw, item.symbol, kind, ts, sequence, update=update)
            elif kind == "SNAPSHOT":
                snapshot = body if isinstance(body, BookSnapshot) else None
                event = self._event(raw, item.symbol, kind, ts, sequence, snapshot=snapshot)
                self._synced.add(item.symbol)
            elif kind == "TRADE":
                trade = body if isinstance(body, Trade) else None
                event = self._event(raw, item.symbol, kind, ts, sequence, trade=trade)
            else:
                event = self._event(raw, item.symbol, kind, ts, sequence)
            events.append(event)

    def _release(self, symbol: str, ts: int, events: list[MarketEvent]) -> None:
        """Emit the held snapshot of ``symbol`` (if any) at ``ts``, the symbol's next exchange time."""
        held = self._held.pop(symbol, None)
        if held is not None:
            raw, sequence, snapshot = held
            self._synced.add(symbol)
            events.append(self._event(raw, symbol, "SNAPSHOT", ts, sequence, snapshot=snapshot))

    def _confirm(self, raw: RawFrame, symbol: str, out: Normalised, ts: int | None) -> None:
        if symbol in self._subscribed:
            return
        self._subscribed.add(symbol)
        if ts is None:
            ts = self._latest_ts()
        detail = f"book subscription confirmed on {raw.connection_id}"
        out.events.append(self._status(raw, symbol, SUBSCRIBED, detail, ts))

    def _rejected(self, raw: RawFrame, out: Normalised, error: FrameError) -> None:
        out.rejects.append(Reject(str(error), error.error_type, raw, error.symbol))
        if not error.book_affected:
            return
        if error.symbol is not None:
            self._held.pop(error.symbol, None)
            affected: Sequence[str] = [error.symbol] if error.symbol in self._synced else []
        else:
            affected = self._synced_sorted()
        detail = (
            f"frame {raw.connection_id}:{raw.frame_index} may have carried book changes "
            f"and was rejected: {error!s:.200}"
        )
        self._gap(
            raw, out, "PARSE_ERROR", detail, self._latest_ts(), affected, lost=True, affected_all=error.symbol is None
        )
        out.resync = detail

    # -- building events ---------------------------------------------------------------------

    def _latest_ts(self) -> int:
        """The latest exchange time of the connection; before the first, its CONNECTED record's time."""
        return self._last_ts_event if self._last_ts_event >= 0 else self._control_ts

    def _synced_sorted(self) -> list[str]:
        return sorted(self._synced)

    def _gap(
        self,
        raw: RawFrame,
        out: Normalised,
        reason: GapReason,
        detail: str,
        ts_event: int,
        symbols: Iterable[str],
        expected: int = -1,
        received: int = -1,
        *,
        lost: bool = False,
        affected_all: bool = True,
    ) -> None:
        """GAP events for ``symbols`` at ``ts_event``; when book changes were ``lost``, each at the
        time of its symbol's latest event instead (``ts_event`` only if it has none), see the module doc.
        """
        if lost and self._held:
            # A held snapshot is followed by lost changes: it is no base any more (the resync
            # requested with the GAP brings a new one). Never emitted, so no GAP is owed for it.
            if affected_all:
                self._held.clear()
            else:
                for symbol in symbols:
                    self._held.pop(symbol, None)
        for symbol in symbols:
            self._synced.discard(symbol)
            ts = self._symbol_ts.get(symbol, ts_event) if lost else ts_event
            gap = Gap(reason=reason, detail=detail, expected_sequence=expected, received_sequence=received)
            out.events.append(self._event(raw, symbol, "GAP", ts if ts >= 0 else raw.ts_init, gap=gap))

    def _status(self, raw: RawFrame, symbol: str, state: str, detail: str, ts_event: int) -> MarketEvent:
        status = FeedStatus(state=state, detail=detail)
        return self._event(raw, symbol, "STATUS", ts_event if ts_event >= 0 else raw.ts_init, status=status)

    @staticmethod
    def _event(
        raw: RawFrame,
        symbol: str,
        kind: EventKind,
        ts_event: int,
        sequence: int = -1,
        *,
        snapshot: BookSnapshot | None = None,
        update: BookUpdate | None = None,
        trade: Trade | None = None,
        gap: Gap | None = None,
        status: FeedStatus | None = None,
    ) -> MarketEvent:
        return MarketEvent(
            ts_event=ts_event,
            ts_init=raw.ts_init,
            exchange=raw.exchange,
            feed=raw.feed,
            symbol=symbol,
            kind=kind,
            source_sequence=sequence,
            connection_id=raw.connection_id,
            snapshot=snapshot,
            update=update,
            trade=trade,
            gap=gap,
            status=status,
        )
