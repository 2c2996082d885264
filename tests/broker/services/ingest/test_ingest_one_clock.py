"""One clock (issue 21): recordings served with their own exchange times, and host clocks that are off.

The ingest reads over real sockets from the feed server and writes to the real broker; the book is
the pipeline the book service runs (:class:`~quotewatch.domain.market.book_pipeline.BookPipeline`), fed
``md.events`` in stream order. Event time downstream of ingest is the exchange's: a recording of
2018 served today, or an ingest clock 10 minutes off, must still give ticks on the grid at the
exchange's times.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from quotewatch.core.clock import SystemClock
from quotewatch.core.records import FeedStatus, MarketEvent
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import BookPipeline, MarketEventError, TickOutput
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.services.feed_server.server import (
    CaptureSource,
    FaultPlan,
    FeedServer,
    RunningFeedServer,
    serve_in_thread,
)
from tests.broker.services.ingest.test_ingest_feed_server import (
    SYMBOLS,
    ingest_settings,
    read_to_end,
    running_ingest,
    synthetic_server,
)
from tests.helpers import Consumed, shared_data_dir, wait_for
from tests.records import body
from tests.unit.domain.market.test_book_pipeline_captures import ReferenceBooks

TICK_MS = 100
TICK_NS = TICK_MS * 1_000_000
SECOND = 1_000_000_000
TIMED = ("SNAPSHOT", "UPDATE", "TRADE", "HEARTBEAT", "CLOCK")


class SkewedClock(SystemClock):
    """The host's wall clock off by ``skew_ns`` (a VM after suspend, no NTP); monotonic time is true."""

    def __init__(self, skew_ns: int) -> None:
        self.skew_ns = skew_ns

    def now_ns(self) -> int:
        return super().now_ns() + self.skew_ns


def book_ticks(records: list[Consumed[MarketEvent]]) -> dict[str, list[TickOutput]]:
    """The book service's ticks for ``records`` (md.events in partition order: per symbol in stream order)."""
    pipeline = BookPipeline(TICK_MS)
    out: dict[str, list[TickOutput]] = {}
    for record in records:
        event = record.value
        try:
            ticks = pipeline.process(event, record.offset)
        except MarketEventError as exc:
            ticks = exc.outputs
        out.setdefault(event.symbol, []).extend(ticks)
    return out


def on_the_grid(ticks: list[TickOutput]) -> bool:
    times = [t.book_top.ts_event for t in ticks]
    return all(t % TICK_NS == 0 for t in times) and all(a < b for a, b in itertools.pairwise(times))


def replay_finished(running: RunningFeedServer, server: FeedServer) -> bool:
    return bool(running.call(lambda: any(c.replay_finished for c in server.connections)))


CAPTURES = {path.name.split("_20")[0]: path for path in capture_files(shared_data_dir())}


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_a_recording_served_with_its_original_timestamps_gives_the_reference_book(
    make_settings: Callable[..., Any], name: str
) -> None:
    """The server sends the exchange times as recorded (2018, 2021, 2026); the ingest's clock is today's."""
    capture = read_capture(CAPTURES[name])
    protocol = "advanced" if capture.feed == "coinbase-advanced" else "exchange"
    server = FeedServer(protocol, CaptureSource(capture, speed=None), heartbeat_interval=0.25)  # type: ignore[arg-type]
    reference = ReferenceBooks()
    last_update: dict[str, int] = {}
    for line in capture.lines:
        reference.apply_line(line)
    with serve_in_thread(server) as running:
        settings = ingest_settings(make_settings, running.url, protocol, symbols=",".join(capture.symbols))
        topic = TopicNames(settings.topic_prefix).md_events
        with running_ingest(settings):
            wait_for(lambda: replay_finished(running, server), timeout=90, message="the capture replayed")

            def every_book_is_past_its_last_update() -> bool:
                records = read_to_end(settings, topic, MarketEvent)
                for event in (record.value for record in records):
                    if event.kind in ("UPDATE", "SNAPSHOT"):
                        last_update[event.symbol] = max(last_update.get(event.symbol, 0), event.ts_event)
                ticks = book_ticks(records)
                return set(ticks) >= set(capture.symbols) and all(
                    ticks[s] and ticks[s][-1].book_top.ts_event > last_update.get(s, 0) for s in capture.symbols
                )

            wait_for(every_book_is_past_its_last_update, timeout=90, interval=1.0, message="ticks after every update")
            records = read_to_end(settings, topic, MarketEvent)
    ticks = book_ticks(records)
    recorded = [r.value.ts_event for r in records if r.value.kind in ("UPDATE", "TRADE")]
    first, last = min(recorded), max(recorded)
    for symbol in capture.symbols:
        assert on_the_grid(ticks[symbol]), symbol
        times = [t.book_top.ts_event for t in ticks[symbol]]
        # The exchange's clock, not today's: every tick lies within the recording (the end of the
        # window: the ticks that CLOCKs close after the last frame, estimated from the feed's heartbeats).
        assert first - SECOND <= times[0], symbol
        assert times[-1] <= last + 600 * SECOND, symbol
        top = ticks[symbol][-1].book_top
        assert (top.bids, top.asks) == reference.top3(symbol), f"{symbol}: last top-3 = the raw JSON's book"
        assert any(t.features is not None for t in ticks[symbol]), symbol


