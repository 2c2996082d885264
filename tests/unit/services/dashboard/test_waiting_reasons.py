"""Why the dashboard waits: the upstream tracker over real MarketEvent records, and one reason per stage.

The events are shaped like ``quotewatch.MarketEvent`` (each is encoded with the real serde), in the
order the ingest writes them for one connection: STATUS CONNECTING + a RECONNECT GAP, STATUS
SUBSCRIBED, SNAPSHOT, then timed events.
"""

from __future__ import annotations

import pytest
from dash import html

from quotewatch.core.records import MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.services.dashboard.upstream import UpstreamTracker, UpstreamView
from quotewatch.services.dashboard.view import FeedView, render_kpis
from quotewatch.services.dashboard.waiting import waiting_reasons
from tests.unit.services.dashboard.factories import gap_event, snapshot_event, status_event, update_event

T0 = 1_786_309_548_000_000_000  # 2026-08-09T21:05:48Z, on the 100 ms grid
MS = 1_000_000
TOPIC = "qw.md.events"


def checked(record: MarketEvent) -> MarketEvent:
    AvroSerde().encode(TOPIC, record)  # the shape the probe decodes, or this raises
    return record


def status(state: str, ts: int, detail: str = "") -> MarketEvent:
    return checked(status_event(state, ts, detail))


def gap(reason: str, ts: int, detail: str = "") -> MarketEvent:
    return checked(gap_event(reason, ts, detail))


def snapshot(ts: int) -> MarketEvent:
    return checked(snapshot_event(ts))


def update(ts: int, symbol: str = "BTC-USD") -> MarketEvent:
    return checked(update_event(ts, symbol))


def view(tracker: UpstreamTracker, raw_records: int = 10, configured: tuple[str, ...] = ("BTC-USD",)) -> UpstreamView:
    return UpstreamView(
        md_raw="qw.md.raw",
        md_events=TOPIC,
        book_top3="qw.book.top3",
        features="qw.features",
        predictions="qw.predictions",
        tick_ms=100,
        raw_records=raw_records,
        symbols=tracker.copy(),
        configured=configured,
    )


def reasons_after(*events: MarketEvent, **outputs: int) -> list[str]:
    tracker = UpstreamTracker()
    for record in events:
        tracker.on_event(record)
    for stage, count in outputs.items():
        for _ in range(count):
            tracker.on_output(stage, "BTC-USD")  # type: ignore[arg-type]  # the test names real stages
    return waiting_reasons(view(tracker))


CONNECTING = (status("CONNECTING", T0), gap("RECONNECT", T0, "connection c1 opened"))
SUBSCRIBED = (*CONNECTING, status("SUBSCRIBED", T0 + 10 * MS, "level2"))
SYNCED = (*SUBSCRIBED, snapshot(T0 + 120 * MS))


def test_nothing_from_the_feed_at_all() -> None:
    assert waiting_reasons(view(UpstreamTracker(), raw_records=0)) == [
        "Nothing on qw.md.raw yet: no frame from the feed (is the ingest running and connected?)"
    ]


def test_no_market_event_for_a_symbol() -> None:
    tracker = UpstreamTracker()
    tracker.on_event(update(T0, "ETH-USD"))
    assert waiting_reasons(view(tracker, configured=("BTC-USD",))) == [
        "BTC-USD: no market event on qw.md.events yet",
        "ETH-USD: no book snapshot yet",
    ]


def test_feed_not_subscribed() -> None:
    assert reasons_after(*CONNECTING) == ["BTC-USD: feed not subscribed (CONNECTING)"]
    backoff = status("BACKOFF", T0 + 1_000 * MS, "connect failed: refused")
    assert reasons_after(*SYNCED, backoff) == ["BTC-USD: feed not subscribed (BACKOFF: connect failed: refused)"]


