"""Commit-after-write sink mode: the consumer loop of a service that writes its input somewhere else.

A :class:`SinkWriter` (the lake sink's Parquet writer) gets every consumed record through
:meth:`SinkWriter.write` and makes what it buffered durable in :meth:`SinkWriter.flush`; it
reports each offset below which everything is durable with :meth:`SinkRunner.commit_later`. The
:class:`SinkRunner` does the rest: the session (assignment, revoke, lag, backoff, liveness), dead
letters (at-least-once, delivered before the offsets they belong to are committed) and the
offset commits, which happen only after the writes they cover.

Errors: a record the writer cannot take is dead-lettered by the writer through
:meth:`SinkRunner.dead_letter` and the loop carries on; a :class:`~quotewatch.core.errors.RetriableError`
from :meth:`SinkWriter.write` sends every partition back to its first record not written and the
runner reads them again after a backoff; a :class:`~quotewatch.core.errors.FatalError` ends the
service (non-zero exit), committing nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, Unpack

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from quotewatch.core.errors import FatalError, RetriableError
from quotewatch.core.kafka import DeliveryTracker, encode_key, flush_or_fail, make_producer
from quotewatch.core.metrics import DEAD_LETTERS, RECORDS_OUT
from quotewatch.core.runtime.deadletter import Rejection, dead_letter
from quotewatch.core.runtime.session import ConsumerLoop, LoopArgs, TopicPartitionKey

logger = logging.getLogger(__name__)


class SinkWriter(Protocol):
    """The writing side of a sink. Who calls it: :class:`SinkRunner`, from its loop's thread."""

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """``partitions`` (with the group's committed offsets) are now the sink's: set each one's
        ``offset`` to where reading starts (e.g. after what the destination already holds)."""
        ...

    def write(self, message: Message) -> None:
        """Take one consumed record of an assigned partition (offset order per partition).

        Raises:
            RetriableError: not the record's fault; it is read again after a backoff.
            FatalError: the service cannot go on.
        """
        ...

    def flush(self, partitions: Sequence[TopicPartitionKey] | None) -> None:
        """Make buffered records durable: those of ``partitions`` (a revoke, shutdown), or, when None,
        whatever is due (size or age). Called once per loop turn with None."""
        ...

    def forget(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Drop everything buffered for ``partitions`` (revoked after :meth:`flush`, or lost)."""
        ...


class SinkRunner(ConsumerLoop):
    """Runs a :class:`SinkWriter` over input topics until shutdown, committing after the writes.

    Args:
        args: :class:`~quotewatch.core.runtime.session.LoopArgs`: settings, service, input topics,
            serde, clock, shutdown, liveness; optionally group, batch size (1000), poll timeout
            (0.1 s), consumer overrides, input probe.
    """

    BATCH_SIZE = 1000
    POLL_TIMEOUT = 0.1

    def __init__(self, **args: Unpack[LoopArgs]) -> None:
        super().__init__(**args)
        self._writer: SinkWriter | None = None
        self._producer: Producer | None = None
        self._delivery = DeliveryTracker()
        self._undelivered_dead_letters = 0
        self._to_commit: dict[TopicPartitionKey, int] = {}
        self._failed = False
        """The loop died: a revoke (from close()) must not write or commit anything more."""

    # -- for the writer ---------------------------------------------------------------------

    def commit_later(self, topic: str, partition: int, offset: int) -> None:
        """Everything of ``topic[partition]`` below ``offset`` is durable: commit it at the end of the turn."""
        self._to_commit[(topic, partition)] = offset

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``topic[partition]`` on from ``offset`` (e.g. past a range the destination holds)."""
        self.session.consumer.seek(TopicPartition(topic, partition, offset))

    def dead_letter(self, message: Message, error: BaseException, log_traceback: bool) -> None:
        """Send ``message`` to the dead-letter topic (at-least-once) and carry on."""
        assert self._producer is not None
        logger.warning(
            "dead-lettering a record: %s",
            error,
            exc_info=log_traceback,
            extra={"topic": message.topic(), "partition": message.partition(), "offset": message.offset()},
        )
        record = dead_letter(self._service, self._clock, Rejection.of_message(message), error)
        value = self._serde.encode(self._dlq_topic, record)
        while True:
            try:
                self._producer.produce(self._dlq_topic, value=value, key=encode_key(message.topic()))
                break
            except BufferError:
                self._producer.poll(0.1)  # the local queue is full: serve delivery reports (bounded wait)
        self._producer.poll(0)
        self._undelivered_dead_letters += 1
        RECORDS_OUT.labels(self._service, self._dlq_topic).inc()
        DEAD_LETTERS.labels(self._service, message.topic() or "", type(error).__name__).inc()

    def deliver_dead_letters(self) -> None:
        """Wait until every dead letter produced so far is acknowledged.

        The writer calls this before it makes a range durable that holds dead-lettered offsets
        (once written, a restarted sink may skip the range and never read those records again);
        the runner calls it before every commit. A crash in between only dead-letters them a
        second time (at-least-once).

        Raises:
            FatalError: a dead letter was not delivered (the range is then neither written nor
                committed, and is read again after the restart).
        """
        if self._undelivered_dead_letters and self._producer is not None:
            flush_or_fail(self._producer)
            self._delivery.raise_if_failed()
            self._undelivered_dead_letters = 0

    # -- lifecycle --------------------------------------------------------------------------

    def run(self, writer: SinkWriter) -> None:
        """Consume and write until shutdown; then flush every partition, commit and close.

        Raises:
            FatalError: the writer raised one, a dead letter was not delivered, or the broker
                returned a fatal error. The caller lets it end the process (non-zero exit).
        """
        self._writer = writer
        client_id = f"{self._service}-{self._settings.instance_id}"
        self._producer = make_producer(self._settings, client_id, on_delivery=self._delivery)
        consumer = self.session.open(self)
        reason = "shutdown requested"
        try:
            while not self._shutdown.requested:
                messages = consumer.consume(self._batch_size, self._poll_timeout)
                self.session.turned()
                for index, message in enumerate(messages):
                    try:
                        self._write(writer, message)
                    except RetriableError as exc:
                        self._retry_later(messages[index:], exc)
                        break
                else:
                    self.session.backoff.reset()
                writer.flush(None)
                self._commit()
                if messages:
                    self._liveness.progressed(len(messages))
                self.session.update_lag()
            writer.flush(sorted(self.session.assigned))
            self._commit()
        except BaseException as exc:
            self._failed = True
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._liveness.stopped(reason)
            self._close()

    def _write(self, writer: SinkWriter, message: Message) -> None:
        if self.session.consumer_error(message):
            return
        key = (message.topic() or "", message.partition() or 0)
        if key not in self.session.assigned:
            return  # not ours any more
        writer.write(message)
        self.session.positions[key] = (message.offset() or 0) + 1

    def _retry_later(self, unwritten: list[Message], error: RetriableError) -> None:
        """A transient failure (e.g. the schema registry is down), not the record's fault.

        The record is neither dead-lettered nor skipped: every partition goes back to its first
        record not written yet, and the runner reads them again after a pause (doubling, jitter).
        What the writer buffered stays buffered.
        """
        firsts: dict[TopicPartitionKey, int] = {}
        for message in unwritten:
            key = (message.topic() or "", message.partition() or 0)
            if message.error() is None and key in self.session.assigned:
                firsts.setdefault(key, message.offset() or 0)
        for (topic, partition), offset in firsts.items():
            self.seek(topic, partition, offset)
        self.session.pause_before_retry(error, partitions=len(firsts))

    def _close(self) -> None:
        if self._producer is not None:
            try:
                # Dead letters still queued belong to records already read: deliver them before leaving.
                flush_or_fail(self._producer, 30)
            except FatalError:
                logger.exception("dead letters were not flushed on shutdown")
        self.session.close()

    # -- rebalance --------------------------------------------------------------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Rebalance hook: the writer sets where each partition starts."""
        assert self._writer is not None
        self._writer.assigned(partitions)

    def revoked(self, partitions: list[TopicPartitionKey], lost: bool) -> None:
        """Rebalance hook: flush and commit what is buffered (unless lost or failed), then forget it."""
        assert self._writer is not None
        try:
            if not lost and not self._failed:
                # A rebalance (or the close() of a clean shutdown): hand over what is buffered.
                self._writer.flush(partitions)
                self._commit()
        except KafkaException as exc:
            # What was written is durable; whoever gets the partition finds it and skips over it.
            logger.warning("could not commit on revoke", extra={"error": str(exc)})
        # Lost partitions already belong to someone else: writing now could race the new owner.
        self._writer.forget(partitions)
        for key in partitions:
            self._to_commit.pop(key, None)

    # -- commits ----------------------------------------------------------------------------

    def _commit(self) -> None:
        if not self._to_commit or self._producer is None:
            return
        # Dead letters of the committed ranges are delivered before their offsets are committed.
        self.deliver_dead_letters()
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in self._to_commit.items()]
        try:
            # Commit after write: every record below these offsets is durable at its destination
            # already (the writer said so), and a crash before this line is repaired by the writer.
            self.session.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal():
                raise FatalError(f"offset commit failed: {error}") from exc
            # The writes are durable: a later commit (or the next owner of the partition) covers them.
            logger.warning("offset commit failed; retrying with the next one", extra={"error": str(error)})
            return
        self._liveness.progressed(
            0, {f"{topic}[{partition}]": offset for (topic, partition), offset in self._to_commit.items()}
        )
        self._to_commit.clear()
