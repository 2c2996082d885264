"""The per-symbol pipeline: event-time grid, sync epochs, gaps, feed state, time jumps, restarts."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from quotewatch.core.records import BookLevel, MarketEvent
from quotewatch.domain.market.book_pipeline import (
    BookPipeline,
    MarketEventError,
    SymbolPipeline,
    TickOutput,
)
from quotewatch.domain.market.features import FEATURE_INDEX, FEATURE_SPEC_ID
from tests.unit.services.book.market_events import (
    E8,
    MS,
    T0,
    clock,
    event,
    gap,
    snapshot,
    status,
    synthetic_feed,
    trade,
    update,
)

BOOK = ([(100 * E8, 1 * E8), (99 * E8, 2 * E8), (98 * E8, 3 * E8)], [(101 * E8, 4 * E8), (102 * E8, 5 * E8)])


def run(pipeline: SymbolPipeline | BookPipeline, events: list[MarketEvent]) -> list[TickOutput]:
    out: list[TickOutput] = []
    for position, record in enumerate(events):
        out.extend(pipeline.process(record, position))
    return out


def ticks(outputs: list[TickOutput]) -> list[int]:
    return [(o.book_top.ts_event - T0) // MS for o in outputs]


def test_a_tick_is_the_book_after_every_event_up_to_t_and_closes_on_the_first_later_event() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    out = run(
        pipeline,
        [
            snapshot(T0 + 10 * MS, *BOOK),
            update(T0 + 100 * MS, ("BID", 100 * E8, 9 * E8)),  # exactly on tick 100: belongs to it
            update(T0 + 150 * MS, ("BID", 100 * E8, 8 * E8), ts_init=555),
        ],
    )
    assert ticks(out) == [100]
    top = out[0].book_top
    assert top.bids[0] == BookLevel(price_e8=100 * E8, size_e8=9 * E8)
    assert top.ts_init == 555, "ts_init is the closing event's"
    assert top.epoch == T0 + 10 * MS
    assert top.tick_ms == 100
    assert len(top.bids) == 3
    assert len(top.asks) == 2
    features = out[0].features
    assert features is not None
    assert features.feature_spec_id == FEATURE_SPEC_ID
    assert features.bids == top.bids
    assert features.asks == top.asks
    assert features.values[FEATURE_INDEX["mid"]] == 100.5
    assert features.values[FEATURE_INDEX["updates_100ms"]] == 1.0
    assert pipeline.next_tick_ns == T0 + 200 * MS


def test_quiet_ticks_carry_the_state_and_a_long_jump_is_bounded() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    out = run(pipeline, [snapshot(T0 + 10 * MS, *BOOK), clock(T0 + 450 * MS)])
    assert ticks(out) == [100, 200, 300, 400]
    assert all(o.book_top == replace(out[0].book_top, ts_event=o.book_top.ts_event) for o in out)
    out = run(pipeline, [clock(T0 + 3_600_000 * MS)])  # an hour later
    assert len(out) == pipeline.max_carried_ticks == 50
    assert ticks(out)[0] == 500
    assert ticks(out)[-1] == 5400
    assert pipeline.next_tick_ns == T0 + 3_600_000 * MS
    out = run(pipeline, [clock(T0 + 3_600_001 * MS)])
    assert ticks(out) == [3_600_000], "after the jump the grid continues at the new time"


def test_feature_windows_after_a_bounded_jump_equal_an_unbounded_run() -> None:
    events = [
        snapshot(T0 + 10 * MS, *BOOK),
        update(T0 + 20 * MS, ("BID", 100 * E8, 7 * E8)),
        trade(T0 + 30 * MS),
        clock(T0 + 60_000 * MS),
        update(T0 + 60_010 * MS, ("ASK", 101 * E8, 0)),
        clock(T0 + 60_500 * MS),
    ]
    bounded = run(SymbolPipeline("BTC-USD", 100), events)
    unbounded = run(SymbolPipeline("BTC-USD", 100, max_carried_ms=10**9), events)
    by_tick = {o.book_top.ts_event: o for o in unbounded}
    assert len(bounded) < len(unbounded)
    for output in bounded:
        assert output == by_tick[output.book_top.ts_event]


def test_out_of_order_events_count_in_the_open_tick_and_time_never_goes_back() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    out = run(
        pipeline,
        [
            snapshot(T0 + 10 * MS, *BOOK),
            clock(T0 + 250 * MS),
            update(T0 + 120 * MS, ("BID", 100 * E8, 9 * E8)),  # late: applied at 250
            clock(T0 + 310 * MS),
        ],
    )
    assert ticks(out) == [100, 200, 300]
    assert out[1].book_top.bids[0].size_e8 == 1 * E8
    assert out[2].book_top.bids[0].size_e8 == 9 * E8
    assert pipeline.watermark_ns == T0 + 310 * MS


def test_gap_and_status_stamped_by_another_clock_move_no_time() -> None:
    """One clock: control events stamped months ahead (local time, a recorded session) close no tick."""
    months = 120 * 24 * 3600 * 1000 * MS
    pipeline = SymbolPipeline("BTC-USD", 100)
    out = run(
        pipeline,
        [
            status(T0 + months, "CONNECTING"),  # stamped with the ingest's local clock
            gap(T0 + months),  # the RECONNECT GAP of the same CONNECTED record
            snapshot(T0 + 10 * MS, *BOOK),
            update(T0 + 120 * MS, ("BID", 100 * E8, 9 * E8)),
            clock(T0 + 230 * MS),
            gap(T0 + months + 1),  # the connection ends: unsynced; the open tick 300 stays open
            status(T0 + months + 1, "RECONNECTING"),
            clock(T0 + 310 * MS),
        ],
    )
    assert ticks(out) == [100, 200], "tick 300 closes after the GAP, so it is not emitted as synced"
    assert pipeline.watermark_ns == T0 + 310 * MS
    assert pipeline.next_tick_ns == T0 + 400 * MS
    assert pipeline.feed_state == "RECONNECTING", "STATUS still sets the feed state"


def test_gap_unsyncs_until_the_next_snapshot_which_starts_a_new_epoch() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    out = run(
        pipeline,
        [
            snapshot(T0 + 10 * MS, *BOOK),
            clock(T0 + 120 * MS),  # closes tick 100 (a GAP closes none: it moves no time)
            gap(T0 + 150 * MS),
            update(T0 + 160 * MS, ("BID", 100 * E8, 9 * E8)),  # ignored: unsynced
            clock(T0 + 420 * MS),
            snapshot(T0 + 430 * MS, [(90 * E8, E8)], [(91 * E8, E8)]),
            clock(T0 + 610 * MS),
        ],
    )
    assert ticks(out) == [100, 500, 600]
    assert [o.book_top.epoch for o in out] == [T0 + 10 * MS, T0 + 430 * MS, T0 + 430 * MS]
    assert out[1].book_top.bids == (BookLevel(price_e8=90 * E8, size_e8=E8),)
    assert out[1].features is not None
    assert out[1].features.values[FEATURE_INDEX["updates_1000ms"]] == 0.0, "feature state resets per epoch"


def test_nothing_is_emitted_before_the_first_snapshot() -> None:
    out = run(SymbolPipeline("BTC-USD", 100), [status(T0), update(T0 + MS, ("BID", E8, E8)), clock(T0 + 900 * MS)])
    assert out == []


def test_status_sets_the_feed_state_carried_in_the_features() -> None:
    out = run(
        SymbolPipeline("BTC-USD", 100),
        [
            status(T0 + MS, "SUBSCRIBED"),
            snapshot(T0 + 10 * MS, *BOOK),
            clock(T0 + 120 * MS),  # closes tick 100 (a STATUS closes none: it moves no time)
            status(T0 + 150 * MS, "RECONNECTING"),
            clock(T0 + 210 * MS),
        ],
    )
    assert [o.features.feed_state for o in out if o.features] == ["SUBSCRIBED", "RECONNECTING"]


def test_a_crossed_book_is_unsynced() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    out = run(
        pipeline, [snapshot(T0 + 10 * MS, *BOOK), update(T0 + 20 * MS, ("BID", 101 * E8, E8)), clock(T0 + 500 * MS)]
    )
    assert out == []
    assert not pipeline.synced
    assert "crossed" in pipeline.unsynced_reason


def test_a_one_sided_book_gives_a_top_but_no_features() -> None:
    out = run(SymbolPipeline("BTC-USD", 100), [snapshot(T0 + 10 * MS, BOOK[0], []), clock(T0 + 110 * MS)])
    assert len(out) == 1
    assert out[0].book_top.asks == ()
    assert out[0].features is None


def test_bad_events_raise_with_the_ticks_they_closed() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    run(pipeline, [snapshot(T0 + 10 * MS, *BOOK)])
    with pytest.raises(MarketEventError, match="without its 'update' body"):
        pipeline.process(event("UPDATE", T0 + 20 * MS))
    with pytest.raises(MarketEventError, match="ETH-USD"):
        pipeline.process(clock(T0 + 20 * MS, symbol="ETH-USD"))
    with pytest.raises(MarketEventError, match="negative size") as info:
        pipeline.process(update(T0 + 330 * MS, ("BID", 100 * E8, -1)))
    assert ticks(info.value.outputs) == [100, 200, 300]
    assert not pipeline.synced


def test_multi_symbol_interleaving_keeps_symbols_apart() -> None:
    pipeline = BookPipeline(100)
    out = run(
        pipeline,
        [
            snapshot(T0 + 10 * MS, *BOOK, symbol="BTC-USD"),
            snapshot(T0 + 20 * MS, [(5 * E8, E8)], [(6 * E8, E8)], symbol="ETH-USD"),
            clock(T0 + 150 * MS, symbol="BTC-USD"),
            update(T0 + 160 * MS, ("BID", 5 * E8, 3 * E8), symbol="ETH-USD"),
            clock(T0 + 210 * MS, symbol="ETH-USD"),
        ],
    )
    assert [(o.book_top.symbol, ticks([o])[0]) for o in out] == [
        ("BTC-USD", 100),
        ("ETH-USD", 100),
        ("ETH-USD", 200),
    ]
    assert out[2].book_top.bids[0].size_e8 == 3 * E8


def test_tick_ms_must_divide_the_feature_windows() -> None:
    with pytest.raises(ValueError, match="TICK_MS=300"):
        BookPipeline(300)


def test_two_runs_give_identical_outputs() -> None:
    events = synthetic_feed(7, count=1500)
    assert run(BookPipeline(100), events) == run(BookPipeline(100), events)


def _replay_equivalence(events: list[MarketEvent], cut: int) -> None:
    """Process events[:cut]; a fresh pipeline replaying from restart_position (outputs discarded)
    must then produce exactly the outputs of the uninterrupted one for the rest."""
    original = BookPipeline(100)
    for position in range(cut):
        with contextlib.suppress(MarketEventError):  # dead-lettered live; the same on replay
            original.process(events[position], position)
    restart = original.restart_position()
    restarted = BookPipeline(100)
    for position in range(cut if restart is None else restart, cut):
        with contextlib.suppress(MarketEventError):
            restarted.process(events[position], position)
    for position in range(cut, len(events)):
        assert restarted.process(events[position], position) == original.process(events[position], position)


@settings(max_examples=40)
@given(seed=st.integers(min_value=0, max_value=10_000), fraction=st.floats(min_value=0.0, max_value=1.0))
def test_replaying_from_the_restart_position_reproduces_an_uninterrupted_run(seed: int, fraction: float) -> None:
    events = synthetic_feed(seed, count=400)
    _replay_equivalence(events, int(fraction * len(events)))


def test_an_out_of_order_snapshot_keeps_the_restart_before_the_watermark() -> None:
    events = [
        snapshot(T0 + 10 * MS, *BOOK),
        clock(T0 + 480 * MS),
        gap(T0 + 485 * MS),
        snapshot(T0 + 300 * MS, [(90 * E8, E8)], [(91 * E8, E8)]),  # older than the watermark
        update(T0 + 490 * MS, ("BID", 90 * E8, 2 * E8)),
        clock(T0 + 720 * MS),
        status(T0 + 730 * MS),
        clock(T0 + 850 * MS),
    ]
    pipeline = BookPipeline(100)
    run(pipeline, events[:5])
    assert pipeline.restart_position() == 1, "the clock set the watermark the late snapshot was applied at"
    for position in (5, 6):
        pipeline.process(events[position], position)
    assert pipeline.restart_position() == 1
    for cut in range(len(events)):
        _replay_equivalence(events, cut)
