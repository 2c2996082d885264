"""The background reader of ``<prefix>.snapshot`` that feeds a :class:`SnapshotStore`.

The snapshot topic is compacted (key = symbol), so reading it from the beginning rebuilds the
latest state of every symbol. Every dashboard process reads the whole topic on its own: manual
assignment of every partition at the beginning, a throw-away group id, and **no commits** (no
group membership, no offsets stored: nothing to rebalance, and a restart always starts over,
which is what a compacted "latest state" topic is for). It reads only committed records
(``read_committed``), since inference writes snapshots inside transactions.

A record that does not decode is logged with its coordinates and counted, never dead-lettered:
every dashboard process re-reads the topic from the start, so each would write the same dead
letter again at every start; the producer of the record (inference) owns it.

Lag is the consumer's position against the partition's **last stable offset**: what a
``read_committed`` reader can still get. The position moves past transaction markers and aborted
records, which are never delivered, so a topic that ends in a commit marker or in a transaction
inference aborted (killed mid-transaction) reads as caught up; records of a transaction still
open are not lag either. The dashboard only reads: it never creates a topic, and waits for its
topic to appear (a TOPIC_PREFIX nobody writes to shows the empty state, it creates nothing).
"""

from __future__ import annotations

import logging
import threading
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from quotewatch.core.clock import Clock
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import SerdeError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import make_consumer, poll_batch
from quotewatch.core.metrics import CONSUMER_LAG, RECORDS_IN
from quotewatch.core.records import Snapshot
from quotewatch.core.serde import AvroSerde
from quotewatch.services.dashboard.store import SnapshotStore

logger = logging.getLogger(__name__)

SERVICE = "dashboard"
BATCH_SIZE = 500
POLL_SECONDS = 0.05
LAG_CHECK_NS = 500_000_000
LAG_QUERY_SECONDS = 2.0
"""Timeout of one partition's last-stable-offset query; a failed check is retried at the next one."""
ASSIGN_RETRY_SECONDS = 1.0