def ticks_after_resync(records: list[Consumed[MarketEvent]], count: int) -> bool:
    """Every symbol has two snapshots (the connection's and the reconnect's) and ``count`` ticks after the second."""
    snapshots: dict[str, list[int]] = {}
    for event in (record.value for record in records):
        if event.kind == "SNAPSHOT":
            snapshots.setdefault(event.symbol, []).append(event.ts_event)
    ticks = book_ticks(records)
    return all(
        len(snapshots.get(s, ())) >= 2 and sum(t.book_top.ts_event > snapshots[s][1] for t in ticks.get(s, ())) >= count
        for s in SYMBOLS
    )


@pytest.mark.parametrize("skew_seconds", [600, -600], ids=["ahead-10min", "behind-10min"])
def test_an_ingest_clock_off_by_ten_minutes_still_gives_ticks_at_exchange_time(
    make_settings: Callable[..., Any], skew_seconds: int
) -> None:
    """After every snapshot, the book's ticks stay within 1 s of exchange time, both ways, across a reconnect.

    The feed drops the first connection (a reconnect is where a host clock ahead used to silence
    the book). For every exchange-timed event of a synced symbol past the first tick after its
    snapshot, the newest tick the book has emitted is within 1 s of the event's exchange time:
    not behind (ticks follow the exchange), and not ahead (no tick is later than the exchange times
    the feed has sent, which a CLOCK or control record carrying the host's time would cause).
    """
    clock = SkewedClock(skew_seconds * SECOND)
    server = synthetic_server("advanced", FaultPlan(drop_after=600), rate=400.0, max_updates=50_000)
    with serve_in_thread(server) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        topic = TopicNames(settings.topic_prefix).md_events
        with running_ingest(settings, clock=clock):
            wait_for(
                lambda: ticks_after_resync(read_to_end(settings, topic, MarketEvent), 30),
                timeout=90,
                interval=1.0,
                message="3 s of ticks per symbol after the reconnect's snapshot",
            )
            records = read_to_end(settings, topic, MarketEvent)
        connections = running.call(lambda: len(server.connections))
    assert connections >= 2
    # Control records of the first connection carry the skewed local time (nothing else is known);
    # those of the reconnect carry the first connection's exchange-time estimate.
    events = [record.value for record in records]
    connecting = [e for e in events if e.kind == "STATUS" and body(e, FeedStatus).state == "CONNECTING"]
    assert connecting
    assert abs(connecting[0].ts_event - connecting[0].ts_init) < SECOND
    first = connecting[0].connection_id
    # The STATUS made from the second connection's CONNECTED record (not the first one's DISCONNECTED).
    reconnected = [e for e in events if e.kind == "STATUS" and e.connection_id not in ("", first)]
    assert reconnected
    assert body(reconnected[0], FeedStatus).state == "RECONNECTING"
    exchange_now = reconnected[0].ts_init - skew_seconds * SECOND  # the host's clock minus its skew
    assert abs(reconnected[0].ts_event - exchange_now) < 2 * SECOND

    pipeline = BookPipeline(TICK_MS)
    newest_tick: dict[str, int] = {}
    frame_time: dict[str, int] = {}  # the newest exchange time the feed itself sent, per symbol
    first_synced_tick: dict[str, int] = {}
    checked: dict[str, set[int]] = {s: set() for s in SYMBOLS}  # snapshots (epochs) after which ticks were checked
    for record in records:
        event = record.value
        symbol, kind, ts = event.symbol, event.kind, event.ts_event
        if kind in ("SNAPSHOT", "UPDATE", "TRADE", "HEARTBEAT"):
            frame_time[symbol] = max(frame_time.get(symbol, ts), ts)
        try:
            ticks = pipeline.process(event, record.offset)
        except MarketEventError as exc:
            ticks = exc.outputs
        for tick in ticks:
            newest_tick[symbol] = t = tick.book_top.ts_event
            assert t <= frame_time[symbol] + SECOND, f"{symbol}: tick {(t - frame_time[symbol]) / 1e9:.1f} s ahead"
        book = pipeline.pipelines[symbol]
        if kind == "SNAPSHOT":
            assert book.watermark_ns is not None
            first_synced_tick[symbol] = -(-book.watermark_ns // TICK_NS) * TICK_NS
        elif kind == "GAP":
            first_synced_tick.pop(symbol, None)
        if kind in TIMED and symbol in first_synced_tick and ts > first_synced_tick[symbol] and book.synced:
            drift = ts - newest_tick[symbol]
            assert abs(drift) <= SECOND, f"{symbol}: ticks {drift / 1e9:+.1f} s from exchange time"
            checked[symbol].add(book.epoch)
    # Ticks were checked after the first connection's snapshot and after the reconnect's, for every symbol.
    assert all(len(epochs) >= 2 for epochs in checked.values()), checked
    clocks = [e for e in events if e.kind == "CLOCK"]
    assert clocks
    updates = [e.ts_event for e in events if e.kind == "UPDATE"]
    # CLOCKs are exchange-time estimates: within a second of the feed's own times, not of the host's.
    assert all(abs(c.ts_event - c.ts_init + skew_seconds * SECOND) < 2 * SECOND for c in clocks)
    assert min(updates) - SECOND <= clocks[0].ts_event <= max(updates) + SECOND
