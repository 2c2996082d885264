"""The normaliser: ``qw.md.raw`` records in, ``qw.md.events`` records (and rejects) out.

A deterministic, pure state machine over the raw log. The live ingest runs it on every record it
writes to ``qw.md.raw``; a replay (``INGEST_SOURCE=topic``) or a backtest runs it over the stored
log and gets the same events, byte for byte, because the raw log holds every input: frames and
the control records CONNECTED, DISCONNECTED, OVERFLOW and CLOCK.

Rules (per connection: the ingest may spread its products over several connections, whose
records interleave in the one log; each connection's state is its own, and a CONNECTED record
starts a fresh state for its products, replacing the state of any earlier connection that carried
one of them; so processing may start at the CONNECTED of every live connection and give what an
uninterrupted run gives from there):

- **FRAME** -> the parser's events (SNAPSHOT, UPDATE, TRADE, HEARTBEAT) with ``ts_init`` of the
  frame. A symbol is *synced* from its SNAPSHOT until its next GAP. The first SNAPSHOT or book
  subscription confirmation of a symbol on a connection emits STATUS ``SUBSCRIBED`` for it.
- Advanced Trade ``sequence_num`` must grow by exactly 1 per frame: any other value is a GAP
  (``SEQUENCE_JUMP``) for the synced symbols, and a resync request.
- A frame the parsers reject becomes a :class:`Reject` (for the DLQ). When it may have carried book
  changes (malformed, or a book message with a bad field) it is also a GAP (``PARSE_ERROR``) for the
  affected synced symbols and a resync request; an unknown message type is only a reject. A
  multi-product book frame with a bad event for one product is a reject and a GAP for that product
  only (a per-product resync request, ``resync_symbols``); the other products' events are emitted.
- Control frames (subscription acknowledgements, heartbeats) are used for what they say and never
  rejected for anything else odd in them: each oddity is a :class:`Notice` (the ingest logs and
  counts it).
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

from quotewatch.core.bounded import parse_json_object
from quotewatch.core.errors import UntrustedInputError
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
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FrameError, MalformedFrameError, ParsedMessage
from quotewatch.domain.venue.coinbase_advanced import advanced_envelope
from quotewatch.domain.venue.coinbase_feeds import PARSERS

# Feed states carried by STATUS events and control records (see the ingest's state machine).
INIT: Final = "INIT"
CONNECTING: Final = "CONNECTING"
SUBSCRIBED: Final = "SUBSCRIBED"
RECONNECTING: Final = "RECONNECTING"
BACKOFF: Final = "BACKOFF"
STOPPED: Final = "STOPPED"
FEED_STATES: Final = (INIT, CONNECTING, SUBSCRIBED, RECONNECTING, BACKOFF, STOPPED)
_CONTROL_KINDS: Final = frozenset(("GAP", "STATUS"))
CONTROL_TEXT_MAX_BYTES: Final = 64 * 1024
"""A control record's text longer than this is not parsed (the ingest's own are a few hundred bytes)."""
CONTROL_TEXT_MAX_DEPTH: Final = 4
"""A control record's text nests at most this deep (the ingest's own: one flat object)."""
CONTROL_DETAIL_MAX_CHARS: Final = 1024
"""The detail a GAP or STATUS event takes from a control record is cut to this length."""


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


@dataclass(frozen=True, slots=True)
class Notice:
    """An oddity in a control frame that was used anyway (the ingest logs it and counts it in /metrics)."""

    message_type: str
    """The control message (``subscriptions``, ``heartbeats``, ``heartbeat``)."""
    code: str
    """``invalid_field``, ``unknown_field`` or ``unusable`` (:class:`~quotewatch.domain.venue.coinbase.Anomaly`)."""
    detail: str
    source_ref: str
    """``connection_id:frame_index`` of the frame."""


@dataclass(slots=True)
class Normalised:
    """The output of one raw record."""

    events: list[MarketEvent] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    resync: str | None = None
    """Why the connection must be resynchronised (resubscribe for fresh snapshots), or None."""
    resync_symbols: list[str] = field(default_factory=list)
    """Products whose book alone must be resynchronised (a bad event in a multi-product frame)."""
    notices: list[Notice] = field(default_factory=list)


def control_text(state: str, reason: str, **details: Any) -> str:
    """The ``text`` of a control record: a small JSON object with the feed state and the reason."""
    return json.dumps({"state": state, "reason": reason, **details}, sort_keys=True, separators=(",", ":"))


def parse_control_text(text: str, default_state: str) -> tuple[str, str]:
    """``(state, detail)`` of a control record's text; a foreign text keeps ``default_state``.

    The text is not trusted (anyone who can write to ``md.raw`` writes it): it is parsed bounded
    (:data:`CONTROL_TEXT_MAX_BYTES`, :data:`CONTROL_TEXT_MAX_DEPTH`), and a text that is not a
    control object, or a reason too long, becomes a detail of at most :data:`CONTROL_DETAIL_MAX_CHARS`.
    Sample (the ingest's own)::

        {"reason":"connected to wss://advanced-trade-ws.coinbase.com","state":"CONNECTING","url":"wss://..."}
    """
    try:
        payload = parse_json_object(
            text, what="control record text", max_bytes=CONTROL_TEXT_MAX_BYTES, max_depth=CONTROL_TEXT_MAX_DEPTH
        )
    except UntrustedInputError:
        return default_state, _clip(text)
    state = payload.get("state")
    reason = payload.get("reason")
    return (state if state in FEED_STATES else default_state), _clip(reason if isinstance(reason, str) else text)


def _clip(text: str) -> str:
    if len(text) <= CONTROL_DETAIL_MAX_CHARS:
        return text
    return f"{text[:CONTROL_DETAIL_MAX_CHARS]}... ({len(text)} characters)"


@dataclass(slots=True)
class _ConnectionState:
    """What the normaliser knows of one connection (see the module docstring)."""

    connection_id: str
    symbols: tuple[str, ...]
    last_sequence: int = -1
    synced: set[str] = field(default_factory=set)
    subscribed: set[str] = field(default_factory=set)
    last_ts_event: int = -1
    """The latest exchange time seen on the connection (frames and CLOCKs), -1 before the first."""
    control_ts: int = -1
    """The ``ts_event`` of the connection's CONNECTED record (the ingest's best guess, maybe local time)."""
    symbol_ts: dict[str, int] = field(default_factory=dict)
    """The latest exchange time emitted per symbol on the connection (GAP/STATUS not counted)."""
    held: dict[str, tuple[RawFrame, int, BookSnapshot | None]] = field(default_factory=dict)
    """Snapshots without an exchange time, per symbol, waiting for the symbol's next timed event."""

    def latest_ts(self) -> int:
        """The latest exchange time of the connection; before the first, its CONNECTED record's time."""
        return self.last_ts_event if self.last_ts_event >= 0 else self.control_ts

    def synced_sorted(self) -> list[str]:
        return sorted(self.synced)


