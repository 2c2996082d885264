"""The read_committed checker's rules notice each kind of fault (so a clean run means something).

:class:`~tests.faults.checker.StreamRules` is fed hand-made records in delivery order: a clean
stream passes, and each fault (a record delivered twice, a tick or frame missing, a step back)
is counted as what it is. No broker: the rules are pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from quotewatch.core.records import BookLevel, BookTop, FeatureVector, Label, ModelRole, Prediction, RawFrame, Record
from tests.faults.checker import Delivered, StreamRules

PREFIX = "rules"
TICK_MS = 100
DELTA_MS = 500
MS = 1_000_000
T0 = 1_700_000_000_000 * MS
"""A tick on the grid (ns)."""

Stream = list[tuple[str, Delivered]]


SYMBOL = "BTC-USD"
LEVEL = (BookLevel(price_e8=1, size_e8=1),)


def _top(t: int, epoch: int, one_sided: bool = False) -> BookTop:
    return BookTop(
        ts_event=t,
        ts_init=t,
        exchange="coinbase",
        symbol=SYMBOL,
        tick_ms=TICK_MS,
        epoch=epoch,
        bids=LEVEL,
        asks=() if one_sided else LEVEL,
    )


def _feature(t: int, epoch: int) -> FeatureVector:
    return FeatureVector(
        ts_event=t,
        ts_init=t,
        exchange="coinbase",
        symbol=SYMBOL,
        tick_ms=TICK_MS,
        epoch=epoch,
        feature_spec_id="spec",
        values=(0.0,),
        bids=LEVEL,
        asks=LEVEL,
    )


def _label(t: int, epoch: int) -> Label:
    return Label(
        ts_event=t + DELTA_MS * MS,
        ts_init=t + DELTA_MS * MS,
        exchange="coinbase",
        symbol=SYMBOL,
        t_event=t,
        delta_ms=DELTA_MS,
        epoch=epoch,
        label=0,
        best_bid_e8=1,
        best_ask_e8=2,
        future_best_bid_e8=1,
        future_best_ask_e8=2,
    )


def _prediction(t: int, role: ModelRole = "CHAMPION") -> Prediction:
    return Prediction(
        ts_event=t,
        ts_init=t,
        exchange="coinbase",
        symbol=SYMBOL,
        p_change=0.5,
        model_name="m",
        model_version="1",
        model_role=role,
        feature_spec_id="spec",
    )


def _frame(connection: str, index: int) -> RawFrame:
    return RawFrame(
        ts_event=T0,
        ts_init=T0,
        exchange="coinbase",
        feed="coinbase-advanced",
        symbols=(SYMBOL,),
        connection_id=connection,
        frame_index=index,
        kind="FRAME",
        text="{}",
    )


def clean_stream() -> Stream:
    """Ticks 0..9 of epoch A, then epoch B from tick 15 to 24 (a resync: no gap between epochs),
    features and a served prediction for each, labels of ticks whose t + Δ is in the same epoch,
    and md.raw frames 0..4 of two connections."""
    epoch_a, epoch_b = T0, T0 + 15 * TICK_MS * MS
    ticks = [(T0 + k * TICK_MS * MS, epoch_a) for k in range(10)]
    ticks += [(T0 + k * TICK_MS * MS, epoch_b) for k in range(15, 25)]
    horizon = DELTA_MS // TICK_MS
    by_topic: dict[str, list[Record]] = {
        "book.top3": [_top(t, e) for t, e in ticks],
        "features": [_feature(t, e) for t, e in ticks],
        "predictions": [_prediction(t) for t, _ in ticks],
        "labels": [_label(t, e) for i, (t, e) in enumerate(ticks[:-horizon]) if ticks[i + horizon][1] == e],
        "md.raw": [_frame(c, i) for c in ("c1", "c2") for i in range(5)],
    }
    stream: Stream = []
    for suffix, values in by_topic.items():
        stream += [(f"{PREFIX}.{suffix}", Delivered(0, 10 + 2 * i, "BTC-USD", b"", v)) for i, v in enumerate(values)]
    return stream


def run(stream: Stream) -> Any:
    rules = StreamRules(PREFIX, TICK_MS, DELTA_MS)
    for topic, record in stream:
        rules.take(topic, record)
    return rules.judge()


def _edit(suffix: str, edit: Callable[[list[Delivered]], list[Delivered]]) -> Callable[[Stream], Stream]:
    """A fault: ``edit`` rewrites the records of one topic (offsets stay increasing unless it says so)."""

    def apply(stream: Stream) -> Stream:
        topic = f"{PREFIX}.{suffix}"
        mine = edit([r for t, r in stream if t == topic])
        return [(t, r) for t, r in stream if t != topic] + [(topic, r) for r in mine]

    return apply


def _renumber(records: list[Delivered]) -> list[Delivered]:
    return [Delivered(r.partition, 10 + 2 * i, r.key, r.raw, r.value) for i, r in enumerate(records)]


def test_a_clean_stream_passes() -> None:
    report = run(clean_stream())
    assert report.ok, report.violations
    assert report.gaps == report.duplicates == report.out_of_order == 0


def test_a_label_flagged_unsynced_is_an_extra_not_a_gap() -> None:
    """The labeler publishes the label of a tick whose t + Δ is in a newer epoch, flagged
    synced_over_horizon=false: ticks 0..4 of epoch A have synced labels, tick 7's t + Δ lands in
    a newer epoch (ticks 5 and 6 land in the unsynced stretch and get none)."""
    stream = clean_stream()
    labels = [index for index, (topic, _) in enumerate(stream) if topic == f"{PREFIX}.labels"]
    last_a = labels[4]
    _, delivered = stream[last_a]
    extra = msgspec.structs.replace(_label(T0 + 7 * TICK_MS * MS, T0), synced_over_horizon=False)
    stream.insert(last_a + 1, (f"{PREFIX}.labels", Delivered(0, delivered.offset + 1, SYMBOL, b"", extra)))
    report = run(stream)
    assert report.ok, report.violations
    assert report.gaps == report.duplicates == report.out_of_order == 0
    synced = msgspec.structs.replace(extra, synced_over_horizon=True)
    stream[last_a + 1] = (f"{PREFIX}.labels", Delivered(0, delivered.offset + 1, SYMBOL, b"", synced))
    assert run(stream).gaps == 2, "the same label flagged synced leaves ticks 5 and 6 missing"


FAULTS: dict[str, tuple[Callable[[Stream], Stream], dict[str, int]]] = {
    "a tick produced twice": (
        _edit("book.top3", lambda rs: _renumber(rs[:4] + rs[3:])),
        {"duplicates": 1},
    ),
    "a tick lost inside an epoch": (
        _edit("book.top3", lambda rs: _renumber(rs[:4] + rs[5:])),
        {"gaps": 1},
    ),
    "a tick from the past": (
        _edit("book.top3", lambda rs: _renumber([*rs[:6], rs[2], *rs[6:]])),
        {"out_of_order": 1},
    ),
    "an offset delivered twice": (
        _edit("book.top3", lambda rs: [*rs[:4], rs[3], *rs[4:]]),
        {"duplicates": 1},
    ),
    "a partition going back": (
        _edit("book.top3", lambda rs: [*rs[:4], rs[1], *rs[4:]]),
        {"out_of_order": 1},
    ),
    "a feature vector lost": (
        _edit("features", lambda rs: _renumber(rs[:3] + rs[4:])),
        {"gaps": 1},
    ),
    "labels lost": (
        _edit("labels", lambda rs: _renumber(rs[:1] + rs[3:])),
        {"gaps": 2},
    ),
    "a served prediction lost": (
        _edit("predictions", lambda rs: _renumber(rs[:3] + rs[4:])),
        {"gaps": 1},
    ),
    "a prediction served twice": (
        _edit("predictions", lambda rs: _renumber(rs[:3] + rs[2:])),
        {"duplicates": 1},
    ),
    "two frames lost": (
        _edit("md.raw", lambda rs: _renumber(rs[:2] + rs[4:])),
        {"gaps": 2},
    ),
    "a frame logged twice": (
        _edit("md.raw", lambda rs: _renumber(rs[:2] + rs[1:])),
        {"duplicates": 1},
    ),
    "a record of another topic's type (and so a feature vector missing)": (
        _edit("features", lambda rs: [_retyped(r, _label(T0, T0)) if i == 3 else r for i, r in enumerate(rs)]),
        {"out_of_order": 1, "gaps": 1},
    ),
}


def _retyped(record: Delivered, value: Record) -> Delivered:
    return Delivered(record.partition, record.offset, record.key, record.raw, value)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_running_tally_counts_each_fault_as_the_verdict_will(fault: str) -> None:
    """What the outage test reports per outage (:meth:`StreamRules.tally`, before the end) adds up
    to the verdict: lost = gaps, duplicated = duplicates + out of order; tallying changes nothing."""
    inject, _ = FAULTS[fault]
    rules = StreamRules(PREFIX, TICK_MS, DELTA_MS)
    for topic, record in inject(clean_stream()):
        rules.take(topic, record)
    lost, duplicated = rules.tally()
    assert rules.tally() == (lost, duplicated)
    report = rules.judge()
    assert (lost, duplicated) == (report.gaps, report.duplicates + report.out_of_order) != (0, 0)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_counted_as_what_it_is(fault: str) -> None:
    inject, expected = FAULTS[fault]
    report = run(inject(clean_stream()))
    found = {"duplicates": report.duplicates, "gaps": report.gaps, "out_of_order": report.out_of_order}
    assert found == {**dict.fromkeys(found, 0), **expected}, report.violations
    assert not report.ok


def test_a_tick_without_features_is_no_gap_when_its_book_has_an_empty_side() -> None:
    one_sided = T0 + 7 * TICK_MS * MS

    def one_sided_book(records: list[Delivered]) -> list[Delivered]:
        return [
            Delivered(r.partition, r.offset, r.key, r.raw, _top(one_sided, r.value.epoch, one_sided=True))
            if isinstance(r.value, BookTop) and r.value.ts_event == one_sided
            else r
            for r in records
        ]

    def without(*ticks: int) -> Callable[[list[Delivered]], list[Delivered]]:
        """The records whose tick (``t_event`` of a label, else ``ts_event``) is not one of ``ticks``."""

        def tick(value: Record | None) -> int | None:
            if isinstance(value, Label):
                return value.t_event
            return value.ts_event if isinstance(value, FeatureVector | Prediction) else None

        return lambda records: _renumber([r for r in records if tick(r.value) not in ticks])

    stream = _edit("book.top3", one_sided_book)(clean_stream())
    # No feature vector for that tick, so no prediction either, and no label for a t or t + Δ on it.
    stream = _edit("features", without(one_sided))(stream)
    stream = _edit("predictions", without(one_sided))(stream)
    stream = _edit("labels", without(one_sided, one_sided - DELTA_MS * MS))(stream)
    report = run(stream)
    assert report.ok, report.violations

    # The same tick missing from the features with a two-sided book is a gap.
    report = run(_edit("features", without(one_sided))(clean_stream()))
    assert report.gaps == 1, report.violations
