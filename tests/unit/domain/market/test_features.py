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
    ofi_contribution,
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