class SnapshotConsumer:
    """Reads the snapshot topic on a daemon thread until :meth:`stop`.

    Liveness semantics (:mod:`quotewatch.core.health`): the loop beats on every poll, reports
    progress with its positions after every batch, and sets its lag (last stable offset minus
    position, see the module docstring) twice a second, so ``/health`` turns unhealthy when the
    loop is stuck, when snapshots wait but are not read, or when the thread has died.

    Thread safety: :meth:`lag` and :meth:`caught_up` are called by every UI callback; they read
    what the loop's last check stored, under a lock that is never held across a call to the broker.
    """

    def __init__(
        self,
        settings: CommonSettings,
        topic: str,
        store: SnapshotStore,
        serde: AvroSerde,
        clock: Clock,
        liveness: Liveness,
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._store = store
        self._serde = serde
        self._clock = clock
        self._liveness = liveness
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Guarded by _lock (written by the loop, read by UI callbacks):
        self._positions: dict[int, int] = {}  # next offset after the last record delivered
        self._lag: dict[int, int] = {}  # per partition, at the last successful check
        self._caught_up = False
        # The loop's own:
        self._partitions: list[int] = []
        self._thread = threading.Thread(target=self._run, name=f"snapshot-consumer-{topic}", daemon=True)
        self._last_lag_check_ns: int | None = None
        self._warned_missing = False
        self._lag_check_failures = 0

    @property
    def topic(self) -> str:
        return self._topic

    def start(self) -> SnapshotConsumer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to finish and wait for it to close the consumer."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def lag(self) -> int:
        """Committed records of the topic not read yet, at the last check (0 before the first)."""
        with self._lock:
            return sum(self._lag.values())

    def caught_up(self) -> bool:
        """True once the last check found the position at the last stable offset of every partition.

        False until the topic exists and was checked once. Markers and aborted transactions count
        as read (the position moves past them), so a topic ending in either is caught up.
        """
        with self._lock:
            return self._caught_up

    # -- the loop (consumer thread) ---------------------------------------------------------------

    def _run(self) -> None:
        reason = "stopped"
        consumer: Consumer | None = None
        try:
            consumer = make_consumer(
                self._settings,
                # A group id is required by the client; it is never joined nor committed to.
                group_id=f"quotewatch-dashboard-{uuid.uuid4().hex[:12]}",
                client_id=f"{SERVICE}-{self._settings.instance_id}",
            )
            while not self._stop.is_set() and not self._assign(consumer):
                self._liveness.beat()
                self._stop.wait(ASSIGN_RETRY_SECONDS)
            while not self._stop.is_set():
                messages = poll_batch(consumer, BATCH_SIZE, POLL_SECONDS)
                self._liveness.beat()
                if messages:
                    self._handle(messages)
                self._check_lag(consumer)
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.exception("snapshot consumer died", extra={"topic": self._topic})
            raise
        finally:
            self._liveness.stopped(reason)
            if consumer is not None:
                consumer.close()

    def _assign(self, consumer: Consumer) -> bool:
        try:
            metadata = consumer.list_topics(self._topic, timeout=5)
        except KafkaException as exc:
            logger.warning("cannot reach the broker; retrying", extra={"topic": self._topic, "error": str(exc)})
            return False
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            if not self._warned_missing:
                logger.warning("snapshot topic does not exist yet; retrying every second", extra={"topic": self._topic})
                self._warned_missing = True
            return False
        partitions = sorted(topic.partitions)
        # Manual assignment from the beginning: no group membership, no committed offsets.
        consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
        self._partitions = partitions
        self._last_lag_check_ns = None  # check at once: caught_up() stays False until then
        logger.info("reading the snapshot topic from the beginning", extra={"topic": self._topic})
        return True

    def _handle(self, messages: list[Message]) -> None:
        read = 0
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    logger.warning("consumer error", extra={"topic": self._topic, "error": str(error)})
                continue
            partition, offset = message.partition() or 0, message.offset() or 0
            read += 1
            try:
                record = self._serde.decode_as(message.value() or b"", self._topic, Snapshot)
            except SerdeError as exc:
                logger.error(
                    "snapshot record does not decode; skipped",
                    extra={"topic": self._topic, "partition": partition, "offset": offset, "error": str(exc)},
                )
                self._store.reject()
            else:
                _, timestamp_ms = message.timestamp()
                self._store.update(record, timestamp_ms * 1_000_000 if timestamp_ms and timestamp_ms > 0 else None)
            with self._lock:
                self._positions[partition] = offset + 1
        if read:
            RECORDS_IN.labels(SERVICE, self._topic).inc(read)
            with self._lock:
                positions = {f"{self._topic}[{p}]": position for p, position in self._positions.items()}
            self._liveness.progressed(read, positions)

    def _check_lag(self, consumer: Consumer) -> None:
        """Every LAG_CHECK_NS: the position of every partition against its last stable offset.

        One query per partition to the broker (read_committed: ``get_watermark_offsets`` answers
        the last stable offset), made without holding the lock. A failed query (the broker
        restarting, a timeout) keeps the last check's values and is retried at the next check;
        the loop carries on polling either way.
        """
        now = self._clock.monotonic_ns()
        if self._last_lag_check_ns is not None and now - self._last_lag_check_ns < LAG_CHECK_NS:
            return
        self._last_lag_check_ns = now
        if not self._partitions:
            return
        lags: dict[int, int] = {}
        try:
            # The position moves past markers and aborted records (never delivered); negative
            # (OFFSET_INVALID) until the partition's first fetch.
            positions = {
                tp.partition: tp.offset
                for tp in consumer.position([TopicPartition(self._topic, p) for p in self._partitions])
            }
            for partition in self._partitions:
                low, stable = consumer.get_watermark_offsets(
                    TopicPartition(self._topic, partition), timeout=LAG_QUERY_SECONDS, cached=False
                )
                position = positions.get(partition, -1)
                lags[partition] = max(0, stable - (position if position >= 0 else low))
        except KafkaException as exc:
            self._lag_check_failures += 1
            log = logger.warning if self._lag_check_failures == 1 else logger.debug
            log("cannot check the lag; retrying at the next check", extra={"topic": self._topic, "error": str(exc)})
            return
        if self._lag_check_failures:
            logger.info("lag check answered again", extra={"topic": self._topic, "failed": self._lag_check_failures})
            self._lag_check_failures = 0
        with self._lock:
            self._lag = lags
            self._caught_up = all(lag == 0 for lag in lags.values())
        for partition, lag in lags.items():
            CONSUMER_LAG.labels(SERVICE, self._topic, str(partition)).set(lag)
        self._liveness.set_lag(sum(lags.values()))
