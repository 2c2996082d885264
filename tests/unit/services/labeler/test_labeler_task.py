"""LabelerTask without a broker: labels out, restart offsets per partition, reset."""

from __future__ import annotations

from quotewatch.core.records import BookLevel, BookTop, Label
from quotewatch.core.runtime import InRecord, OutRecord
from quotewatch.core.topics import TopicNames
from quotewatch.services.labeler.main import LabelerTask
from tests.records import checked
from tests.unit.services.book.market_events import MS, T0

TOPICS = TopicNames("qw")


def tick(t_ms: int, bid: int, symbol: str = "BTC-USD") -> BookTop:
    return BookTop(
        ts_event=T0 + t_ms * MS,
        ts_init=T0 + t_ms * MS,
        exchange="coinbase",
        symbol=symbol,
        tick_ms=100,
        epoch=1,
        bids=(BookLevel(price_e8=bid, size_e8=1),),
        asks=(BookLevel(price_e8=10_000, size_e8=1),),
    )


def rec(value: BookTop, offset: int, partition: int) -> InRecord[BookTop]:
    return InRecord(TOPICS.book_top3, partition, offset, value.symbol, value, 0)


def test_labels_are_keyed_by_symbol_and_the_restart_is_the_oldest_pending_tick() -> None:
    task = LabelerTask(TOPICS, 200, 100)
    out: list[OutRecord] = []
    for k in range(1, 6):
        out += task.process(rec(tick(100 * k, k), 10 + k, partition=1))
    assert [(o.topic, o.key, checked(o.value, Label).t_event) for o in out] == [
        (TOPICS.labels, "BTC-USD", T0 + 100 * MS),
        (TOPICS.labels, "BTC-USD", T0 + 200 * MS),
        (TOPICS.labels, "BTC-USD", T0 + 300 * MS),
    ]
    assert task.restart_offset(TOPICS.book_top3, 1) == 14, "ticks 400 and 500 (offsets 14, 15) wait for labels"
    task.process(rec(tick(100, 1, symbol="ETH-USD"), 3, partition=0))
    assert task.restart_offset(TOPICS.book_top3, 0) == 3
    task.reset(TOPICS.book_top3, 1)
    assert task.restart_offset(TOPICS.book_top3, 1) is None
    assert task.restart_offset(TOPICS.book_top3, 0) == 3
