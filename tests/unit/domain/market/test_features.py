"""The feature spec (and its documentation) and the feature values on hand-made books."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotewatch.domain.market.book_pipeline import SymbolPipeline, TickOutput
from quotewatch.domain.market.features import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    FEATURE_SPEC_ID,
    FEATURES,
    FeatureState,
    book_features,
    multilevel_ofi_contribution,
    ofi_contribution,
    price_tick,
    queue_depletion,
    spread_in_ticks,
    trade_flow_imbalance,
)
from tests.unit.services.book.market_events import E8, MS, T0, clock, snapshot, synthetic_feed, trade, update

DOCS = Path(__file__).resolve().parents[4] / "docs" / "features.md"


def test_the_spec_has_unique_names_and_a_versioned_id() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURES) >= 25
    assert re.fullmatch(r"qw-features-v\d+-[0-9a-f]{8}", FEATURE_SPEC_ID)
    assert FEATURE_INDEX["mid"] == 0


def test_the_documented_table_is_the_spec() -> None:
    text = DOCS.read_text()
    rows = re.findall(r"^\| (\d+) \| `([a-z0-9_]+)` \| ([^|]+) \|", text, flags=re.MULTILINE)
    assert [(int(i), name, unit.strip()) for i, name, unit in rows] == [
        (i, f.name, f.unit) for i, f in enumerate(FEATURES)
    ]
    assert f"`{FEATURE_SPEC_ID}`" in text


def test_book_features_of_a_hand_made_top() -> None:
    bids = ((100 * E8, 3 * E8), (99 * E8, 1 * E8), (98 * E8, 1 * E8))
    asks = ((102 * E8, 1 * E8), (103 * E8, 2 * E8))
    values = book_features(bids, asks)
    assert values is not None
    named = dict(zip(FEATURE_NAMES, values, strict=False))
    assert named["mid"] == 101.0
    assert named["spread"] == 2.0
    assert named["spread_bps"] == pytest.approx(2 / 101 * 1e4)
    assert named["microprice"] == pytest.approx((100 * 1 + 102 * 3) / 4)
    assert named["microprice_offset_bps"] == pytest.approx((101.5 - 101) / 101 * 1e4)
    assert named["imbalance_l1"] == pytest.approx(0.5)
    assert named["imbalance_l3"] == pytest.approx((5 - 3) / 8)
    assert (named["depth_bid_l3"], named["depth_ask_l3"]) == (5.0, 3.0)
    assert book_features(bids, ()) is None


def test_order_flow_imbalance_follows_cont_kukanov_stoikov() -> None:
    assert ofi_contribution((100, 5), (101, 5), (100, 7), (101, 5)) == 2, "bid size up"
    assert ofi_contribution((100, 5), (101, 5), (99, 7), (101, 5)) == -5, "bid price down: its size leaves"
    assert ofi_contribution((100, 5), (101, 5), (100, 5), (100, 3)) == -3, "new better ask"
    assert ofi_contribution((100, 5), (101, 5), (100, 5), (102, 4)) == 5, "ask price up: its size leaves"


def test_multilevel_order_flow_imbalance_sums_the_best_three_levels() -> None:
    bids = ((100, 5), (99, 4), (98, 3))
    asks = ((101, 5), (102, 4))
    # level 2 bid size 4 -> 6: +2; a third ask level appears with size 7: -7 (new ask liquidity).
    assert multilevel_ofi_contribution((bids, asks), (((100, 5), (99, 6), (98, 3)), (*asks, (103, 7)))) == -5
    # the third bid level disappears: its size 3 leaves; the best ask level is taken: +5, and the
    # second becomes the best (level 2 now the missing one: its size 4 leaves the level, +4).
    assert multilevel_ofi_contribution((bids, asks), (bids[:2], asks[1:])) == -3 + 5 + 4
    assert multilevel_ofi_contribution((bids, asks), (bids, asks)) == 0
    assert multilevel_ofi_contribution((bids, asks), (bids, asks), levels=1) == ofi_contribution(
        bids[0], asks[0], bids[0], asks[0]
    )


def test_queue_depletion_counts_what_leaves_the_best_queue() -> None:
    assert queue_depletion((100, 5), (100, 3), "BID") == 2, "size decrease at the same price"
    assert queue_depletion((100, 5), (100, 7), "BID") == 0, "the queue grew"
    assert queue_depletion((100, 5), (99, 2), "BID") == 5, "the best bid was consumed: its whole queue"
    assert queue_depletion((100, 5), (101, 2), "BID") == 0, "a better bid arrived"
    assert queue_depletion((101, 5), (102, 1), "ASK") == 5, "the best ask was consumed"
    assert queue_depletion((101, 5), (100, 1), "ASK") == 0, "a better ask arrived"
    assert queue_depletion((101, 5), None, "ASK") == 5, "the side emptied"
    assert queue_depletion(None, (101, 5), "ASK") == 0


def test_trade_flow_imbalance_price_tick_and_spread_in_ticks() -> None:
    assert trade_flow_imbalance(3, 1) == 0.5
    assert trade_flow_imbalance(0, 2) == -1.0
    assert trade_flow_imbalance(0, 0) == 0.0
    assert price_tick([100 * E8 + E8 // 2, 101 * E8, 99 * E8 + 3 * E8 // 4]) == E8 // 4
    assert price_tick([], E8) == E8
    assert price_tick([]) == 0
    assert spread_in_ticks(100 * E8, 100 * E8 + E8 // 2, E8 // 4) == 2.0
    assert spread_in_ticks(100 * E8, 101 * E8, 0) == 0.0, "unknown tick"


def values_by_tick(outputs: list[TickOutput]) -> dict[int, dict[str, float]]:
    return {
        (o.book_top.ts_event - T0) // MS: dict(zip(FEATURE_NAMES, o.features.values, strict=True))
        for o in outputs
        if o.features is not None
    }


def test_windows_count_updates_trades_and_quote_changes_in_event_time() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    events = [
        snapshot(T0 + 10 * MS, [(100 * E8, E8)], [(101 * E8, E8)]),
        update(T0 + 50 * MS, ("BID", 99 * E8, E8), ("BID", 98 * E8, E8)),  # deep: 2 changes, top unchanged
        update(T0 + 120 * MS, ("BID", 100 * E8, 3 * E8)),  # size up at the best bid: OFI +2
        trade(T0 + 130 * MS, "SELL", size=E8 // 2),
        update(T0 + 220 * MS, ("ASK", 100 * E8 + E8 // 2, E8)),  # new best ask: a quote change
        clock(T0 + 1_450 * MS),
    ]
    out = []
    for position, record in enumerate(events):
        out.extend(pipeline.process(record, position))
    v = values_by_tick(out)
    assert (v[100]["updates_100ms"], v[200]["updates_100ms"], v[300]["updates_100ms"]) == (2, 1, 1)
    assert (v[300]["updates_500ms"], v[1000]["updates_1000ms"], v[1100]["updates_1000ms"]) == (4, 4, 2)
    assert (v[200]["trades_100ms"], v[300]["trades_100ms"], v[500]["trades_500ms"]) == (1, 0, 1)
    assert (v[200]["ofi_100ms"], v[300]["ofi_100ms"]) == (2.0, -1.0)
    assert v[1000]["ofi_1000ms"] == 1.0
    assert v[100]["ms_since_best_change"] == 90.0, "the snapshot at 10 ms counts as a change"
    assert v[300]["ms_since_best_change"] == 80.0
    assert (v[300]["best_changes_1s"], v[1300]["best_changes_1s"], v[1300]["best_changes_5s"]) == (1, 0, 1)
    assert (v[200]["last_trade_side"], v[200]["last_trade_size"]) == (-1.0, 0.5)
    mid_before, mid_after = 100.5, (100 + 100.5) / 2
    assert v[300]["mid"] == mid_after
    assert v[200]["mid_rv_1s_bps"] == 0.0
    assert v[300]["mid_rv_1s_bps"] == pytest.approx(abs(mid_after - mid_before) / mid_after * 1e4)
    assert v[1300]["mid_rv_1s_bps"] == 0.0, "the mid change left the 1 s window"
    assert v[1300]["mid_rv_5s_bps"] == v[300]["mid_rv_5s_bps"]


def test_the_issue_18_features_by_hand_in_event_time() -> None:
    pipeline = SymbolPipeline("BTC-USD", 100)
    events = [
        snapshot(T0 + 10 * MS, [(100 * E8, 2 * E8), (99 * E8, E8)], [(101 * E8, 2 * E8), (102 * E8, E8)]),
        update(T0 + 50 * MS, ("BID", 100 * E8, E8 // 2)),  # best bid queue 2 -> 0.5: depletion 1.5, OFI -1.5
        trade(T0 + 60 * MS, "BUY", size=E8),
        trade(T0 + 70 * MS, "SELL", size=E8 // 2),
        update(T0 + 150 * MS, ("ASK", 101 * E8, 0)),  # best ask taken: depletion 2; OFI l1 +2, l2 +1
        update(T0 + 250 * MS, ("BID", 100 * E8 + E8 // 2, E8)),  # better bid: OFI l1 +1, l2 +0.5, l3 +1
        clock(T0 + 1_300 * MS),
    ]
    out = []
    for position, record in enumerate(events):
        out.extend(pipeline.process(record, position))
    v = values_by_tick(out)
    assert (v[100]["ofi_l3_100ms"], v[200]["ofi_l3_100ms"], v[300]["ofi_l3_100ms"]) == (-1.5, 3.0, 2.5)
    assert (v[200]["ofi_l3_500ms"], v[300]["ofi_l3_1000ms"]) == (1.5, 4.0)
    assert (v[100]["bid_depletion_1s"], v[100]["ask_depletion_1s"], v[200]["ask_depletion_1s"]) == (1.5, 0.0, 2.0)
    assert (v[1000]["bid_depletion_1s"], v[1100]["bid_depletion_1s"]) == (1.5, 0.0), "left the 1 s window"
    assert v[100]["trade_imbalance_1s"] == pytest.approx(1 / 3)
    assert v[1100]["trade_imbalance_1s"] == 0.0, "the trades left the 1 s window"
    assert v[1100]["trade_imbalance_5s"] == pytest.approx(1 / 3)
    assert (v[100]["trade_rate_5s"], v[100]["trade_volume_5s"]) == (0.4, 0.3)
    assert (v[100]["ms_since_bid_change"], v[100]["ms_since_ask_change"]) == (90.0, 90.0), "snapshot at 10 ms"
    assert (v[200]["ms_since_bid_change"], v[200]["ms_since_ask_change"]) == (190.0, 50.0)
    assert (v[300]["ms_since_bid_change"], v[300]["ms_since_ask_change"]) == (50.0, 150.0)
    # price tick 1 from the snapshot, then 0.5 once 100.5 is the best bid; spreads 1, 2, 1.5 quote.
    assert (v[100]["spread_ticks"], v[200]["spread_ticks"], v[300]["spread_ticks"]) == (1.0, 2.0, 3.0)


def test_values_are_always_finite_on_a_synthetic_feed() -> None:
    from quotewatch.domain.market.book_pipeline import BookPipeline

    pipeline = BookPipeline(100)
    count = 0
    for position, record in enumerate(synthetic_feed(11, count=2000)):
        for output in pipeline.process(record, position):
            assert output.features is not None
            assert len(output.features.values) == len(FEATURES)
            assert all(math.isfinite(value) for value in output.features.values)
            count += 1
    assert count > 1000


def test_tick_ms_must_divide_the_windows() -> None:
    FeatureState(50)
    with pytest.raises(ValueError, match="does not divide the 100 ms feature window"):
        FeatureState(40)


@given(
    bids=st.lists(st.tuples(st.integers(1, 10**13), st.integers(0, 10**12)), min_size=1, max_size=3),
    asks=st.lists(st.tuples(st.integers(1, 10**13), st.integers(0, 10**12)), min_size=1, max_size=3),
)
def test_the_inline_tick_values_equal_the_readable_definition(
    bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> None:
    values = FeatureState(100).close_tick(T0, tuple(bids), tuple(asks))
    assert values is not None
    assert tuple(values[:9]) == book_features(bids, asks)
