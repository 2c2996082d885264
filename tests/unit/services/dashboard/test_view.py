"""The dashboard's pure view functions: formatting and callback logic for the edge cases of a Snapshot."""

from __future__ import annotations

import math
from typing import Any

import pytest
from dash import no_update
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from quotewatch.core.records import LiveMetrics, Snapshot
from quotewatch.core.serde import AvroSerde
from quotewatch.services.dashboard.view import (
    HIDDEN,
    KPI_OUTPUTS,
    NA,
    NEUTRAL_COLOUR,
    SHOWN,
    FeedView,
    History,
    Latest,
    downsample_indices,
    feed_state_class,
    format_age,
    format_event_time,
    format_number,
    format_price,
    format_rate,
    format_size,
    format_spread,
    ladder_rows,
    live_metrics_of,
    model_text,
    p_change_colour,
    props_by_component,
    props_to_send,
    quote_of,
    render_kpis,
    selector_update,
    sparkline_figure,
    sparkline_update,
)
from tests.records import typed
from tests.unit.services.dashboard.factories import level, make_snapshot

FEED = FeedView(topic="qw.snapshot", records=12, rejected=0, lag=0, caught_up=True)
STALE_NS = 2_000_000_000


def kpis(snapshot: Snapshot, age_ns: int = 100_000_000) -> dict[str, Any]:
    values = render_kpis(Latest(snapshot.symbol, snapshot, age_ns, 1), FEED, STALE_NS)
    return {component: values[(component, prop)] for component, prop in KPI_OUTPUTS if prop == "children"}


# -- scalars ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price_e8", "text"),
    [
        (6_723_451_000_000, "67,234.51"),
        (6_723_500_000_000, "67,235.00"),
        (6_723_450_000_000, "67,234.50"),
        (12_345_678, "0.12345678"),  # sub-cent digits are kept exactly, never rounded
        (1, "0.00000001"),
        (0, "0.00"),
        (-1_000_000, "-0.01"),
        (123_456_789_012_345_600, "1,234,567,890.123456"),
        (None, NA),
    ],
)
def test_format_price_is_exact_grouped_and_has_two_decimals(price_e8: int | None, text: str) -> None:
    assert format_price(price_e8) == text


def test_format_size_drops_trailing_zeros() -> None:
    assert format_size(150_000_000) == "1.5"
    assert format_size(200_000_000) == "2"
    assert format_size(1_000_000_000_000) == "10,000"
    assert format_size(None) == NA


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf, True, "0.5"])
def test_unknown_metrics_read_as_not_available(value: object) -> None:
    assert format_number(value) == NA
    assert format_rate(value) == NA


def test_format_number_rate_age_and_event_time() -> None:
    assert format_number(0.65125) == "0.651"
    assert format_number(0) == "0.000"
    assert format_number(1, digits=1) == "1.0"
    assert format_rate(9.87) == "9.9/s"
    assert [format_age(ns) for ns in (0, 400_000_000, 12_000_000_000, 180 * 10**9, 9000 * 10**9, None)] == [
        "0.0 s",
        "0.4 s",
        "12 s",
        "3 min",
        "2.5 h",
        NA,
    ]
    assert format_event_time(1_760_000_000_123_456_789) == "08:53:20.123 UTC"
    assert format_event_time(None) == NA


def test_p_change_colour_scale_and_neutral_for_unknown() -> None:
    assert p_change_colour(0.0) == ("#1a9850", "#ffffff")
    assert p_change_colour(0.5) == ("#fee08b", "#111111")
    assert p_change_colour(1.0) == ("#d73027", "#ffffff")
    assert p_change_colour(7.0) == p_change_colour(1.0)  # clamped
    assert p_change_colour(-1.0) == p_change_colour(0.0)
    assert p_change_colour(math.nan)[0] == NEUTRAL_COLOUR
    assert p_change_colour(None)[0] == NEUTRAL_COLOUR
    # A higher probability is never cooler: red minus green grows along the scale.
    colours = [p_change_colour(p / 20)[0] for p in range(21)]
    warmth = [int(c[1:3], 16) - int(c[3:5], 16) for c in colours]
    assert warmth == sorted(warmth)


