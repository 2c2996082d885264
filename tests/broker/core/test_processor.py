"""The stream processor on a real broker: dead letters, exactly-once outputs, state recovery."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import FatalError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, consumer_config, producer_config
from quotewatch.core.records import BookLevel, BookTop, Label
from quotewatch.core.runtime import InRecord, OutRecord, StreamProcessor
from quotewatch.core.runtime import session as session_module
from quotewatch.core.serde import SINGLE_OBJECT_MAGIC, AvroSerde, registry_client
from quotewatch.core.topics import TopicNames
from tests.helpers import RegistryOutage, read_topic, wait_for


def top(symbol: str, t: int, bid: int) -> BookTop:
    return BookTop(
        ts_event=t,
        ts_init=t,
        exchange="coinbase",
        symbol=symbol,
        tick_ms=100,
        epoch=1,
        bids=(BookLevel(price_e8=bid, size_e8=1),),
        asks=(BookLevel(price_e8=bid + 1, size_e8=1),),
    )


class RunningSumTask:
    """Emits, per input tick, a label whose ``label`` field is the running count of ticks of the symbol.

    State (the counts) is rebuilt on restart by replaying from the first offset of each partition.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.counts: dict[str, int] = {}
        self.first_offset: dict[tuple[str, int], int] = {}
        self.partition_of: dict[str, tuple[str, int]] = {}

    def process(self, record: InRecord[BookTop]) -> Iterable[OutRecord]:
        value = record.value
        if value.symbol == "POISON":
            raise ValueError("a record the task cannot handle")
        key = (record.topic, record.partition)
        self.first_offset.setdefault(key, record.offset)
        self.partition_of[value.symbol] = key
        self.counts[value.symbol] = self.counts.get(value.symbol, 0) + 1
        yield OutRecord(
            self.output,
            value.symbol,
            Label(
                ts_event=value.ts_event,
                ts_init=value.ts_init,
                exchange="coinbase",
                symbol=value.symbol,
                t_event=value.ts_event,
                delta_ms=0,
                epoch=1,
                label=self.counts[value.symbol],
                best_bid_e8=0,
                best_ask_e8=0,
                future_best_bid_e8=0,
                future_best_ask_e8=0,
            ),
        )

    def restart_offset(self, topic: str, partition: int) -> int | None:
        return self.first_offset.get((topic, partition))

    def reset(self, topic: str, partition: int) -> None:
        for symbol, key in list(self.partition_of.items()):
            if key == (topic, partition):
                self.counts.pop(symbol, None)
                del self.partition_of[symbol]
        self.first_offset.pop((topic, partition), None)


class StopWhileRebuilding(RunningSumTask):
    """Requests shutdown on the first record it re-processes to rebuild state at or past ``at``."""

    def __init__(self, output: str, shutdown: ShutdownSignal, at: int) -> None:
        super().__init__(output)
        self.shutdown = shutdown
        self.at = at
        self.rebuilt: list[int] = []

    def process(self, record: InRecord[BookTop]) -> Iterable[OutRecord]:
        if record.replaying:
            self.rebuilt.append(record.offset)
            if record.offset >= self.at:
                self.shutdown.set()
        return super().process(record)


