"""The consume-transform-produce loop every stream service runs.

A service supplies a :class:`StreamTask` (pure processing: input record in, output records out)
and the :class:`StreamProcessor` does the rest: decoding, dead letters, offsets, transactions,
recovery of the task's state after a restart, graceful shutdown, lag and liveness.

**Exactly-once** (``exactly_once=True``, the default): each consumed batch is one Kafka
transaction holding its outputs, its dead letters and its input offsets, so a crash at any point
neither duplicates nor loses an output for read_committed readers.

**State recovery.** A task's in-memory state (an order book, a label window) is lost in a crash,
but it is a pure function of the input. With every commit the processor stores, in the offset
metadata, the task's :meth:`StreamTask.restart_offset`: the earliest input offset from which
re-processing rebuilds the current state. After a restart or rebalance it seeks there and
re-processes up to the committed offset with outputs discarded (``InRecord.replaying``), then
carries on live. Outputs are therefore identical to an uninterrupted run.

**Replicas.** Instances of a service with distinct INSTANCE_IDs (so distinct transactional ids)
share its consumer group and split the input partitions (librdkafka's range assignor, eager
rebalancing: a rebalance revokes every partition, and each partition assigned rebuilds its state
from the restart offset stored with its last commit, whichever member made it). A member that died
mid-transaction leaves that transaction's offsets pending until the coordinator aborts it
(``transaction.timeout.ms``); the member taking its partitions over waits for them instead of
reading an offset that is about to change (:meth:`~quotewatch.core.runtime.session.ConsumerSession.committed`). Test:
``tests/e2e/services/test_replicas.py`` (two replicas of each stream service, one SIGKILLed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Unpack, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from quotewatch.core.bounded import field_int, parse_json_object
from quotewatch.core.errors import FatalError, RetriableError, SerdeError, UntrustedInputError
from quotewatch.core.kafka import (
    DeliveryTracker,
    encode_key,
    flush_or_fail,
    make_producer,
    poll_batch,
    query_watermarks,
)
from quotewatch.core.metrics import DEAD_LETTERS, PROCESSING_SECONDS, RECORDS_IN, RECORDS_OUT, TRANSACTIONS
from quotewatch.core.runtime.deadletter import Rejection, dead_letter
from quotewatch.core.runtime.session import ConsumerLoop, LoopArgs, TopicPartitionKey
from quotewatch.core.runtime.task import InRecord, StreamTask, V

logger = logging.getLogger(__name__)


class StreamProcessor(ConsumerLoop, Generic[V]):
    """Runs a :class:`StreamTask` over input topics until shutdown is requested.

    Args:
        exactly_once: one transaction per batch (outputs + dead letters + offsets). When False,
            outputs are flushed before offsets are committed: at-least-once.
        transactional_id: default ``<prefix>.<service>.<instance_id>``, stable across restarts so
            a restarted instance fences its zombie predecessor.
        args: :class:`~quotewatch.core.runtime.session.LoopArgs`: settings, service, input topics,
            serde, clock, shutdown, liveness; optionally group, batch size (500), poll timeout
            (0.05 s), consumer overrides, input probe.
    """

    def __init__(
        self,
        *,
        task: StreamTask[V],
        exactly_once: bool = True,
        transactional_id: str | None = None,
        producer_overrides: Mapping[str, Any] | None = None,  # not a topic record: librdkafka config
        **args: Unpack[LoopArgs],
    ) -> None:
        super().__init__(**args)
        settings = args["settings"]
        self._task = task
        self._exactly_once = exactly_once
        self._transactional_id = transactional_id or f"{settings.topic_prefix}.{self._service}.{settings.instance_id}"
        self._producer_overrides = dict(producer_overrides or {})
        self._producer: Producer | None = None
        self._delivery = DeliveryTracker()
        self._replay_until: dict[TopicPartitionKey, int] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Consume, process and produce until shutdown; then finish the batch, commit and close.

        Raises:
            FatalError: the task raised one, the producer was fenced or the broker returned a
                non-retriable error. The caller lets it end the process (non-zero exit).
        """
        client_id = f"{self._service}-{self._settings.instance_id}"
        if self._exactly_once:
            self._producer = make_producer(
                self._settings, client_id, self._transactional_id, **self._producer_overrides
            )
            self._producer.init_transactions(60)
        else:
            self._producer = make_producer(
                self._settings, client_id, on_delivery=self._delivery, **self._producer_overrides
            )
        consumer = self.session.open(self)
        reason = "shutdown requested"
        try:
            while not self._shutdown.requested:
                messages = poll_batch(consumer, self._batch_size, self._poll_timeout)
                self.session.turned()
                if messages:
                    self._process_batch(messages)
                self.session.update_lag()
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._liveness.stopped(reason)
            self._close()

    def _close(self) -> None:
        if self._producer is not None:
            try:
                # Whatever is still queued belongs to a committed transaction (or, at-least-once,
                # to a batch whose offsets are not yet committed): deliver it before leaving.
                flush_or_fail(self._producer, 30)
            except FatalError:
                logger.exception("producer did not flush on shutdown", extra={"service": self._service})
        self.session.close()

    # -- rebalance and recovery ------------------------------------------------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Rebalance hook: reset the task's state and start each partition at its restart offset."""
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._task.reset(*key)
            self._replay_until.pop(key, None)
            restart = restart_offset_from_metadata(tp.metadata, f"{tp.topic}[{tp.partition}]")
            if tp.offset >= 0 and restart is not None and 0 <= restart < tp.offset:
                self._replay_until[key] = tp.offset
                logger.info(
                    "rebuilding state from already-committed input",
                    extra={"topic": tp.topic, "partition": tp.partition, "from": restart, "until": tp.offset},
                )
                tp.offset = restart

    def revoked(self, partitions: list[TopicPartitionKey], lost: bool) -> None:
        """Rebalance hook: forget the state of the partitions taken away (the open batch, if any,
        is aborted or left uncommitted by the caller)."""
        for key in partitions:
            self._task.reset(*key)
            self._replay_until.pop(key, None)

    def _rewind(self) -> None:
        """After an aborted transaction: drop the task's state and resume from the last commit."""
        consumer = self.session.consumer
        partitions = [TopicPartition(topic, partition) for topic, partition in sorted(self.session.assigned)]
        if not partitions:
            return
        committed = self.session.committed(partitions)
        if committed is None:
            return  # shutting down: nothing more is processed
        for tp in committed:
            key = (tp.topic, tp.partition)
            self._task.reset(*key)
            self._replay_until.pop(key, None)
            restart = restart_offset_from_metadata(tp.metadata, f"{tp.topic}[{tp.partition}]")
            offset = tp.offset
            if offset >= 0 and restart is not None and 0 <= restart < offset:
                self._replay_until[key] = offset
                offset = restart
            if offset < 0:
                low, _ = query_watermarks(consumer, TopicPartition(tp.topic, tp.partition), timeout=30)
                offset = low
            consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    # -- processing -------------------------------------------------------------------------

    def _process_batch(self, messages: list[Message]) -> None:
        assert self._producer is not None
        consumer = self.session.consumer
        started = time.perf_counter()
        if self._exactly_once:
            # Exactly-once: everything produced from here to commit_transaction() (outputs, dead
            # letters, input offsets) becomes visible atomically, or not at all.
            self._producer.begin_transaction()
        next_offsets: dict[TopicPartitionKey, int] = {}
        processed = 0
        for message in messages:
            if self.session.consumer_error(message):
                continue
            topic, partition, offset = message.topic() or "", message.partition() or 0, message.offset() or 0
            key = (topic, partition)
            replaying = offset < self._replay_until.get(key, -1)
            RECORDS_IN.labels(self._service, topic).inc()
            try:
                self._handle(message, topic, partition, offset, replaying)
            except RetriableError as exc:
                self._retry_batch_later(exc, topic, partition, offset)
                return
            next_offsets[key] = offset + 1
            processed += 1
            if key in self._replay_until and offset + 1 >= self._replay_until[key]:
                del self._replay_until[key]
                logger.info("state rebuilt; processing live", extra={"topic": topic, "partition": partition})
        # A partition still rebuilding its state (its records so far all below the offset committed
        # before, so nothing was produced for them) keeps its commit as it is: committing the replayed
        # position would move the group's offset back, and a successor would then take the records
        # between the two for live ones and produce their outputs a second time.
        offsets = [
            TopicPartition(topic, partition, offset, metadata=self._metadata(topic, partition))
            for (topic, partition), offset in next_offsets.items()
            if (topic, partition) not in self._replay_until
        ]
        if offsets and self._exactly_once:
            self._commit_transaction(offsets)
        elif offsets:
            # At-least-once: offsets are committed only after every output of the batch is delivered.
            flush_or_fail(self._producer)
            self._delivery.raise_if_failed()
            consumer.commit(offsets=offsets, asynchronous=False)
        elif self._exactly_once:
            # Nothing was produced (only errors, or only records rebuilding state): nothing to commit.
            self._producer.abort_transaction()
        if not next_offsets:
            return
        self.session.backoff.reset()
        self.session.positions.update(next_offsets)
        self._liveness.progressed(
            processed,
            {f"{topic}[{partition}]": offset for (topic, partition), offset in next_offsets.items()},
        )
        PROCESSING_SECONDS.labels(self._service).observe(time.perf_counter() - started)

    def _retry_batch_later(self, error: RetriableError, topic: str, partition: int, offset: int) -> None:
        """A transient failure (not the record's fault): drop the batch, back off, read it again.

        Exactly-once: the open transaction is aborted, so nothing of the batch becomes visible.
        At-least-once: outputs already sent stay, and are sent again with the retry. Either way the
        consumer goes back to the last commit (and the task's state with it), and nothing is
        dead-lettered or skipped.
        """
        assert self._producer is not None
        if self._exactly_once:
            self._producer.abort_transaction(60)
            TRANSACTIONS.labels(self._service, "aborted").inc()
        self._rewind()
        self.session.pause_before_retry(error, topic=topic, partition=partition, offset=offset)

    def _handle(self, message: Message, topic: str, partition: int, offset: int, replaying: bool) -> None:
        assert self._producer is not None
        try:
            raw = message.value() or b""
            # The serde gives the class of the topic's value schema: the task's V for its input topics.
            value = cast(V, self._serde.decode(raw, topic))
            key_bytes = message.key()
            record = InRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                key=key_bytes.decode("utf-8", "replace") if key_bytes is not None else None,
                value=value,
                timestamp_ms=message.timestamp()[1],
                raw=raw,
                replaying=replaying,
            )
            outputs = [
                (out.topic, encode_key(out.key), self._serde.encode(out.topic, out.value))
                for out in self._task.process(record)
            ]
        except (RetriableError, FatalError):
            # Not the record's fault: a RetriableError (e.g. the schema registry is down) retries
            # the batch; a FatalError ends the service (its open transaction is never committed).
            raise
        except SerdeError as exc:
            self._dead_letter(message, exc, replaying, log_traceback=False)
            return
        except Exception as exc:  # noqa: BLE001 - a service never dies on one bad record
            self._dead_letter(message, exc, replaying, log_traceback=True)
            return
        if replaying:
            return
        for out_topic, out_key, out_value in outputs:
            self._produce(out_topic, out_key, out_value)

    def _dead_letter(self, message: Message, error: Exception, replaying: bool, log_traceback: bool) -> None:
        coordinates = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
        if replaying:
            logger.debug("skipping a dead letter already written", extra=coordinates)
            return
        logger.warning(
            "dead-lettering a record: %s",
            error,
            exc_info=log_traceback,
            extra={**coordinates, "service": self._service},
        )
        record = dead_letter(self._service, self._clock, Rejection.of_message(message), error)
        self._produce(self._dlq_topic, encode_key(message.topic()), self._serde.encode(self._dlq_topic, record))
        DEAD_LETTERS.labels(self._service, message.topic() or "", type(error).__name__).inc()

    def _produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room (bounded wait;
                # waiting for the broker is not a stuck loop, so the loop still beats).
                self._producer.poll(0.1)
                self._liveness.beat()
        self._producer.poll(0)
        RECORDS_OUT.labels(self._service, topic).inc()

    def _commit_transaction(self, offsets: list[TopicPartition]) -> None:
        assert self._producer is not None
        producer, consumer = self._producer, self.session.consumer
        try:
            # The input offsets join the open transaction: committed with the outputs or not at all.
            self._with_retries(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 60),
            )
            # Exactly-once: outputs, dead letters and input offsets become visible together.
            self._with_retries("commit_transaction", lambda: producer.commit_transaction(60))
            TRANSACTIONS.labels(self._service, "committed").inc()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.txn_requires_abort():
                logger.warning("transaction aborted; rewinding to the last commit", extra={"error": str(error)})
                self._producer.abort_transaction(60)
                TRANSACTIONS.labels(self._service, "aborted").inc()
                self._rewind()
                return
            raise FatalError(f"transaction failed: {error}") from exc

    def _with_retries(self, what: str, call: Callable[[], None], attempts: int = 5) -> None:
        """Run a transaction call; repeat it on a retriable error, up to ``attempts`` times.

        A retriable error (e.g. a timeout while the coordinator is away) leaves the transaction
        open and the call may be repeated (librdkafka's contract); any other error is raised.
        """
        for attempt in range(attempts):
            try:
                call()
                return
            except KafkaException as exc:
                if not exc.args[0].retriable() or attempt == attempts - 1:
                    raise
                logger.warning("retrying %s", what, extra={"error": str(exc.args[0])})
                self._liveness.beat()  # waiting for the broker is not a stuck loop

    def _metadata(self, topic: str, partition: int) -> str:
        return json.dumps({"restart": self._task.restart_offset(topic, partition)})


OFFSET_METADATA_MAX_BYTES = 4096
"""Offset metadata longer than this is not parsed (ours, ``{"restart": N}``, is under 40 bytes)."""


def restart_offset_from_metadata(metadata: str | None, where: str = "") -> int | None:
    """The ``restart`` offset stored in a committed offset's metadata, or None.

    The metadata is not trusted (anyone who may commit offsets for the group writes it): it is
    parsed bounded, and metadata that is not ours -- too long, too deep, not JSON, ``restart`` not
    an offset -- is logged and ignored, so the partition resumes at the committed offset without
    rebuilding state (as after a commit without metadata). Never raises.
    """
    if not metadata:
        return None
    what = f"offset metadata of {where}" if where else "offset metadata"
    try:
        payload = parse_json_object(metadata, what=what, max_bytes=OFFSET_METADATA_MAX_BYTES, max_depth=2)
        if payload.get("restart") is None:
            return None
        return field_int(payload, "restart", what=what)
    except UntrustedInputError as exc:
        logger.warning("ignoring offset metadata that is not ours: %s", exc)
        return None
