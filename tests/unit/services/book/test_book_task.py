"""BookTask without a broker: records out, restart offsets per partition, reset, bad events."""

from __future__ import annotations

from typing import Any

from quotewatch.core.clock import FakeClock
from quotewatch.core.processor import InRecord
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.book.main import BookTask
from tests.unit.services.book.market_events import BOOK_LEVELS, E8, MS, T0, clock, snapshot, status, update

TOPICS = TopicNames("qw")


def rec(value: dict[str, Any], offset: int, partition: int = 0) -> InRecord:
    return InRecord(TOPICS.md_events, partition, offset, value["symbol"], value, 1_700_000_000_000)


def make_task() -> BookTask:
    return BookTask(TOPICS, 100, FakeClock(), AvroSerde())


def test_ticks_become_top3_and_feature_records_keyed_by_symbol() -> None:
    task = make_task()
    assert list(task.process(rec(snapshot(T0 + 10 * MS, *BOOK_LEVELS), 0))) == []
    out = list(task.process(rec(clock(T0 + 250 * MS), 1)))
    assert [(o.topic, o.key, o.value["ts_event"]) for o in out] == [
        (TOPICS.book_top3, "BTC-USD", T0 + 100 * MS),
        (TOPICS.features, "BTC-USD", T0 + 100 * MS),
        (TOPICS.book_top3, "BTC-USD", T0 + 200 * MS),
        (TOPICS.features, "BTC-USD", T0 + 200 * MS),
    ]
    serde = AvroSerde()
    for o in out:
        assert serde.decode(serde.encode(o.topic, o.value), o.topic) == o.value


def test_restart_offset_is_per_partition_and_reset_forgets_only_that_partition() -> None:
    task = make_task()
    task.process(rec(status(T0, symbol="BTC-USD"), 5, partition=0))
    task.process(rec(snapshot(T0 + 10 * MS, *BOOK_LEVELS, symbol="BTC-USD"), 6, partition=0))
    task.process(rec(snapshot(T0 + 10 * MS, *BOOK_LEVELS, symbol="ETH-USD"), 40, partition=2))
    task.process(rec(update(T0 + 20 * MS, ("BID", 100 * E8, E8), symbol="ETH-USD"), 41, partition=2))
    task.process(rec(clock(T0 + 30 * MS, symbol="BTC-USD"), 7, partition=0))
    assert task.restart_offset(TOPICS.md_events, 0) == 5, "the status at 5 sets the feed state"
    assert task.restart_offset(TOPICS.md_events, 2) == 40, "the snapshot at 40"
    assert task.restart_offset(TOPICS.md_events, 1) is None
    task.reset(TOPICS.md_events, 0)
    assert task.restart_offset(TOPICS.md_events, 0) is None
    assert set(task.pipeline.pipelines) == {"ETH-USD"}


def test_a_bad_update_is_dead_lettered_with_the_ticks_it_closed() -> None:
    task = make_task()
    task.process(rec(snapshot(T0 + 10 * MS, *BOOK_LEVELS), 0))
    out = list(task.process(rec(update(T0 + 150 * MS, ("BID", 100 * E8, -5)), 1, partition=0)))
    assert [o.topic for o in out] == [TOPICS.book_top3, TOPICS.features, TOPICS.dlq]
    dead = out[-1].value
    assert (dead["source_topic"], dead["source_partition"], dead["source_offset"]) == (TOPICS.md_events, 0, 1)
    assert dead["error_type"] == "MarketEventError"
    assert "negative size" in dead["reason"]
    assert AvroSerde().decode(dead["source_value"], TOPICS.md_events)["update"]["changes"][0]["size_e8"] == -5


def test_run_book_refuses_a_tick_that_does_not_divide_the_feature_windows() -> None:
    from click.testing import CliRunner

    from quotewatch.cli import main

    result = CliRunner().invoke(main, ["run", "book"], env={"TICK_MS": "300", "DELTA_MS": "600"})
    assert result.exit_code == 1
    assert "TICK_MS=300 does not divide the 100 ms feature window" in result.output