def test_feed_state_classes() -> None:
    assert feed_state_class("SUBSCRIBED") == "ok"
    assert feed_state_class("reconnecting") == "warn"
    assert feed_state_class("STOPPED") == "bad"
    assert feed_state_class("UNKNOWN") == "unknown"
    assert feed_state_class(None) == "unknown"


# -- the book -----------------------------------------------------------------------------------


def test_quote_and_ladder_whatever_the_level_order() -> None:
    snapshot = make_snapshot(
        bids=[level("99", "1"), level("101", "2"), level("100", "3")],
        asks=[level("104", "1"), level("102", "2"), level("103", "3")],
    )
    quote = quote_of(snapshot)
    assert (quote.best_bid_e8, quote.best_ask_e8, quote.spread_e8) == (10_100_000_000, 10_200_000_000, 100_000_000)
    assert quote.mid == 101.5
    assert ladder_rows(snapshot) == [
        ("2", "101.00", "102.00", "2"),
        ("3", "100.00", "103.00", "3"),
        ("1", "99.00", "104.00", "1"),
    ]
    assert format_spread(quote) == ("1.00", "98.52 bps")


def test_empty_book() -> None:
    snapshot = make_snapshot(bids=[], asks=[])
    quote = quote_of(snapshot)
    assert (quote.best_bid_e8, quote.best_ask_e8, quote.spread_e8, quote.mid) == (None, None, None, None)
    assert format_spread(quote) == (NA, NA)
    assert ladder_rows(snapshot) == [(NA, NA, NA, NA)] * 3
    shown = kpis(snapshot)
    assert (shown["kpi-best-bid"], shown["kpi-best-ask"], shown["kpi-spread"], shown["kpi-spread-bps"]) == (
        NA,
        NA,
        NA,
        NA,
    )


def test_one_sided_book() -> None:
    snapshot = make_snapshot(bids=[level("67234.51", "0.5")], asks=[])
    shown = kpis(snapshot)
    assert (shown["kpi-best-bid"], shown["kpi-best-ask"], shown["kpi-spread"]) == ("67,234.51", NA, NA)
    assert ladder_rows(snapshot) == [("0.5", "67,234.51", NA, NA), (NA, NA, NA, NA), (NA, NA, NA, NA)]


def test_crossed_book_is_flagged_not_hidden() -> None:
    quote = quote_of(make_snapshot(bids=[level("100.02", "1")], asks=[level("100.01", "1")]))
    spread, bps = format_spread(quote)
    assert spread == "-0.01"
    assert bps == "-1.00 bps (crossed)"


# -- the model ----------------------------------------------------------------------------------


def test_no_model_yet() -> None:
    snapshot = make_snapshot(model=None, p_change=None)
    assert model_text(snapshot) == ("no model yet", NA)
    assert live_metrics_of(snapshot) is None
    shown = kpis(snapshot)
    assert shown["kpi-model"] == "no model yet"
    assert shown["kpi-p-change"] == NA
    assert shown["kpi-n-labels"] == "no labels yet"
    assert (shown["kpi-auc"], shown["kpi-brier"], shown["kpi-balanced-accuracy"]) == (NA, NA, NA)
    values = render_kpis(Latest("BTC-USD", snapshot, 0, 1), FEED, STALE_NS)
    assert values[("card-p-change", "style")]["backgroundColor"] == NEUTRAL_COLOUR
    assert values[("kpi-model-role", "className")] == "role"