@contextmanager
def running(
    settings: CommonSettings,
    task: RunningSumTask,
    group: str,
    *,
    batch_size: int = 50,
    shutdown: ShutdownSignal | None = None,
    serde: AvroSerde | None = None,
) -> Iterator[StreamProcessor]:
    shutdown = shutdown or ShutdownSignal()
    processor = StreamProcessor(
        settings=settings,
        service="test",
        task=task,
        input_topics=[TopicNames(settings.topic_prefix).book_top3],
        serde=serde or AvroSerde(),
        clock=SystemClock(),
        shutdown=shutdown,
        liveness=Liveness("test", SystemClock(), 30),
        group_id=group,
        batch_size=batch_size,
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            processor.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield processor
    finally:
        shutdown.set()
        thread.join(60)
        assert not thread.is_alive(), "processor did not stop"
        assert not errors, errors


def produce(settings: CommonSettings, values: list[bytes | BookTop], key: bytes = b"BTC-USD") -> None:
    topic = TopicNames(settings.topic_prefix).book_top3
    serde = AvroSerde()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for value in values:
        data = value if isinstance(value, bytes) else serde.encode(topic, value)
        producer.produce(topic, key=key, value=data, partition=0)
    assert producer.flush(10) == 0


def test_poison_records_go_to_the_dlq_with_coordinates_and_the_loop_keeps_going(
    topics: CommonSettings, group_id: str
) -> None:
    names = TopicNames(topics.topic_prefix)
    unknown_fingerprint = SINGLE_OBJECT_MAGIC + (0xDEADBEEF).to_bytes(8, "little") + b"\x00"
    produce(
        topics,
        [
            top("BTC-USD", 1, 10),
            b"not avro at all",
            unknown_fingerprint,
            top("POISON", 2, 10),
            top("BTC-USD", 3, 11),
        ],
    )
    with running(topics, RunningSumTask(names.labels), group_id):
        labels = wait_for(lambda: (r := read_topic(topics, names.labels)) and len(r) >= 2 and r, message="two labels")
    assert [label["label"] for label in labels] == [1, 2]
    dead = read_topic(topics, names.dlq, expected=3)
    assert [(d["source_topic"], d["source_partition"], d["source_offset"]) for d in dead] == [
        (names.book_top3, 0, 1),
        (names.book_top3, 0, 2),
        (names.book_top3, 0, 3),
    ]
    assert [d["error_type"] for d in dead] == ["DecodeError", "UnknownSchemaError", "ValueError"]
    assert "deadbeef" in dead[1]["reason"]
    assert dead[0]["source_value"] == b"not avro at all"
    assert all(d["service"] == "test" for d in dead)


def test_outputs_are_exactly_once_across_restarts_and_state_is_rebuilt(topics: CommonSettings, group_id: str) -> None:
    names = TopicNames(topics.topic_prefix)
    produce(topics, [top("BTC-USD", t, 100 + t) for t in range(40)])
    with running(topics, RunningSumTask(names.labels), group_id):
        wait_for(lambda: len(read_topic(topics, names.labels)) >= 40, message="first 40 labels")
    # A fresh task instance has no state; the processor must rebuild it from committed input.
    produce(topics, [top("BTC-USD", t, 100 + t) for t in range(40, 70)])
    with running(topics, RunningSumTask(names.labels), group_id):
        labels = wait_for(lambda: (r := read_topic(topics, names.labels)) and len(r) >= 70 and r, message="70 labels")
    assert [label["label"] for label in labels] == list(range(1, 71))
    assert [label["t_event"] for label in labels] == list(range(70))
    uncommitted = read_topic(topics, names.labels, isolation="read_uncommitted")
    assert len(uncommitted) == 70, "no aborted or duplicate output even for read_uncommitted readers"


def test_a_stop_while_rebuilding_state_keeps_the_commit_and_outputs_stay_exactly_once(
    topics: CommonSettings, group_id: str
) -> None:
    """Records re-processed only to rebuild state never move the committed offset back.

    The task needs every record from the first one, so a restarted processor re-reads 0-39 before
    it is live again. Stopped after a few batches of that (batch 5), it must leave the commit at 40:
    had it committed the rebuilt position, the next run would take 10-39 for live records and
    write their labels a second time.
    """
    names = TopicNames(topics.topic_prefix)
    produce(topics, [top("BTC-USD", t, 100 + t) for t in range(40)])
    with running(topics, RunningSumTask(names.labels), group_id):
        wait_for(lambda: len(read_topic(topics, names.labels)) >= 40, message="first 40 labels")
    assert committed_offset(topics, group_id, names.book_top3) == 40

    stop = ShutdownSignal()
    interrupted = StopWhileRebuilding(names.labels, stop, at=7)
    with running(topics, interrupted, group_id, batch_size=5, shutdown=stop):
        wait_for(lambda: stop.requested, timeout=60, message="the rebuild to reach offset 7")
    assert max(interrupted.rebuilt, default=39) < 39, "stopped before the rebuild was over"
    assert committed_offset(topics, group_id, names.book_top3) == 40, "the commit moved back during the rebuild"

    produce(topics, [top("BTC-USD", t, 100 + t) for t in range(40, 50)])
    with running(topics, RunningSumTask(names.labels), group_id, batch_size=5):
        labels = wait_for(lambda: (r := read_topic(topics, names.labels)) and len(r) >= 50 and r, message="50 labels")
    assert [label["t_event"] for label in labels] == list(range(50)), "a label was written twice or lost"
    assert [label["label"] for label in labels] == list(range(1, 51))


def committed_offset(settings: CommonSettings, group: str, topic: str) -> int:
    consumer = Consumer(consumer_config(settings, group, "committed-check"))
    try:
        (found,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return int(found.offset)
    finally:
        consumer.close()


def test_a_schema_registry_outage_retries_the_batch_instead_of_dead_lettering(
    topics: CommonSettings, group_id: str
) -> None:
    names = TopicNames(topics.topic_prefix)
    registry = registry_client(f"mock://{topics.topic_prefix}")
    writer = AvroSerde(registry=registry)
    produce(topics, [writer.encode(names.book_top3, top("BTC-USD", t, 100 + t)) for t in range(3)])
    outage = RegistryOutage(registry, failures=2)
    with running(topics, RunningSumTask(names.labels), group_id, serde=AvroSerde(registry=outage)):
        raw = wait_for(
            lambda: (r := read_topic(topics, names.labels, decode=False)) and len(r) >= 3 and r, message="3 labels"
        )
    labels = [writer.decode_as(record["_raw"], names.labels, Label) for record in raw]
    assert [label.label for label in labels] == [1, 2, 3], "each record processed once, after the outage"
    assert outage.lookups == 3, "two failed lookups, then the schema was found and cached"
    assert read_topic(topics, names.dlq, timeout=2) == [], "a registry outage is not the record's fault"


def test_offsets_a_dead_member_left_in_an_open_transaction_are_waited_for_not_fatal(
    topics: CommonSettings, group_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica SIGKILLed mid-transaction leaves its offsets pending until the coordinator aborts the
    transaction (``transaction.timeout.ms`` later); meanwhile the member taking its partitions over
    gets no committed offset (read_committed, KIP-447). It must wait for it, then start from the
    offset committed before (the dead replica's pending one is aborted): every label exactly once.

    Before the fix the offset fetch in the rebalance callback timed out and the exception ended the
    service taking over (seen in tests/e2e/services/test_replicas.py on a loaded machine).
    """
    names = TopicNames(topics.topic_prefix)
    produce(topics, [top("BTC-USD", t, 100 + t) for t in range(20)])
    with running(topics, RunningSumTask(names.labels), group_id):
        wait_for(lambda: len(read_topic(topics, names.labels)) >= 10, message="the first labels")
    committed_before = committed_offset(topics, group_id, names.book_top3)
    # The dead member: its transaction holds offsets for the group and is never ended by it.
    dead = Producer(producer_config(topics, "dead-replica", f"{group_id}-dead", **{"transaction.timeout.ms": 4000}))
    dead.init_transactions(30)
    dead.begin_transaction()
    metadata_of = Consumer(consumer_config(topics, group_id, "dead-replica-meta"))
    dead.send_offsets_to_transaction(
        [TopicPartition(names.book_top3, 0, committed_before + 5)], metadata_of.consumer_group_metadata(), 30
    )
    metadata_of.close()
    monkeypatch.setattr(session_module, "COMMITTED_TIMEOUT_SECONDS", 0.5)
    produce(topics, [top("BTC-USD", t, 100 + t) for t in range(20, 30)])
    with running(topics, RunningSumTask(names.labels), group_id):
        labels = wait_for(
            lambda: (r := read_topic(topics, names.labels)) and len(r) >= 30 and r,
            timeout=90,
            message="30 labels after the dead member's transaction was aborted",
        )
    assert [label["t_event"] for label in labels] == list(range(30)), "a label was written twice or lost"
    assert [label["label"] for label in labels] == list(range(1, 31)), "state rebuilt from the committed offset"
    del dead  # held until here: the transaction was never ended by its producer


class FatalOnSymbol(RunningSumTask):
    """Raises FatalError on the record of ``symbol``: the service cannot go on."""

    def __init__(self, output: str, symbol: str) -> None:
        super().__init__(output)
        self.symbol = symbol

    def process(self, record: InRecord[BookTop]) -> Iterable[OutRecord]:
        if record.value.symbol == self.symbol:
            raise FatalError("the task cannot go on")
        return super().process(record)


def test_a_fatal_error_of_the_task_ends_the_run_and_is_never_dead_lettered(
    topics: CommonSettings, group_id: str
) -> None:
    """FatalError out of ``task.process`` leaves ``run()`` (the process exits non-zero on it): nothing
    of the open batch is committed nor dead-lettered, and a restart processes the batch exactly once."""
    names = TopicNames(topics.topic_prefix)
    # The fatal record first: whatever the batches, nothing before it could have been committed.
    produce(topics, [top("FATAL", 0, 5), top("BTC-USD", 1, 101), top("BTC-USD", 2, 102), top("BTC-USD", 3, 103)])
    processor = StreamProcessor(
        settings=topics,
        service="test",
        task=FatalOnSymbol(names.labels, "FATAL"),
        input_topics=[names.book_top3],
        serde=AvroSerde(),
        clock=SystemClock(),
        shutdown=ShutdownSignal(),
        liveness=Liveness("test", SystemClock(), 30),
        group_id=group_id,
    )
    with pytest.raises(FatalError, match="the task cannot go on"):
        processor.run()
    assert read_topic(topics, names.dlq, timeout=2) == [], "a fatal error is not the record's fault"
    assert read_topic(topics, names.labels, timeout=2) == [], "an output of the failed batch became visible"
    assert committed_offset(topics, group_id, names.book_top3) < 0, "an offset was committed"
    # The supervisor restarts the service (same transactional id: the open transaction is aborted).
    with running(topics, RunningSumTask(names.labels), group_id):
        labels = wait_for(lambda: (r := read_topic(topics, names.labels)) and len(r) >= 4 and r, message="4 labels")
    assert sorted((label["t_event"], label["symbol"], label["label"]) for label in labels) == [
        (0, "FATAL", 1),
        (1, "BTC-USD", 1),
        (2, "BTC-USD", 2),
        (3, "BTC-USD", 3),
    ], "every record processed once after the restart"