class Normaliser:
    """Turns RawFrame records into MarketEvent records, deterministically.

    Who calls it: the ingest's writer (live) and the topic-mode stream task (replays), once per
    raw record in log order; the backtest and golden tests over captures. Never raises for bad
    input: everything it cannot use becomes a :class:`Reject`.
    """

    def __init__(self) -> None:
        self._connections: dict[str, _ConnectionState] = {}
        self._owners: dict[str, str] = {}
        """symbol -> the connection that carries it now."""
        self._latest: str | None = None
        self._loose_ts = -1
        """The latest CLOCK time of a connection with no state here (a log read from its middle)."""
        self.frames = 0
        self.rejected = 0

    # -- state -------------------------------------------------------------------------------

    @property
    def connection_id(self) -> str | None:
        """The connection started last."""
        return self._latest

    @property
    def connection_ids(self) -> frozenset[str]:
        """The connections whose state is kept (each carries products no later connection took over)."""
        return frozenset(self._connections)

    @property
    def synced(self) -> frozenset[str]:
        """Symbols whose book is in sync (snapshot seen, no gap since), over every connection."""
        return frozenset(s for state in self._connections.values() for s in state.synced)

    @property
    def subscribed(self) -> frozenset[str]:
        """Symbols whose book subscription is confirmed on their connection."""
        return frozenset(s for state in self._connections.values() for s in state.subscribed)

    def reset(self) -> None:
        """Forget everything (a new log, or a rewind)."""
        self.__init__()  # type: ignore[misc]  # re-initialise in place: the state is only these fields

    def _start(self, raw: RawFrame, inherit: bool) -> tuple[_ConnectionState, list[_ConnectionState]]:
        """A fresh state for the record's connection; the states it replaces (they shared a product).

        With ``inherit`` (frames of a connection whose CONNECTED was not seen) the new state keeps
        the latest exchange times known, as nothing better is.
        """
        connection_id = raw.connection_id
        symbols = tuple(raw.symbols)
        replaced_ids = {self._owners[s] for s in symbols if s in self._owners}
        replaced_ids.add(connection_id)
        replaced = [self._connections.pop(c) for c in sorted(replaced_ids) if c in self._connections]
        for old in replaced:
            for symbol in old.symbols:
                if self._owners.get(symbol) == old.connection_id:
                    del self._owners[symbol]
        state = _ConnectionState(connection_id, symbols)
        if inherit:
            state.last_ts_event = max([self._loose_ts, *(old.last_ts_event for old in replaced)])
            state.control_ts = max([-1, *(old.control_ts for old in replaced)])
        self._connections[connection_id] = state
        for symbol in symbols:
            self._owners[symbol] = connection_id
        self._latest = connection_id
        return state, replaced

    def _owner_of(self, raw: RawFrame) -> _ConnectionState | None:
        """The record's connection, else the connection that carries the record's first product."""
        state = self._connections.get(raw.connection_id)
        if state is None:
            for symbol in raw.symbols:
                owner = self._owners.get(symbol)
                if owner is not None:
                    return self._connections[owner]
        return state

    # -- processing --------------------------------------------------------------------------

    def process(self, raw: RawFrame) -> Normalised:
        """Normalise one raw record (see the module docstring for the rules)."""
        kind = raw.kind
        out = Normalised()
        state: _ConnectionState | None = None
        try:
            if kind == "FRAME":
                state = self._frame(raw, out)
            elif kind == "CLOCK":
                ts = raw.ts_event
                state = self._connections.get(raw.connection_id)
                if state is None:
                    self._loose_ts = max(self._loose_ts, ts)
                else:
                    state.last_ts_event = max(state.last_ts_event, ts)
                for symbol in raw.symbols:
                    if state is not None and state.held:
                        self._release(state, symbol, ts, out.events)
                    out.events.append(self._event(raw, symbol, "CLOCK", ts))
            elif kind == "CONNECTED":
                state = self._connected(raw, out)
            elif kind == "DISCONNECTED":
                state = self._disconnected(raw, out)
            elif kind == "OVERFLOW":
                state = self._owner_of(raw)
                detail = f"local buffer overflow on {raw.connection_id}: {_clip(raw.text)}"
                if state is not None:
                    synced = state.synced_sorted()
                    self._gap(state, raw, out, "BUFFER_OVERFLOW", detail, raw.ts_event, synced, lost=True)
                out.resync = detail
            else:
                out.rejects.append(Reject(f"unknown raw record kind {kind!r:.40}", "InvalidRawRecord", raw))
        except (KeyError, TypeError, ValueError) as exc:
            # A raw record that is not shaped like a RawFrame (a foreign producer): reject it whole.
            out.events.clear()
            out.rejects.append(Reject(f"invalid raw record: {exc!r:.300}", "InvalidRawRecord", raw))
        if state is not None:
            symbol_ts = state.symbol_ts
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

    def _connected(self, raw: RawFrame, out: Normalised) -> _ConnectionState:
        # The connection's exchange time is not known yet: a replay (or the topic-mode ingest)
        # starting at this record then stamps every event alike, and no control record's time
        # (maybe the local clock) is taken for an exchange time.
        detail_state, detail = parse_control_text(raw.text, CONNECTING)  # first: nothing changes if it raises
        state, _ = self._start(raw, inherit=False)
        ts = raw.ts_event
        state.control_ts = ts
        symbols = state.symbols
        out.events.extend(self._status(raw, symbol, detail_state, detail, ts) for symbol in symbols)
        self._gap(state, raw, out, "RECONNECT", f"connection {raw.connection_id} opened: {detail}", ts, symbols)
        return state

    def _disconnected(self, raw: RawFrame, out: Normalised) -> _ConnectionState | None:
        next_state, detail = parse_control_text(raw.text, RECONNECTING)
        ts = raw.ts_event
        own = self._connections.get(raw.connection_id)
        # A failed attempt's DISCONNECTED carries the attempt's own id: the products' connection is
        # then the one that carries them (its losses were recorded when it closed).
        state = own if own is not None else self._owner_of(raw)
        symbols = own.symbols if own is not None else tuple(raw.symbols)
        if own is not None:
            own.held.clear()  # snapshots still waiting for an exchange time: their connection is gone
        out.events.extend(self._status(raw, symbol, next_state, detail, ts) for symbol in symbols)
        if state is not None:
            detail = f"connection {raw.connection_id} closed: {detail}"
            self._gap(state, raw, out, "RECONNECT", detail, ts, state.synced_sorted())
            state.subscribed.clear()
        return state

    def _frame(self, raw: RawFrame, out: Normalised) -> _ConnectionState:
        self.frames += 1
        state = self._connections.get(raw.connection_id)
        if state is None:
            # Frames of a connection whose CONNECTED record this normaliser has not seen (it started
            # mid-log, or a producer without control records): adopt it; nothing earlier continues.
            state, replaced = self._start(raw, inherit=True)
            previously_synced = sorted({s for old in replaced for s in old.synced})
            if previously_synced:
                detail = f"frames of connection {raw.connection_id} without its CONNECTED record"
                self._gap(state, raw, out, "RECONNECT", detail, state.latest_ts(), previously_synced)
        feed = raw.feed
        parser = PARSERS.get(feed)
        if parser is None:
            out.rejects.append(Reject(f"unknown feed {feed!r:.40}", "InvalidRawRecord", raw))
            return state
        try:
            message = orjson.loads(raw.text)
        except orjson.JSONDecodeError as exc:
            self._rejected(state, raw, out, MalformedFrameError(f"not JSON: {exc}", book_affected=True))
            return state
        if feed == FEED_ADVANCED:
            sequence, _ = advanced_envelope(message)
            if sequence >= 0:
                expected = state.last_sequence + 1
                if state.last_sequence >= 0 and sequence != expected:
                    detail = (
                        f"sequence_num jumped from {state.last_sequence} to {sequence} on {raw.connection_id} "
                        f"(frame {raw.frame_index})"
                    )
                    self._gap(
                        state,
                        raw,
                        out,
                        "SEQUENCE_JUMP",
                        detail,
                        state.latest_ts(),
                        state.synced_sorted(),
                        expected,
                        sequence,
                        lost=True,
                    )
                    out.resync = detail
                state.last_sequence = sequence
        try:
            parsed = parser(message)
        except FrameError as exc:
            self._rejected(state, raw, out, exc)
            return state
        self._emit(state, raw, parsed, out)
        for error in parsed.failed:
            self._rejected(state, raw, out, error, per_product=True)
        if parsed.anomalies:
            ref = f"{raw.connection_id}:{raw.frame_index}"
            out.notices.extend(Notice(parsed.control, a.code, a.detail, ref) for a in parsed.anomalies)
        return state

    def _emit(self, state: _ConnectionState, raw: RawFrame, parsed: ParsedMessage, out: Normalised) -> None:
        for symbol in parsed.confirmed:
            self._confirm(state, raw, symbol, out, parsed.ts_event)
        events = out.events
        sequence = parsed.sequence
        held = state.held
        for item in parsed.events:
            ts = item.ts_event
            kind = item.kind
            if ts < 0:
                if kind == "SNAPSHOT" and item.symbol is not None:
                    # No exchange time in the message (Exchange snapshots): held until the symbol's
                    # next event with one (module doc, "Event times"); a later snapshot replaces it.
                    held_body = item.body if isinstance(item.body, BookSnapshot) else None
                    held[item.symbol] = (raw, sequence, held_body)
                    state.synced.discard(item.symbol)
                    continue
                ts = state.latest_ts()  # no such message today; never taken for an exchange time
            elif ts > state.last_ts_event:
                state.last_ts_event = ts
            if item.symbol is None:
                for symbol in state.symbols:
                    if held:
                        self._release(state, symbol, ts, events)
                    events.append(self._event(raw, symbol, kind, ts, sequence))
                continue
            if held:
                self._release(state, item.symbol, ts, events)
            # A parser pairs each kind with its body (a missing one is the pipeline's MarketEventError).
            body = item.body
            if kind == "UPDATE":
                update = body if isinstance(body, BookUpdate) else None
                event = self._event(raw, item.symbol, kind, ts, sequence, update=update)
            elif kind == "SNAPSHOT":
                snapshot = body if isinstance(body, BookSnapshot) else None
                event = self._event(raw, item.symbol, kind, ts, sequence, snapshot=snapshot)
                state.synced.add(item.symbol)
            elif kind == "TRADE":
                trade = body if isinstance(body, Trade) else None
                event = self._event(raw, item.symbol, kind, ts, sequence, trade=trade)
            else:
                event = self._event(raw, item.symbol, kind, ts, sequence)
            events.append(event)

    def _release(self, state: _ConnectionState, symbol: str, ts: int, events: list[MarketEvent]) -> None:
        """Emit the held snapshot of ``symbol`` (if any) at ``ts``, the symbol's next exchange time."""
        held = state.held.pop(symbol, None)
        if held is not None:
            raw, sequence, snapshot = held
            state.synced.add(symbol)
            events.append(self._event(raw, symbol, "SNAPSHOT", ts, sequence, snapshot=snapshot))

    def _confirm(self, state: _ConnectionState, raw: RawFrame, symbol: str, out: Normalised, ts: int | None) -> None:
        if symbol in state.subscribed:
            return
        state.subscribed.add(symbol)
        if ts is None:
            ts = state.latest_ts()
        detail = f"book subscription confirmed on {raw.connection_id}"
        out.events.append(self._status(raw, symbol, SUBSCRIBED, detail, ts))

    def _rejected(
        self, state: _ConnectionState, raw: RawFrame, out: Normalised, error: FrameError, *, per_product: bool = False
    ) -> None:
        out.rejects.append(Reject(str(error), error.error_type, raw, error.symbol))
        if not error.book_affected:
            return
        if error.symbol is not None:
            state.held.pop(error.symbol, None)
            affected: Sequence[str] = [error.symbol] if error.symbol in state.synced else []
        else:
            affected = state.synced_sorted()
        detail = (
            f"frame {raw.connection_id}:{raw.frame_index} may have carried book changes "
            f"and was rejected: {error!s:.200}"
        )
        if per_product:
            detail = (
                f"frame {raw.connection_id}:{raw.frame_index}: the event of {error.symbol} "
                f"was rejected (the frame's other products were applied): {error!s:.200}"
            )
        self._gap(
            state,
            raw,
            out,
            "PARSE_ERROR",
            detail,
            state.latest_ts(),
            affected,
            lost=True,
            affected_all=error.symbol is None,
        )
        if per_product and error.symbol is not None:
            if error.symbol not in out.resync_symbols:
                out.resync_symbols.append(error.symbol)
        else:
            out.resync = detail

    # -- building events ---------------------------------------------------------------------

    def _gap(
        self,
        state: _ConnectionState,
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
        if lost and state.held:
            # A held snapshot is followed by lost changes: it is no base any more (the resync
            # requested with the GAP brings a new one). Never emitted, so no GAP is owed for it.
            if affected_all:
                state.held.clear()
            else:
                for symbol in symbols:
                    state.held.pop(symbol, None)
        for symbol in symbols:
            state.synced.discard(symbol)
            ts = state.symbol_ts.get(symbol, ts_event) if lost else ts_event
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
