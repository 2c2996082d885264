"""The snapshot consumer's loop against a scripted consumer (no broker): lag, caught-up, broker errors.

:class:`ScriptedConsumer` behaves like a ``read_committed`` librdkafka consumer of one partition:
it delivers committed records only, its position moves past transaction markers and aborted
records (never delivered), and its watermark query answers the last stable offset. The same
cases on a real broker are in tests/broker/services/dashboard/.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, TopicPartition

from quotewatch.core.clock import FakeClock
from quotewatch.core.config import DashboardSettings
from quotewatch.core.health import Liveness
from quotewatch.core.serde import AvroSerde
from quotewatch.services.dashboard import consumer as consumer_module
from quotewatch.services.dashboard.consumer import LAG_CHECK_NS, SnapshotConsumer
from quotewatch.services.dashboard.store import SnapshotStore
from tests.helpers import wait_for
from tests.unit.services.dashboard.factories import T0_NS, make_snapshot

TOPIC = "qw.snapshot"
STALL_SECONDS = 30
RECORD, MARKER, ABORTED, OPEN = "record", "marker", "aborted", "open"


@dataclass
class Message:
    _offset: int
    _value: bytes

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, T0_NS // 1_000_000


@dataclass
class ScriptedConsumer:
    """One partition whose log is ``entries`` (kind, value); what a read_committed consumer sees of it."""

    entries: list[tuple[str, bytes]]
    fetching: threading.Event = field(default_factory=threading.Event)
    """Cleared: fetches return nothing (the records are lag)."""
    failing_queries: int = 0
    """The next this many watermark queries block until ``release`` is set, then time out."""
    release: threading.Event = field(default_factory=threading.Event)
    in_query: threading.Event = field(default_factory=threading.Event)
    queries: int = 0
    _next: int = 0
    _position: int = -1001  # OFFSET_INVALID until the first fetch

    def __post_init__(self) -> None:
        self.fetching.set()

    @property
    def stable(self) -> int:
        """The last stable offset: the first offset of the open transaction, else the log end."""
        kinds = [kind for kind, _ in self.entries]
        return kinds.index(OPEN) if OPEN in kinds else len(kinds)

    def list_topics(self, topic: str, timeout: float) -> Any:
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None})})

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._next = 0

    def consume(self, count: int, timeout: float) -> list[Message]:
        if not self.fetching.is_set():
            return []
        delivered: list[Message] = []
        while self._next < self.stable and len(delivered) < count:
            kind, value = self.entries[self._next]
            if kind == RECORD:
                delivered.append(Message(self._next, value))
            self._next += 1  # markers and aborted records are skipped, the position moves on
        if self._next > 0:
            self._position = self._next
        return delivered

    def poll(self, timeout: float) -> Message | None:
        batch = self.consume(1, 0)
        if batch:
            return batch[0]
        threading.Event().wait(min(timeout, 0.01))  # a poll blocks for its timeout when idle
        return None

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self._position) for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        assert not cached, "the cached watermark is the high watermark, not the last stable offset"
        self.queries += 1
        if self.failing_queries:
            self.in_query.set()
            self.release.wait(timeout=30)
            self.failing_queries -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return 0, self.stable

    def close(self) -> None:
        pass


@dataclass
class Running:
    consumer: SnapshotConsumer
    scripted: ScriptedConsumer
    clock: FakeClock
    liveness: Liveness
    store: SnapshotStore

    def check(self) -> None:
        """Let the next lag check fall due (the loop runs it on its next turn)."""
        self.clock.advance(LAG_CHECK_NS)

    def checked_until(self, condition: Any, message: str) -> None:
        def due_and(condition: Any = condition) -> bool:
            self.check()
            return bool(condition())

        wait_for(due_and, timeout=10, message=message)


def snapshots(count: int) -> list[tuple[str, bytes]]:
    serde = AvroSerde()
    return [
        (RECORD, serde.encode(TOPIC, make_snapshot("BTC-USD", ts_event=T0_NS + i * 100_000_000))) for i in range(count)
    ]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    started: list[SnapshotConsumer] = []

    def start(scripted: ScriptedConsumer) -> Running:
        monkeypatch.setattr(consumer_module, "make_consumer", lambda *args, **kwargs: scripted)
        clock = FakeClock()
        liveness = Liveness("dashboard", clock, STALL_SECONDS)
        store = SnapshotStore(clock)
        consumer = SnapshotConsumer(DashboardSettings(), TOPIC, store, AvroSerde(), clock, liveness)
        started.append(consumer.start())
        return Running(consumer, scripted, clock, liveness, store)

    yield start
    for consumer in started:
        consumer.stop()


def test_a_topic_ending_in_an_aborted_transaction_is_caught_up_and_healthy(run: Any) -> None:
    # Offsets 0-3 committed snapshots, 4 their commit marker, 5-9 a transaction inference was
    # killed in (aborted by the coordinator), 10 the abort marker; then no new snapshots.
    log = [*snapshots(4), (MARKER, b""), *[(ABORTED, b"")] * 5, (MARKER, b"")]
    running = run(ScriptedConsumer(log))
    running.checked_until(running.consumer.caught_up, "caught up")
    assert running.consumer.lag() == 0
    assert running.store.counts() == (4, 0)
    # No snapshot for longer than the stall threshold: nothing is waiting, so still healthy.
    running.clock.advance((STALL_SECONDS + 1) * 1_000_000_000)
    queries = running.scripted.queries
    wait_for(lambda: running.scripted.queries > queries, timeout=10, message="a lag check")
    status = running.liveness.status()
    assert status.healthy, status
    assert running.consumer.caught_up()
    assert running.consumer.lag() == 0


def test_committed_records_not_read_yet_are_lag_an_open_transaction_is_not(run: Any) -> None:
    scripted = ScriptedConsumer([*snapshots(3), (MARKER, b""), (OPEN, b""), (OPEN, b"")])
    scripted.fetching.clear()
    running = run(scripted)
    running.checked_until(lambda: running.consumer.lag() == 4, "the unread records as lag")
    assert not running.consumer.caught_up()
    scripted.fetching.set()
    # The two records of the open transaction cannot be read yet: they are not lag.
    running.checked_until(running.consumer.caught_up, "caught up")
    assert running.consumer.lag() == 0
    assert running.store.counts() == (3, 0)


def test_an_empty_topic_is_caught_up(run: Any) -> None:
    running = run(ScriptedConsumer([]))
    running.checked_until(running.consumer.caught_up, "caught up")
    assert running.consumer.lag() == 0


def test_a_broker_timeout_neither_blocks_the_ui_nor_ends_the_consumer(run: Any) -> None:
    scripted = ScriptedConsumer(snapshots(2), failing_queries=3)
    running = run(scripted)
    assert scripted.in_query.wait(10), "the loop queries the broker"
    # The loop is inside a broker call that hangs: what every UI callback calls answers at once.
    answers: list[tuple[int, bool]] = []
    caller = threading.Thread(target=lambda: answers.append((running.consumer.lag(), running.consumer.caught_up())))
    caller.start()
    caller.join(2)
    assert not caller.is_alive(), "lag() waited for the broker"
    assert answers == [(0, False)]
    scripted.release.set()  # the hanging queries time out now
    running.checked_until(running.consumer.caught_up, "caught up once the broker answers")
    assert scripted.failing_queries == 0
    assert running.consumer.alive
    assert running.liveness.status().healthy
    assert running.store.counts() == (2, 0)
