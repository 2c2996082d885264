"""The snapshot store (fake clock) and the per-process lazy runtime holder."""

from __future__ import annotations

from typing import cast

from quotewatch.core.clock import FakeClock
from quotewatch.services.dashboard.runtime import DashboardRuntime, LazyRuntime
from quotewatch.services.dashboard.store import SnapshotStore
from tests.unit.services.dashboard.factories import T0_NS, level, make_snapshot

SECOND = 1_000_000_000


def test_latest_per_symbol_and_its_age() -> None:
    clock = FakeClock()
    store = SnapshotStore(clock)
    assert store.latest("BTC-USD") is None
    assert store.seconds_since_last_snapshot() is None
    store.update(make_snapshot("BTC-USD", p_change=0.1), clock.now_ns())
    clock.advance(SECOND)
    store.update(make_snapshot("ETH-USD", p_change=0.2), clock.now_ns())
    store.update(make_snapshot("BTC-USD", ts_event=T0_NS + SECOND, p_change=0.3), clock.now_ns())
    clock.advance(SECOND // 2)
    latest = store.latest("BTC-USD")
    assert latest is not None
    assert (latest.snapshot.p_change, latest.age_ns, latest.received) == (0.3, SECOND // 2, 2)
    assert store.symbols() == ["BTC-USD", "ETH-USD"]
    assert store.counts() == (3, 0)
    assert store.seconds_since_last_snapshot() == 0.5
    assert store.latest(None) is None


def test_a_backlog_record_is_dated_back_to_when_it_was_produced() -> None:
    clock = FakeClock()
    store = SnapshotStore(clock)
    store.update(make_snapshot(), produced_wall_ns=clock.now_ns() - 60 * SECOND)
    latest = store.latest("BTC-USD")
    assert latest is not None
    assert latest.age_ns == 60 * SECOND
    # A producer clock ahead of ours never makes a record look newer than its arrival.
    store.update(make_snapshot("ETH-USD"), produced_wall_ns=clock.now_ns() + 5 * SECOND)
    eth = store.latest("ETH-USD")
    assert eth is not None
    assert eth.age_ns == 0


def test_history_window_cap_and_reset_when_event_time_goes_back() -> None:
    clock = FakeClock()
    store = SnapshotStore(clock, history_seconds=10, history_max_points=50)
    for i in range(30):  # 30 s of one point per second: only the last 10 s stay
        store.update(make_snapshot(ts_event=T0_NS + i * SECOND, p_change=i / 100))
    history = store.history("BTC-USD")
    assert history is not None
    assert history.ts_event_ns[0] == T0_NS + 19 * SECOND
    assert len(history.ts_event_ns) == 11
    assert history.p_change[-1] == 0.29
    assert history.mid[-1] == (6_723_451_000_000 + 6_723_452_000_000) / 2e8
    assert history.version == 30

    for i in range(200):  # 100 ms apart: the 50-point cap binds before the window
        store.update(make_snapshot(ts_event=T0_NS + 30 * SECOND + i * SECOND // 10))
    capped = store.history("BTC-USD")
    assert capped is not None
    assert len(capped.ts_event_ns) == 50

    store.update(make_snapshot(ts_event=T0_NS, bids=[], asks=[level("1", "1")]))  # a new run
    reset = store.history("BTC-USD")
    assert reset is not None
    assert (list(reset.ts_event_ns), list(reset.mid)) == ([T0_NS], [None])
    assert store.history("ETH-USD") is None


def test_rejected_records_are_counted() -> None:
    store = SnapshotStore(FakeClock())
    store.reject()
    store.update(make_snapshot())
    assert store.counts() == (2, 1)


class _Runtime:
    """Stands in for a DashboardRuntime: the holder only calls start() and stop()."""

    def __init__(self) -> None:
        self.started = 0
        self.stopped = 0

    def start(self) -> _Runtime:
        self.started += 1
        return self

    def stop(self) -> None:
        self.stopped += 1


def test_lazy_runtime_is_built_once_per_process_on_first_use() -> None:
    built: list[_Runtime] = []
    pid = [100]

    def factory() -> DashboardRuntime:
        built.append(_Runtime())
        return cast(DashboardRuntime, built[-1])

    holder = LazyRuntime(factory, getpid=lambda: pid[0])
    assert built == []  # building the app starts nothing
    assert not holder.built
    first = holder.get()
    assert holder.get() is first
    assert first is cast(DashboardRuntime, built[0])
    assert (len(built), built[0].started) == (1, 1)

    pid[0] = 101  # as seen from a forked worker
    assert not holder.built
    child = holder.get()
    assert child is cast(DashboardRuntime, built[1])
    assert (len(built), built[1].started, built[0].stopped) == (2, 1, 0)  # the parent's client is left alone

    holder.stop()
    assert built[1].stopped == 1
    assert holder.get() is child  # a late request after stop() does not start a new consumer
    assert len(built) == 2
