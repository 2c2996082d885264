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
from quotewatch.services.feed_server.server import CaptureSource, FeedServer, RunningFeedServer, serve_in_thread
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


@pytest.mark.parametrize("skew_seconds", [600, -600], ids=["ahead-10min", "behind-10min"])
def test_an_ingest_clock_off_by_ten_minutes_still_gives_ticks_at_exchange_time(
    make_settings: Callable[..., Any], skew_seconds: int
) -> None:
    """After the snapshot, every event is in a tick within 1 s of its exchange time, both ways."""
    clock = SkewedClock(skew_seconds * SECOND)
    with serve_in_thread(synthetic_server("advanced", rate=400.0)) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        topic = TopicNames(settings.topic_prefix).md_events
        with running_ingest(settings, clock=clock):

            def five_seconds_of_ticks() -> bool:
                ticks = book_ticks(read_to_end(settings, topic, MarketEvent))
                return all(len(ticks.get(s, ())) >= 50 for s in SYMBOLS)

            wait_for(five_seconds_of_ticks, timeout=60, interval=1.0, message="5 s of ticks per symbol")
            records = read_to_end(settings, topic, MarketEvent)
    events = [record.value for record in records]
    # Control records of the first connection carry the skewed local time (nothing else is known).
    status = [e for e in events if e.kind == "STATUS" and body(e, FeedStatus).state == "CONNECTING"]
    assert status
    assert abs(status[0].ts_event - status[0].ts_init) < SECOND
    pipeline = BookPipeline(TICK_MS)
    worst: dict[str, int] = {}
    newest_tick: dict[str, int] = {}
    synced_at: dict[str, int] = {}
    for record in records:
        event, symbol = record.value, record.value.symbol
        for tick in pipeline.process(event, record.offset):
            newest_tick[symbol] = tick.book_top.ts_event
        if event.kind == "SNAPSHOT":
            synced_at.setdefault(symbol, event.ts_event)
        if event.kind in TIMED and symbol in synced_at and event.ts_event >= synced_at[symbol] + SECOND:
            # The tick grid trails this event's exchange time by at most 1 s.
            lag = event.ts_event - newest_tick.get(symbol, 0)
            worst[symbol] = max(worst.get(symbol, 0), lag)
            assert lag <= SECOND, f"{symbol}: ticks {lag / 1e9:.1f} s behind exchange time"
    assert set(worst) == set(SYMBOLS)
    clocks = [e for e in events if e.kind == "CLOCK"]
    assert clocks
    updates = [e.ts_event for e in events if e.kind == "UPDATE"]
    # CLOCKs are exchange-time estimates: within a second of the feed's own times, not of the host's.
    assert all(abs(c.ts_event - c.ts_init + skew_seconds * SECOND) < 2 * SECOND for c in clocks)
    assert min(updates) - SECOND <= clocks[0].ts_event <= max(updates) + SECOND