def test_fallback_role() -> None:
    snapshot = make_snapshot(model=("base-rate", "0", "FALLBACK"))
    assert model_text(snapshot) == ("fallback (base-rate)", "FALLBACK")
    assert model_text(replace(make_snapshot(model=None), model_role="FALLBACK")) == ("fallback", "FALLBACK")
    values = render_kpis(Latest("BTC-USD", snapshot, 0, 1), FEED, STALE_NS)
    assert values[("kpi-model-role", "className")] == "role fallback"


def test_champion_and_the_metrics_of_the_serving_version() -> None:
    champion = {
        "model_name": "xgb",
        "model_version": "3",
        "model_role": "CHAMPION",
        "n_labels": 5000,
        "auc": 0.7,
        "brier": 0.2,
        "balanced_accuracy": 0.66,
        "base_rate": 0.3,
    }
    challenger = champion | {"model_version": "4", "model_role": "CHALLENGER", "auc": 0.9}
    snapshot = make_snapshot(model=("xgb", "3", "CHAMPION"), live_metrics=[challenger, champion])
    assert model_text(snapshot) == ("xgb v3", "CHAMPION")
    assert live_metrics_of(snapshot) == typed(LiveMetrics, champion)
    # A version just hot-reloaded has no entry of its own yet: the role's entry is shown.
    reloaded = make_snapshot(model=("xgb", "5", "CHAMPION"), live_metrics=[challenger, champion])
    assert live_metrics_of(reloaded) == typed(LiveMetrics, champion)
    shown = kpis(snapshot)
    assert (shown["kpi-auc"], shown["kpi-n-labels"]) == ("0.700", "5,000 labels")


def test_the_champion_live_lift_with_its_interval_and_the_below_zero_flag() -> None:
    champion = {
        "model_name": "xgb",
        "model_version": "3",
        "model_role": "CHAMPION",
        "n_labels": 5000,
        "auc": 0.7,
        "lift": 0.042,
        "lift_low": -0.01,
        "lift_high": 0.09,
        "lift_rows": 1000,
    }
    snapshot = make_snapshot(model=("xgb", "3", "CHAMPION"), live_metrics=[champion])
    values = render_kpis(Latest("BTC-USD", snapshot, 0, 1), FEED, STALE_NS)
    assert values[("kpi-lift", "children")] == "+0.042 [-0.010, +0.090]"
    assert values[("kpi-lift-note", "children")] == "over the rolling change frequency, 1,000 labels"
    assert values[("card-lift", "className")] == "card"
    flagged = champion | {"lift": -0.03, "lift_low": -0.08, "lift_high": 0.01, "lift_flagged": True}
    snapshot = make_snapshot(model=("xgb", "3", "CHAMPION"), live_metrics=[flagged])
    values = render_kpis(Latest("BTC-USD", snapshot, 0, 1), FEED, STALE_NS)
    assert values[("kpi-lift", "children")] == "-0.030 [-0.080, +0.010]"
    assert "below zero" in values[("kpi-lift-note", "children")]
    assert values[("card-lift", "className")] == "card flagged"
    no_interval = champion | {"lift_low": None, "lift_high": None}
    shown = kpis(make_snapshot(model=("xgb", "3", "CHAMPION"), live_metrics=[no_interval]))
    assert shown["kpi-lift"] == "+0.042 (no interval: too few labels)"
    not_yet = {key: value for key, value in champion.items() if not key.startswith("lift")}
    assert kpis(make_snapshot(model=("xgb", "3", "CHAMPION"), live_metrics=[not_yet]))["kpi-lift"] == NA


def test_nan_and_null_metrics() -> None:
    metrics = {
        "model_name": "lr",
        "model_version": "1",
        "model_role": "CHAMPION",
        "n_labels": 3,
        "auc": math.nan,  # one class only so far
        "brier": None,
        "balanced_accuracy": math.inf,
        "base_rate": 0.0,
    }
    snapshot = make_snapshot(
        model=("lr", "1", "CHAMPION"), live_metrics=[metrics], p_change=math.nan, updates_per_second=math.nan
    )
    shown = kpis(snapshot)
    assert (shown["kpi-auc"], shown["kpi-brier"], shown["kpi-balanced-accuracy"]) == (NA, NA, NA)
    assert (shown["kpi-p-change"], shown["kpi-updates"], shown["kpi-n-labels"]) == (NA, NA, "3 labels")