def test_no_snapshot_yet() -> None:
    assert reasons_after(*SUBSCRIBED) == ["BTC-USD: no book snapshot yet (feed subscribed)"]
    # A tail that started after the STATUS: updates arrive, no snapshot among them.
    assert reasons_after(update(T0)) == ["BTC-USD: no book snapshot yet"]


def test_book_not_synced_after_a_gap() -> None:
    lost = gap("SEQUENCE_JUMP", T0 + 400 * MS, "sequence_num 161 -> 163")
    assert reasons_after(*SYNCED, update(T0 + 300 * MS), lost) == [
        "BTC-USD: book not synced since a gap (SEQUENCE_JUMP: sequence_num 161 -> 163) at 21:05:48.300 UTC; "
        "waiting for the next book snapshot"
    ]
    # The next snapshot syncs it again.
    assert reasons_after(*SYNCED, lost, snapshot(T0 + 900 * MS))[0].startswith("BTC-USD: no tick closed yet")


def test_no_tick_closed_yet() -> None:
    # Synced at 21:05:48.120: the tick at .200 closes with the first event after .200.
    assert reasons_after(*SYNCED, update(T0 + 180 * MS)) == [
        "BTC-USD: no tick closed yet: book synced at 21:05:48.120 UTC, event time is 21:05:48.180 UTC; "
        "the tick at 21:05:48.200 UTC closes with the first event after it"
    ]


def test_event_time_passed_the_tick_but_no_top3() -> None:
    assert reasons_after(*SYNCED, update(T0 + 250 * MS)) == [
        "BTC-USD: no top-3 on qw.book.top3 yet, although event time (21:05:48.250 UTC) has passed the first "
        "tick after the book snapshot (21:05:48.200 UTC): is the book running?"
    ]


def test_control_events_move_no_time() -> None:
    # A GAP or STATUS stamped with a host clock months ahead is not exchange time (one clock).
    months_later = T0 + 90 * 86_400 * 1_000 * MS
    after = reasons_after(*SYNCED, update(T0 + 180 * MS), status("SUBSCRIBED", months_later))
    assert after[0].startswith("BTC-USD: no tick closed yet"), after


@pytest.mark.parametrize(
    ("outputs", "reason"),
    [
        ({"top3": 3}, "top-3 records on qw.book.top3, but no feature vector yet (a one-sided book has none)"),
        ({"top3": 3, "features": 3}, "feature vectors on qw.features, but no prediction yet (is inference running?)"),
        ({"top3": 3, "features": 3, "predictions": 1200}, "1,200 predictions on qw.predictions, but no snapshot yet"),
    ],
)
def test_the_furthest_stage_reached_says_who_is_not_writing(outputs: dict[str, int], reason: str) -> None:
    assert reasons_after(*SYNCED, update(T0 + 250 * MS), **outputs) == [f"BTC-USD: {reason}"]


def test_the_empty_state_lists_the_reasons_once_the_snapshot_topic_is_read() -> None:
    tracker = UpstreamTracker()
    for record in CONNECTING:
        tracker.on_event(record)
    waiting = tuple(waiting_reasons(view(tracker)))
    values = render_kpis(None, FeedView("qw.snapshot", 0, 0, 0, True, waiting), 2_000_000_000)
    assert values[("empty-title", "children")] == "Waiting for the first snapshot on qw.snapshot…"
    items = values[("empty-reasons", "children")]
    assert all(isinstance(item, html.Li) for item in items)
    assert [item.children for item in items] == ["BTC-USD: feed not subscribed (CONNECTING)"]
    # Still reading the snapshot topic: no reasons (a snapshot may be on its way).
    reading = render_kpis(None, FeedView("qw.snapshot", 0, 0, 7, False, waiting), 2_000_000_000)
    assert reading[("empty-reasons", "children")] == []
    # Before the probe has read anything: the title alone.
    assert waiting_reasons(None) == []
    assert render_kpis(None, FeedView("qw.snapshot", 0, 0, 0, True), 2_000_000_000)[("empty-reasons", "children")] == []
