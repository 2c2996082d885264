"""The labeler: y(t) from ticks t and t + Δ, epochs, first ticks, gaps, interleaving, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from quotewatch.core.config import CommonSettings
from quotewatch.core.records import BookLevel, BookTop, Label
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler, LabelInputError, SymbolLabeler, check_horizon, is_synced
from tests.unit.services.book.market_events import MS, T0, synthetic_feed


def top(t_ms: int, bid: int | None, ask: int | None, epoch: int = 1, symbol: str = "BTC-USD") -> BookTop:
    return BookTop(
        ts_event=T0 + t_ms * MS,
        ts_init=T0 + t_ms * MS + 3,
        exchange="coinbase",
        symbol=symbol,
        tick_ms=100,
        epoch=epoch,
        bids=() if bid is None else (BookLevel(price_e8=bid, size_e8=1),),
        asks=() if ask is None else (BookLevel(price_e8=ask, size_e8=1),),
    )


def labels_of(labeler: SymbolLabeler | Labeler, tops: list[BookTop]) -> list[Label]:
    out = []
    for position, record in enumerate(tops):
        label = labeler.process(record, position)
        if label is not None:
            out.append(label)
    return out


def test_a_label_is_emitted_when_t_plus_delta_arrives() -> None:
    tops = [top(100 * k, 10 + (k >= 7), 20) for k in range(1, 13)]
    labels = labels_of(SymbolLabeler("BTC-USD", 500, 100), tops)
    assert [(label.t_event - T0) // MS for label in labels] == [100 * k for k in range(1, 8)]
    assert [label.label for label in labels] == [0, 1, 1, 1, 1, 1, 0]
    first = labels[1]
    assert first.ts_event == T0 + 700 * MS
    assert first.ts_init == T0 + 700 * MS + 3, "ts_init of the BookTop at t + Δ"
    assert (first.best_bid_e8, first.best_ask_e8) == (10, 20)
    assert (first.future_best_bid_e8, first.future_best_ask_e8) == (11, 20)
    assert first.delta_ms == 500
    assert first.epoch == 1


def test_the_first_ticks_wait_and_an_ask_change_alone_counts() -> None:
    labeler = SymbolLabeler("BTC-USD", 200, 100)
    assert labeler.process(top(100, 10, 20)) is None
    assert labeler.process(top(200, 10, 20)) is None
    label = labeler.process(top(300, 10, 21))
    assert label is not None
    assert label.label == 1


def test_no_label_for_missing_ticks_and_an_unsynced_flag_across_epochs() -> None:
    tops = [
        top(100, 10, 20, epoch=1),
        top(200, 10, 20, epoch=1),
        # unsynced stretch: the book emitted nothing for 300..600
        top(700, 10, 20, epoch=2),
        top(800, 10, 20, epoch=2),
        top(900, 10, 20, epoch=2),
        top(1400, 10, 20, epoch=2),  # a skipped stretch within the epoch
    ]
    labels = labels_of(SymbolLabeler("BTC-USD", 200, 100), tops)
    assert [((label.t_event - T0) // MS, label.synced_over_horizon) for label in labels] == [(700, True)]
    tops = [top(100, 10, 20, epoch=1), top(200, 10, 20, epoch=2), top(300, 11, 20, epoch=2)]
    labels = labels_of(SymbolLabeler("BTC-USD", 200, 100), tops)
    assert [((label.t_event - T0) // MS, label.label, label.epoch) for label in labels] == [(100, 1, 1)]
    assert not is_synced(labels[0]), "t=100 and t=300 are in different epochs: a resync inside [t, t + Δ]"


def test_one_sided_ticks_get_no_label() -> None:
    tops = [top(100, None, 20), top(200, 10, 20), top(300, 10, None), top(400, 10, 20)]
    labels = labels_of(SymbolLabeler("BTC-USD", 200, 100), tops)
    assert [(label.t_event - T0) // MS for label in labels] == [200]


def test_symbols_are_labelled_independently_when_interleaved() -> None:
    tops: list[BookTop] = []
    for k in range(1, 6):
        tops.append(top(100 * k, 10 * k, 1000, symbol="BTC-USD"))
        tops.append(top(100 * k, 7, 8, symbol="ETH-USD"))
    labels = labels_of(Labeler(200, 100), tops)
    assert [(label.symbol, (label.t_event - T0) // MS, label.label) for label in labels] == [
        ("BTC-USD", 100, 1),
        ("ETH-USD", 100, 0),
        ("BTC-USD", 200, 1),
        ("ETH-USD", 200, 0),
        ("BTC-USD", 300, 1),
        ("ETH-USD", 300, 0),
    ]


def test_delta_must_be_a_multiple_of_the_tick() -> None:
    with pytest.raises(ValueError, match="DELTA_MS=250 is not a positive multiple of TICK_MS=100"):
        check_horizon(250, 100)
    with pytest.raises(ValueError, match="multiple"):
        Labeler(0, 100)
    with pytest.raises(ValueError, match="DELTA_MS=250 is not a multiple of TICK_MS=100"):
        CommonSettings(delta_ms=250, tick_ms=100)


def test_bad_ticks_are_rejected_without_changing_the_state() -> None:
    labeler = SymbolLabeler("BTC-USD", 200, 100)
    labeler.process(top(100, 10, 20))
    labeler.process(top(200, 10, 20))
    with pytest.raises(LabelInputError, match="not newer"):
        labeler.process(top(200, 11, 20))
    with pytest.raises(LabelInputError, match="not on the 100 ms grid"):
        labeler.process(top(250, 11, 20))
    with pytest.raises(LabelInputError, match="ETH-USD"):
        labeler.process(top(300, 11, 20, symbol="ETH-USD"))
    with pytest.raises(LabelInputError, match="50 ms grid"):
        labeler.process(replace(top(300, 11, 20), tick_ms=50))
    label = labeler.process(top(300, 10, 20))
    assert label is not None
    assert label.label == 0


def _book_tops(seed: int) -> list[BookTop]:
    pipeline = BookPipeline(100)
    tops: list[BookTop] = []
    for position, record in enumerate(synthetic_feed(seed, count=600)):
        tops.extend(output.book_top for output in pipeline.process(record, position))
    return tops


@settings(max_examples=25)
@given(seed=st.integers(min_value=0, max_value=10_000), fraction=st.floats(min_value=0, max_value=1))
def test_replaying_from_the_restart_position_reproduces_the_labels(seed: int, fraction: float) -> None:
    tops = _book_tops(seed)
    cut = int(fraction * len(tops))
    original = Labeler(500, 100)
    for position in range(cut):
        original.process(tops[position], position)
    restart = original.restart_position()
    restarted = Labeler(500, 100)
    for position in range(cut if restart is None else restart, cut):
        restarted.process(tops[position], position)
    for position in range(cut, len(tops)):
        assert restarted.process(tops[position], position) == original.process(tops[position], position)


def test_labels_of_a_synthetic_feed_match_a_brute_force_definition() -> None:
    tops = _book_tops(3)
    labels = labels_of(Labeler(500, 100), tops)
    by_key = {(record.symbol, record.ts_event): record for record in tops}
    expected = []
    for record in tops:
        later = by_key.get((record.symbol, record.ts_event + 500 * MS))
        if later is None:
            continue
        if not (record.bids and record.asks and later.bids and later.asks):
            continue
        changed = record.bids[0].price_e8 != later.bids[0].price_e8 or record.asks[0].price_e8 != later.asks[0].price_e8
        expected.append((record.symbol, record.ts_event, int(changed), later.epoch == record.epoch))
    assert len(expected) > 100
    assert sorted((label.symbol, label.t_event, label.label, label.synced_over_horizon) for label in labels) == sorted(
        expected
    )
    assert {label.synced_over_horizon for label in labels} == {True, False}, "the feed's gaps resync inside Δ"
    assert {label.label for label in labels} == {0, 1}