# -- page states --------------------------------------------------------------------------------


def test_empty_state_before_the_first_snapshot() -> None:
    values = render_kpis(None, FEED, STALE_NS)
    assert set(values) == set(KPI_OUTPUTS)
    assert values[("status-badge", "children")] == "WAITING"
    assert values[("empty-state", "style")] == SHOWN
    assert values[("main-panel", "style")] == HIDDEN
    assert values[("stale-indicator", "style")] == HIDDEN
    assert values[("empty-title", "children")] == "Waiting for the first snapshot on qw.snapshot…"
    assert values[("empty-reasons", "children")] == []  # no upstream view yet (tests/unit/.../test_waiting_reasons.py)
    reading = render_kpis(None, FeedView("qw.snapshot", 0, 0, 120, caught_up=False), STALE_NS)
    assert reading[("empty-title", "children")] == "Reading qw.snapshot from the beginning…"
    assert "reading from the beginning" in reading[("footer-status", "children")]


def test_live_until_the_stale_threshold_then_stale() -> None:
    snapshot = make_snapshot()
    at_threshold = render_kpis(Latest("BTC-USD", snapshot, STALE_NS, 1), FEED, STALE_NS)
    assert at_threshold[("status-badge", "children")] == "LIVE"
    assert at_threshold[("stale-indicator", "style")] == HIDDEN
    assert at_threshold[("empty-state", "style")] == HIDDEN
    stale = render_kpis(Latest("BTC-USD", snapshot, STALE_NS + 1, 1), FEED, STALE_NS)
    assert stale[("status-badge", "children")] == "STALE"
    assert stale[("stale-indicator", "style")] == SHOWN
    assert stale[("stale-indicator", "children")] == "STALE — no snapshot for BTC-USD in 2.0 s"
    assert stale[("main-panel", "className")] == "main stale"
    assert stale[("kpi-best-bid", "children")] == "67,234.51"  # last values stay, dimmed


def test_footer_counts_rejected_records() -> None:
    values = render_kpis(None, FeedView("qw.snapshot", 1200, 2, 5, True), STALE_NS)
    assert values[("footer-status", "children")] == "qw.snapshot · 1,200 snapshots read · 2 rejected · dashboard lag 5"


# -- the selector -------------------------------------------------------------------------------


def test_selector_hidden_for_one_symbol_shown_for_several() -> None:
    options, value, style = selector_update(["BTC-USD"], None, [])
    assert (options, value, style) == ([{"label": "BTC-USD", "value": "BTC-USD"}], "BTC-USD", HIDDEN)
    options, value, style = selector_update(["ETH-USD", "BTC-USD"], "BTC-USD", options)
    assert [o["value"] for o in options] == ["BTC-USD", "ETH-USD"]
    assert (value, style) == (no_update, SHOWN)


def test_selector_keeps_the_choice_and_sends_nothing_when_unchanged() -> None:
    options = [{"label": s, "value": s} for s in ("BTC-USD", "ETH-USD")]
    assert selector_update(["ETH-USD", "BTC-USD"], "ETH-USD", options) == (no_update, no_update, no_update)


def test_selector_default_is_the_first_configured_symbol_that_is_known() -> None:
    _, value, _ = selector_update(["BTC-USD", "ETH-USD"], None, [], preferred=("SOL-USD", "ETH-USD"))
    assert value == "ETH-USD"
    _, value, _ = selector_update(["BTC-USD", "ETH-USD"], "GONE-USD", [], preferred=())
    assert value == "BTC-USD"
    assert selector_update([], None, []) == (no_update, no_update, no_update)


