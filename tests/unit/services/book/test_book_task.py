"""BookTask without a broker: records out, restart offsets per partition, reset, bad events."""

from __future__ import annotations

from quotewatch.core.clock import FakeClock
from quotewatch.core.records import DeadLetter, MarketEvent
from quotewatch.core.runtime import InRecord
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.book.main import BookTask
from tests.unit.services.book.market_events import BOOK_LEVELS, E8, MS, T0, clock, snapshot, status, update

TOPICS = TopicNames("qw")


SERDE = AvroSerde()


def rec(value: MarketEvent, offset: int, partition: int = 0) -> InRecord[MarketEvent]:
    """The InRecord the processor hands over: the value with the bytes it was decoded from."""
    raw = SERDE.encode(TOPICS.md_events, value)
    return InRecord(TOPICS.md_events, partition, offset, value.symbol, value, 1_700_000_000_000, raw=raw)


def make_task() -> BookTask:
    return BookTask(TOPICS, 100, FakeClock())


def test_ticks_become_top3_and_feature_records_keyed_by_symbol() -> None:
    task = make_task()
    assert list(task.process(rec(snapshot(T0 + 10 * MS, *BOOK_LEVELS), 0))) == []
    out = list(task.process(rec(clock(T0 + 250 * MS), 1)))
    assert [(o.topic, o.key, o.value.ts_event) for o in out] == [
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
    bad = update(T0 + 150 * MS, ("BID", 100 * E8, -5))
    # Bytes no encoder of this process would write (another writer's framing): they must come back as they are.
    original = b"\x00\x00\x00\x00\x07" + SERDE.encode(TOPICS.md_events, bad)[10:]
    consumed = InRecord(TOPICS.md_events, 0, 1, "BTC-USD", bad, 1_700_000_000_000, raw=original)
    out = list(task.process(consumed))
    assert [o.topic for o in out] == [TOPICS.book_top3, TOPICS.features, TOPICS.dlq]
    dead = out[-1].value
    assert isinstance(dead, DeadLetter)
    assert (dead.source_topic, dead.source_partition, dead.source_offset) == (TOPICS.md_events, 0, 1)
    assert dead.error_type == "MarketEventError"
    assert "negative size" in dead.reason
    assert dead.source_value == original, "the bytes consumed, never re-encoded"
    assert dead.ts_event == 1_700_000_000_000 * MS
    assert dead.source_key == b"BTC-USD"
    assert dead.source_ref == ""


def test_run_book_refuses_a_tick_that_does_not_divide_the_feature_windows() -> None:
    from click.testing import CliRunner

    from quotewatch.cli import main

    result = CliRunner().invoke(main, ["run", "book"], env={"TICK_MS": "300", "DELTA_MS": "600"})
    assert result.exit_code == 1
    assert "TICK_MS=300 does not divide the 100 ms feature window" in result.output
