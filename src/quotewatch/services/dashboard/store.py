"""The latest Snapshot per symbol, shared by the consumer thread (writer) and the callbacks (readers).

One :class:`SnapshotStore` per process, behind one lock: the consumer thread calls
:meth:`SnapshotStore.update` for each decoded record, web-server threads read copies. Reads
never block on the broker. History for the sparklines is a bounded deque per symbol (event
time window and a hard cap on points), so memory stays flat however long the process runs.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from quotewatch.core.clock import Clock
from quotewatch.core.records import Snapshot
from quotewatch.services.dashboard.view import History, Latest, quote_of


@dataclass
class _SymbolState:
    snapshot: Snapshot
    arrived_mono_ns: int
    received: int
    version: int
    ts_event_ns: deque[int] = field(default_factory=deque)
    p_change: deque[float | None] = field(default_factory=deque)
    mid: deque[float | None] = field(default_factory=deque)


class SnapshotStore:
    """Latest snapshot, arrival time and recent history of each symbol. Thread-safe.

    Args:
        clock: gives the monotonic time of arrival (ages are measured on it) and the wall time
            compared with the record's broker timestamp.
        history_seconds: event-time window of the sparklines.
        history_max_points: hard cap of points kept per symbol (oldest dropped first).
    """

    def __init__(self, clock: Clock, history_seconds: float = 300.0, history_max_points: int = 6000) -> None:
        self._clock = clock
        self._window_ns = int(history_seconds * 1e9)
        self._max_points = history_max_points
        self._lock = threading.Lock()
        self._symbols: dict[str, _SymbolState] = {}
        self._records = 0
        self._rejected = 0

    def update(self, snapshot: Snapshot, produced_wall_ns: int | None = None) -> None:
        """Keep ``snapshot`` as the latest of its symbol.

        Who calls this: the consumer thread, once per decoded record, in offset order.

        ``produced_wall_ns`` is the record's broker timestamp. A record that was already old when
        it was read (the backlog of the compacted topic, read from the beginning at start-up) is
        dated back by that much, so a dashboard started while nothing is producing shows its
        data as stale at once instead of fresh for DASH_STALE_MS. Live records are dated by
        their arrival (clock skew between hosts only matters for the backlog, never makes a
        record look newer than its arrival).
        """
        now = self._clock.monotonic_ns()
        backlog = 0
        if produced_wall_ns is not None:
            backlog = max(0, self._clock.now_ns() - produced_wall_ns)
        arrived = now - backlog
        symbol = snapshot.symbol
        ts_event = snapshot.ts_event
        p_change = snapshot.p_change
        mid = quote_of(snapshot).mid
        with self._lock:
            self._records += 1
            state = self._symbols.get(symbol)
            if state is None:
                state = self._symbols[symbol] = _SymbolState(snapshot, arrived, 0, 0)
            state.snapshot = snapshot
            state.arrived_mono_ns = max(arrived, state.arrived_mono_ns) if state.received else arrived
            state.received += 1
            state.version += 1
            if state.ts_event_ns and ts_event < state.ts_event_ns[-1]:
                # Event time went backwards: a new run (a replay, a restarted pipeline) into the
                # same topic. The old line would zigzag; start the history again.
                state.ts_event_ns.clear()
                state.p_change.clear()
                state.mid.clear()
            state.ts_event_ns.append(ts_event)
            state.p_change.append(p_change)
            state.mid.append(mid)
            horizon = ts_event - self._window_ns
            while state.ts_event_ns and (state.ts_event_ns[0] < horizon or len(state.ts_event_ns) > self._max_points):
                state.ts_event_ns.popleft()
                state.p_change.popleft()
                state.mid.popleft()

    def reject(self) -> None:
        """Count a record that could not be decoded (the consumer logs it with its coordinates)."""
        with self._lock:
            self._records += 1
            self._rejected += 1

    def symbols(self) -> list[str]:
        """Every symbol seen so far, sorted."""
        with self._lock:
            return sorted(self._symbols)

    def latest(self, symbol: str | None) -> Latest | None:
        """The newest snapshot of ``symbol`` and its age now, or None before its first one."""
        if symbol is None:
            return None
        now = self._clock.monotonic_ns()
        with self._lock:
            state = self._symbols.get(symbol)
            if state is None:
                return None
            return Latest(symbol, state.snapshot, now - state.arrived_mono_ns, state.received)

    def history(self, symbol: str | None) -> History | None:
        """A copy of the sparkline points of ``symbol``."""
        if symbol is None:
            return None
        with self._lock:
            state = self._symbols.get(symbol)
            if state is None:
                return None
            return History(state.version, tuple(state.ts_event_ns), tuple(state.p_change), tuple(state.mid))

    def counts(self) -> tuple[int, int]:
        """(records read, records rejected) since the process started."""
        with self._lock:
            return self._records, self._rejected

    def seconds_since_last_snapshot(self) -> float | None:
        """Age of the newest snapshot of any symbol, or None before the first."""
        now = self._clock.monotonic_ns()
        with self._lock:
            if not self._symbols:
                return None
            newest = max(state.arrived_mono_ns for state in self._symbols.values())
        return round((now - newest) / 1e9, 3)