# -- push mode --------------------------------------------------------------------------------


def test_push_sends_only_the_props_that_changed_grouped_by_component() -> None:
    first = render_kpis(Latest("BTC-USD", make_snapshot(p_change=0.25), 0, 1), FEED, STALE_NS)
    everything, sent = props_to_send(first, {})
    assert everything == props_by_component(first)
    assert everything["kpi-feed-state"] == {"children": "SUBSCRIBED", "className": "badge ok"}
    assert props_to_send(first, sent)[0] == {}  # nothing changed, nothing sent

    second = render_kpis(Latest("BTC-USD", make_snapshot(p_change=0.9), 500_000_000, 2), FEED, STALE_NS)
    changed, _ = props_to_send(second, sent)
    assert set(changed) == {"kpi-p-change", "card-p-change", "snapshot-time"}
    assert changed["kpi-p-change"] == {"children": "0.900"}
    # Components (the ladder rows) compare by content, not identity.
    moved = render_kpis(Latest("BTC-USD", make_snapshot(p_change=0.25, bids=[level("1", "1")]), 0, 3), FEED, STALE_NS)
    assert "ladder-body" in props_to_send(moved, sent)[0]


# -- sparklines ---------------------------------------------------------------------------------


@given(count=st.integers(0, 5000), max_points=st.integers(0, 700))
def test_downsample_keeps_order_bounds_and_the_newest_point(count: int, max_points: int) -> None:
    indices = downsample_indices(count, max_points)
    assert len(indices) <= max_points
    assert indices == sorted(set(indices))
    assert all(0 <= i < count for i in indices)
    if count and max_points:
        assert indices[-1] == count - 1
        assert len(indices) == min(count, max_points)


def test_sparkline_figure_has_gaps_for_unknown_values() -> None:
    figure = sparkline_figure([1_000_000_000, 2_000_000_000, 3_000_000_000], [0.5, math.nan, None], "p", "#000")
    trace = figure["data"][0]
    assert trace["x"] == [1000.0, 2000.0, 3000.0]
    assert trace["y"] == [0.5, None, None]
    assert figure["layout"]["xaxis"]["type"] == "date"


def test_sparkline_update_only_when_a_point_arrived() -> None:
    history = History(7, [1_000_000_000, 2_000_000_000], [0.1, 0.2], [100.0, None])
    p_figure, mid_figure, key = sparkline_update(history, "BTC-USD", None)
    assert key == ["BTC-USD", 7]
    assert p_figure["data"][0]["y"] == [0.1, 0.2]
    assert mid_figure["data"][0]["y"] == [100.0, None]
    assert sparkline_update(history, "BTC-USD", key) == (no_update, no_update, no_update)
    assert sparkline_update(history, "ETH-USD", key)[2] == ["ETH-USD", 7]
    empty_p, _, empty_key = sparkline_update(None, "BTC-USD", key)
    assert empty_p["data"][0]["y"] == []
    assert empty_key == ["BTC-USD", -1]


# -- the input contract -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "snapshot",
    [
        make_snapshot(),
        make_snapshot(model=None, p_change=None),
        make_snapshot(model=("base-rate", "0", "FALLBACK"), live_metrics=[]),
        make_snapshot(bids=[], asks=[], p_change=math.nan),
    ],
    ids=["champion", "no-model", "fallback", "empty-book"],
)
def test_test_snapshots_are_valid_snapshot_records(snapshot: Snapshot) -> None:
    serde = AvroSerde()
    decoded = serde.decode_as(serde.encode("qw.snapshot", snapshot), "qw.snapshot", Snapshot)
    assert decoded.symbol == snapshot.symbol
    assert decoded.feature_names == snapshot.feature_names
    assert render_kpis(Latest(decoded.symbol, decoded, 0, 1), FEED, STALE_NS).keys() == set(KPI_OUTPUTS)
