"""The lake sink: the data topics -> Parquet files under LAKE_URI, every offset exactly once.

**What it does.** One consumer (group ``<prefix>.lake-sink``, read_committed) reads
``md.raw``, ``md.events``, ``book.top3``, ``features``, ``labels`` and ``predictions``. Each
Kafka partition has its own buffer: records are decoded (a record that does not decode goes to
``qw.dlq`` with its coordinates and the sink carries on), turned into Arrow rows and filed under
their hive directory. A buffer is cut into a **chunk** ``[first, last]`` when it reaches
LAKE_FLUSH_BYTES of record bytes, when its oldest row is LAKE_FLUSH_SECONDS old, on SIGTERM and
when the partition is revoked; the chunk becomes one file per hive directory (see
:mod:`quotewatch.core.lake` for the layout and the file names), and only then is ``last + 1``
committed.

**Nothing lost, nothing twice.** ``first`` of a chunk is always the partition's committed offset
(the position the sink started reading it from), so chunk ranges tile the offsets. A crash can
leave the files of a chunk that was never committed: all of them, or (a crash mid-chunk) some.
After a restart the sink reads again from the committed offset ``C``; before it buffers its
first row it looks for a chunk starting at ``C`` in that row's hive directory (the file holding
a chunk's first row is always written first, so if any file of the chunk exists, that one does):

- none: nothing of the range is in the lake; the sink cuts freely.
- complete: the lake already holds ``[C, last]``; the sink skips to ``last + 1`` and commits it.
- incomplete: the sink re-reads the same range and cuts exactly at that chunk's ``last`` whatever
  the size or age, writing the same files under the same names (the rows are the same records
  in the same order: a read_committed log does not change below the last stable offset).

So files never overlap, and no range is committed before its files are durable. Dead letters are
at-least-once: they are acknowledged before the files of the chunk whose range holds their offsets
are written (a restarted sink skips a complete chunk's range and would never read them again), and
a record dead-lettered after the last commit is dead-lettered again after a crash.
Only if the consumer group has no committed offset does the sink list the whole dataset, to
resume after the last chunk the lake holds (or from the log start when it holds none).

Size cuts are deterministic (a function of the records from ``C``); age cuts depend on the wall
clock and are what the recovery above makes safe. A buffer whose records were all dead-lettered
is never cut on its own: its offsets go into the next chunk's range.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from quotewatch.core.clock import Clock
from quotewatch.core.config import LakeSinkSettings
from quotewatch.core.errors import FatalError, RetriableError, SerdeError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import (
    DeliveryTracker,
    ShutdownSignal,
    TransientBackoff,
    dead_letter_for_message,
    encode_key,
    flush_or_fail,
    make_consumer,
    make_producer,
    query_watermarks,
)
from quotewatch.core.lake import (
    LAKE_TOPICS,
    ChunkRecord,
    LakeError,
    LakeLocation,
    LakeRecordError,
    LakeRow,
    Publisher,
    WrittenFile,
    file_schema_for,
    find_chunk,
    lake_location,
    lake_row,
    last_chunk,
    missing_files,
    partition_column,
    publish_file,
    record_dir,
    write_chunk,
)
from quotewatch.core.metrics import (
    CONSUMER_LAG,
    DEAD_LETTERS,
    LAKE_BYTES_WRITTEN,
    LAKE_FILES_WRITTEN,
    LAKE_ROWS_WRITTEN,
    PROCESSING_SECONDS,
    RECORDS_IN,
    RECORDS_OUT,
)
from quotewatch.core.serde import AvroSerde
from quotewatch.core.service import ServiceContext
from quotewatch.core.topics import TopicNames

logger = logging.getLogger(__name__)

SERVICE = "lake-sink"
_UNASSIGNED_WARN_SECONDS = 10.0
"""How long the sink may hold no partition before it says so (a rebalance takes a few seconds)."""
CONVERT_ROWS = 4096
"""Decoded rows are turned into an Arrow record batch every this many rows (bounds Python objects)."""
WRITE_ATTEMPTS = 5

TopicPartitionKey = tuple[str, int]


@dataclass
class _Buffer:
    """The open chunk of one Kafka partition."""

    topic: str
    partition: int
    schema: pa.Schema
    first_offset: int
    """The chunk's first offset: the committed offset (the previous chunk's last + 1)."""
    last_offset: int = -1
    """The last offset consumed into this chunk (a row or a dead letter); -1 when none yet."""
    rows: int = 0
    bytes: int = 0
    started_ns: int = 0
    first_directory: str | None = None
    batches: list[pa.RecordBatch] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    """Hive directory of each converted row, in row order."""
    pending_rows: list[LakeRow] = field(default_factory=list)
    pending_directories: list[str] = field(default_factory=list)
    pending_messages: list[Message] = field(default_factory=list)
    verify: bool = True
    """Look for a chunk a crashed predecessor wrote from ``first_offset`` before buffering a row."""
    forced_last: int | None = None
    """Cut exactly here: an incomplete chunk ``[first_offset, forced_last]`` is being rewritten."""
    check_retention: bool = True

    def restart(self, first_offset: int) -> None:
        """Start the next chunk at ``first_offset`` with an empty buffer."""
        self.first_offset = first_offset
        self.last_offset = -1
        self.rows = 0
        self.bytes = 0
        self.started_ns = 0
        self.first_directory = None
        self.batches = []
        self.directories = []
        self.pending_rows = []
        self.pending_directories = []
        self.pending_messages = []
        self.forced_last = None


class LakeSink:
    """Runs the sink loop until shutdown. Who builds it: ``quotewatch run lake-sink`` (:func:`from_context`).

    Args:
        publish: how a file is made visible (default :func:`quotewatch.core.lake.publish_file`).
    """

    def __init__(
        self,
        *,
        settings: LakeSinkSettings,
        serde: AvroSerde,
        clock: Clock,
        shutdown: ShutdownSignal,
        liveness: Liveness,
        lake: str | LakeLocation | None = None,
        service: str = SERVICE,
        group_id: str | None = None,
        publish: Publisher = publish_file,
        batch_size: int = 1000,
        poll_timeout: float = 0.1,
        consumer_overrides: Mapping[str, Any] | None = None,  # not a topic record: librdkafka config
    ) -> None:
        self._settings = settings
        self._serde = serde
        self._clock = clock
        self._shutdown = shutdown
        self._liveness = liveness
        self._lake = lake_location(lake if lake is not None else settings.lake_uri)
        self._service = service
        names = TopicNames(settings.topic_prefix)
        self._topics = [spec.name(settings.topic_prefix) for spec in LAKE_TOPICS]
        self._dlq_topic = names.dlq
        self._group_id = group_id or f"{settings.topic_prefix}.{service}"
        self._publish = publish
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._consumer_overrides = dict(consumer_overrides or {})
        self._flush_ns = int(settings.lake_flush_seconds * 1e9)
        self._schemas = {topic: file_schema_for(topic) for topic in self._topics}
        self._columns = {topic: partition_column(topic) for topic in self._topics}
        self._records_in = {topic: RECORDS_IN.labels(service, topic) for topic in self._topics}
        self._consumed: dict[str, int] = dict.fromkeys(self._topics, 0)
        """Records consumed per topic since the counters were last updated (once per batch)."""
        self._buffers: dict[TopicPartitionKey, _Buffer] = {}
        self._to_commit: dict[TopicPartitionKey, int] = {}
        self._positions: dict[TopicPartitionKey, int] = {}
        self._delivery = DeliveryTracker()
        self._undelivered_dead_letters = 0
        self._backoff = TransientBackoff()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._last_lag_check_ns = 0
        self._unassigned_warned = False
        self._failed = False
        """The loop died: a revoke (from close()) must not write or commit anything more."""

    @classmethod
    def from_context(cls, context: ServiceContext, **options: Any) -> LakeSink:
        """The sink of a service process (settings, serde, clock, signals and health from ``context``)."""
        settings = context.settings
        if not isinstance(settings, LakeSinkSettings):
            raise TypeError("the lake sink needs LakeSinkSettings")
        return cls(
            settings=settings,
            serde=context.serde,
            clock=context.clock,
            shutdown=context.shutdown,
            liveness=context.liveness,
            service=context.service,
            **options,
        )

    @property
    def lake(self) -> LakeLocation:
        return self._lake

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Consume and write until shutdown; then cut every buffer, commit and close.

        Raises:
            FatalError: the lake could not be written after retries, a dead letter was not
                delivered, or the broker returned a fatal error.
        """
        client_id = f"{self._service}-{self._settings.instance_id}"
        self._consumer = make_consumer(self._settings, self._group_id, client_id, **self._consumer_overrides)
        self._producer = make_producer(self._settings, client_id, on_delivery=self._delivery)
        self._consumer.subscribe(
            self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        logger.info("lake sink writing", extra={"lake": self._lake.describe(), "topics": self._topics})
        reason = "shutdown requested"
        try:
            while not self._shutdown.requested:
                messages = self._consumer.consume(self._batch_size, self._poll_timeout)
                self._turned()
                for index, message in enumerate(messages):
                    try:
                        self._handle(message)
                    except RetriableError as exc:
                        self._retry_later(messages[index:], exc)
                        break
                else:
                    self._backoff.reset()
                self._cut_aged()
                self._commit()
                if messages:
                    self._liveness.progressed(len(messages))
                    self._count_consumed()
                self._update_lag()
            self._cut_all(list(self._buffers))
            self._commit()
        except BaseException as exc:
            self._failed = True
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._liveness.stopped(reason)
            self._close()

    def _retry_later(self, unhandled: list[Message], error: RetriableError) -> None:
        """A transient failure (e.g. the schema registry is down), not the record's fault.

        The record is neither dead-lettered nor skipped: every partition goes back to its first
        record not handled yet, and the sink reads them again after a pause (doubling, jitter).
        What is buffered stays buffered.
        """
        assert self._consumer is not None
        firsts: dict[TopicPartitionKey, int] = {}
        for message in unhandled:
            key = (message.topic() or "", message.partition() or 0)
            if message.error() is None and key in self._buffers:
                firsts.setdefault(key, message.offset() or 0)
        pause = self._backoff.next_pause()
        logger.warning(
            "transient failure; reading the records again after a pause: %s",
            error,
            extra={"partitions": len(firsts), "pause_s": pause},
        )
        for (topic, partition), offset in firsts.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))
        self._backoff.wait(self._shutdown)
        self._liveness.beat()  # waiting out a dependency is not a stuck loop

    def _turned(self) -> None:
        """One turn of the loop, for the stuck watchdog: it counts only while the sink holds partitions.

        Once, after a broker restart, a sink's consumer lost its partitions (session timeout) and
        never rejoined its group: its loop kept turning for 4 minutes with nothing assigned and the
        lake fell behind silently. A turn without partitions is therefore not a sign of life, so the
        watchdog restarts such a sink after STUCK_EXIT_SECONDS (a new consumer joins afresh). The
        cost: an instance left without any partition (more sinks than partitions) restarts too.
        """
        if self._buffers:
            self._liveness.beat()
            self._unassigned_warned = False
        elif not self._unassigned_warned and self._liveness.stuck_seconds() >= _UNASSIGNED_WARN_SECONDS:
            self._unassigned_warned = True
            logger.warning(
                "no partition assigned for %.0f s (normal while the group rebalances, e.g. after a broker restart); "
                "the stuck watchdog restarts the service if none is assigned within STUCK_EXIT_SECONDS",
                self._liveness.stuck_seconds(),
            )

    def _count_consumed(self) -> None:
        for topic, count in self._consumed.items():
            if count:
                self._records_in[topic].inc(count)
                self._consumed[topic] = 0

    def _close(self) -> None:
        if self._producer is not None:
            try:
                # Dead letters still queued belong to records already read: deliver them before leaving.
                flush_or_fail(self._producer, 30)
            except FatalError:
                logger.exception("dead letters were not flushed on shutdown")
        if self._consumer is not None:
            # close() leaves the group so the partitions are reassigned promptly.
            self._consumer.close()

    # -- assignment and recovery -------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, timeout=30)
        for tp in committed:
            key = (tp.topic, tp.partition)
            buffer = _Buffer(tp.topic, tp.partition, self._schemas[tp.topic], first_offset=0)
            if tp.offset >= 0:
                buffer.first_offset = tp.offset
            else:
                self._resume_from_lake(consumer, buffer)
            tp.offset = buffer.first_offset
            self._buffers[key] = buffer
            logger.info(
                "partition assigned",
                extra={"topic": tp.topic, "partition": tp.partition, "from_offset": buffer.first_offset},
            )
        consumer.assign(committed)

    def _resume_from_lake(self, consumer: Consumer, buffer: _Buffer) -> None:
        """No committed offset: continue after the last chunk the lake holds, else from the log start."""
        chunk = last_chunk(self._lake, buffer.topic, buffer.partition)
        if chunk is None:
            buffer.first_offset = max(self._low_watermark(consumer, buffer), 0)
            return
        if missing_files(self._lake, chunk):
            buffer.first_offset = chunk.first_offset
            buffer.forced_last = chunk.last_offset
            buffer.verify = False
        else:
            buffer.first_offset = chunk.last_offset + 1
            # The lake holds everything before it: commit that, or the group shows lag forever.
            self._to_commit[(buffer.topic, buffer.partition)] = buffer.first_offset
        logger.warning(
            "no committed offset: resuming after the lake's last chunk",
            extra={"topic": buffer.topic, "partition": buffer.partition, "from_offset": buffer.first_offset},
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            if not self._failed:
                # A rebalance (or the close() of a clean shutdown): hand over what is buffered as files.
                self._cut_all(keys)
                self._commit()
        except KafkaException as exc:
            # The files are durable; whoever gets the partition finds them and skips over them.
            logger.warning("could not commit on revoke", extra={"error": str(exc)})
        self._forget(keys)
        consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The partitions already belong to someone else: writing now could race the new owner.
        self._forget([(tp.topic, tp.partition) for tp in partitions])
        consumer.unassign()

    def _forget(self, keys: list[TopicPartitionKey]) -> None:
        for key in keys:
            self._buffers.pop(key, None)
            self._to_commit.pop(key, None)
            self._positions.pop(key, None)

    def _verify(self, buffer: _Buffer, directory: str) -> bool:
        """Before the first row of a chunk: was ``[first_offset, …]`` written before a crash?

        Returns True when a complete chunk was found and skipped (the row is in the lake already).
        """
        buffer.verify = False
        chunk = find_chunk(self._lake, buffer.topic, buffer.partition, buffer.first_offset, directory)
        if chunk is None:
            return False
        missing = missing_files(self._lake, chunk)
        coordinates = {
            "topic": buffer.topic,
            "partition": buffer.partition,
            "first_offset": chunk.first_offset,
            "last_offset": chunk.last_offset,
        }
        if missing:
            logger.warning("rewriting a chunk a crash left incomplete", extra={**coordinates, "missing": missing})
            buffer.forced_last = chunk.last_offset
            return False
        logger.warning("skipping a chunk written before a crash but not committed", extra=coordinates)
        self._adopt(buffer, chunk)
        return True

    def _adopt(self, buffer: _Buffer, chunk: ChunkRecord) -> None:
        assert self._consumer is not None
        next_offset = chunk.last_offset + 1
        buffer.restart(next_offset)
        buffer.verify = True
        self._consumer.seek(TopicPartition(buffer.topic, buffer.partition, next_offset))
        self._to_commit[(buffer.topic, buffer.partition)] = next_offset

    # -- per record --------------------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal():
                raise FatalError(f"consumer error: {error}")
            logger.warning("consumer error", extra={"error": str(error)})
            return
        topic, partition, offset = message.topic() or "", message.partition() or 0, message.offset() or 0
        key = (topic, partition)
        buffer = self._buffers.get(key)
        if buffer is None:
            return  # not ours any more
        if buffer.check_retention:
            buffer.check_retention = False
            self._check_start(buffer, offset)
        if offset < buffer.first_offset or offset <= buffer.last_offset:
            return  # before a position we skipped to (fetched before the seek)
        if buffer.forced_last is not None and offset > buffer.forced_last:
            buffer.last_offset = buffer.forced_last
            self._cut(buffer)
        expected = buffer.last_offset + 1 if buffer.last_offset >= 0 else buffer.first_offset
        if offset > expected and buffer.forced_last is None:
            self._check_gap(buffer, expected, offset)
        self._consumed[topic] += 1
        self._positions[key] = offset + 1
        value = message.value() or b""
        try:
            key_bytes = message.key()
            row = lake_row(
                self._serde.decode(value, topic),
                topic,
                partition,
                offset,
                key_bytes.decode("utf-8") if key_bytes is not None else None,
                message.timestamp()[1],
            )
            directory = record_dir(self._columns[topic], row)
            if buffer.rows == 0:
                # The first row of a chunk is converted on its own, so that the directory written
                # first (and looked up after a crash) is certainly the one of a row that is written.
                pa.RecordBatch.from_pylist([row], schema=buffer.schema)
        except (SerdeError, LakeRecordError, UnicodeDecodeError) as exc:
            self._dead_letter(message, exc, log_traceback=False)
            buffer.last_offset = offset
            self._cut_if_forced(buffer, offset)
            return
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError) as exc:
            self._dead_letter(message, exc, log_traceback=True)
            buffer.last_offset = offset
            self._cut_if_forced(buffer, offset)
            return
        if buffer.rows == 0 and buffer.verify and self._verify(buffer, directory):
            return
        if buffer.rows == 0:
            buffer.started_ns = self._clock.monotonic_ns()
            buffer.first_directory = directory
        buffer.pending_rows.append(row)
        buffer.pending_directories.append(directory)
        buffer.pending_messages.append(message)
        buffer.rows += 1
        buffer.bytes += len(value)
        buffer.last_offset = offset
        if len(buffer.pending_rows) >= CONVERT_ROWS:
            self._convert(buffer)
        if buffer.forced_last is not None:
            self._cut_if_forced(buffer, offset)
        elif buffer.bytes >= self._settings.lake_flush_bytes:
            self._cut(buffer)

    def _cut_if_forced(self, buffer: _Buffer, offset: int) -> None:
        if buffer.forced_last is not None and offset >= buffer.forced_last:
            self._cut(buffer)

    def _check_start(self, buffer: _Buffer, offset: int) -> None:
        """The first record after assignment: is the log where the committed offset (or the lake) says?

        Raises:
            FatalError: the log restarted below the start position (the topic was deleted and
                created again): its offsets would collide with files already in the lake.
        """
        if offset < buffer.first_offset:
            raise FatalError(
                f"{buffer.topic}[{buffer.partition}] delivered offset {offset} below the start position "
                f"{buffer.first_offset} (committed offset or the lake's last chunk): was the topic re-created? "
                "Move its dataset out of the lake or use a new TOPIC_PREFIX"
            )
        if offset == buffer.first_offset or self._consumer is None:
            return
        low = self._low_watermark(self._consumer, buffer)
        if low > buffer.first_offset:
            logger.error(
                "records were deleted by retention before the lake sink read them",
                extra={
                    "topic": buffer.topic,
                    "partition": buffer.partition,
                    "lost_from": buffer.first_offset,
                    "lost_to": low - 1,
                },
            )
            # The chunk starts at the log start, so `lake info` shows the lost range as a hole.
            buffer.first_offset = low

    def _check_gap(self, buffer: _Buffer, expected: int, offset: int) -> None:
        """Offsets skipped while the partition is assigned: normal, unless retention deleted them.

        Transaction markers and aborted records are never delivered (read_committed), so a gap
        is usually nothing. But a sink that lags by more than the retention finds its position
        deleted, and the consumer jumps to the log start (``auto.offset.reset``) in the middle of a
        chunk: that chunk's name would then claim offsets it never held, and ``lake info`` would
        show no hole. The log start the last fetch reported (cached, no request) tells the two apart.
        """
        assert self._consumer is not None
        try:
            low, _ = self._consumer.get_watermark_offsets(TopicPartition(buffer.topic, buffer.partition), cached=True)
        except KafkaException:
            return
        if low <= expected:
            return  # the skipped offsets still exist: commit markers or aborted records
        low = min(low, offset)
        logger.error(
            "records were deleted by retention before the lake sink read them",
            extra={"topic": buffer.topic, "partition": buffer.partition, "lost_from": expected, "lost_to": low - 1},
        )
        # End the chunk before the loss and start the next one at the log start, so the lost range
        # is a hole between two chunks. A chunk a crashed predecessor began there is looked for first.
        if buffer.rows:
            self._cut(buffer)
        buffer.restart(low)
        buffer.verify = True

    def _low_watermark(self, consumer: Consumer, buffer: _Buffer) -> int:
        """The partition's log start offset, retrying transient broker errors (e.g. a leader election)."""
        partition = TopicPartition(buffer.topic, buffer.partition)
        try:
            low, _ = query_watermarks(consumer, partition, timeout=60, wait=self._shutdown.wait)
        except KafkaException as exc:
            raise FatalError(f"cannot read the log start of {buffer.topic}[{buffer.partition}]: {exc}") from exc
        return low

    def _dead_letter(self, message: Message, error: BaseException, log_traceback: bool) -> None:
        assert self._producer is not None
        logger.warning(
            "dead-lettering a record: %s",
            error,
            exc_info=log_traceback,
            extra={"topic": message.topic(), "partition": message.partition(), "offset": message.offset()},
        )
        record = dead_letter_for_message(self._service, self._clock, message, error)
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

    def _convert(self, buffer: _Buffer) -> None:
        """Turn the pending rows into a record batch; a row Arrow rejects is dead-lettered alone."""
        if not buffer.pending_rows:
            return
        try:
            buffer.batches.append(pa.RecordBatch.from_pylist(buffer.pending_rows, schema=buffer.schema))
            buffer.directories.extend(buffer.pending_directories)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError):
            for row, directory, message in zip(
                buffer.pending_rows, buffer.pending_directories, buffer.pending_messages, strict=True
            ):
                try:
                    buffer.batches.append(pa.RecordBatch.from_pylist([row], schema=buffer.schema))
                    buffer.directories.append(directory)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError) as exc:
                    self._dead_letter(message, exc, log_traceback=True)
                    buffer.rows -= 1
        buffer.pending_rows = []
        buffer.pending_directories = []
        buffer.pending_messages = []

    # -- cutting chunks ----------------------------------------------------------------------

    def _cut_aged(self) -> None:
        now = self._clock.monotonic_ns()
        for buffer in list(self._buffers.values()):
            if buffer.rows and buffer.forced_last is None and now - buffer.started_ns >= self._flush_ns:
                self._cut(buffer)

    def _cut_all(self, keys: list[TopicPartitionKey]) -> None:
        """Shutdown or revoke: cut every buffer that holds rows (an incomplete rewrite is left for later)."""
        for key in keys:
            buffer = self._buffers.get(key)
            if buffer is None or not buffer.rows:
                continue
            if buffer.forced_last is not None:
                # Cutting before forced_last would give a second name to part of that range.
                logger.info(
                    "leaving an incomplete chunk to be rewritten after the restart",
                    extra={"topic": buffer.topic, "partition": buffer.partition, "first_offset": buffer.first_offset},
                )
                continue
            self._cut(buffer)

    def _cut(self, buffer: _Buffer) -> None:
        """Write ``[first_offset, last_offset]`` as a chunk and schedule the commit of ``last_offset + 1``."""
        self._convert(buffer)
        if buffer.rows == 0:
            buffer.forced_last = None
            return
        started = time.perf_counter()
        table = pa.Table.from_batches(buffer.batches, schema=buffer.schema)
        groups = _group_rows(table, buffer.directories, buffer.first_directory)
        self._deliver_dead_letters()
        files = self._write(buffer, groups)
        topic = buffer.topic
        LAKE_ROWS_WRITTEN.labels(self._service, topic).inc(table.num_rows)
        LAKE_FILES_WRITTEN.labels(self._service, topic).inc(len(files))
        LAKE_BYTES_WRITTEN.labels(self._service, topic).inc(sum(f.bytes for f in files))
        PROCESSING_SECONDS.labels(self._service).observe(time.perf_counter() - started)
        logger.debug(
            "chunk written",
            extra={
                "topic": topic,
                "partition": buffer.partition,
                "first_offset": buffer.first_offset,
                "last_offset": buffer.last_offset,
                "rows": table.num_rows,
                "files": len(files),
            },
        )
        self._to_commit[(topic, buffer.partition)] = buffer.last_offset + 1
        buffer.restart(buffer.last_offset + 1)

    def _write(self, buffer: _Buffer, groups: list[tuple[str, pa.Table]]) -> list[WrittenFile]:
        """Write a chunk, retrying I/O failures with jittered backoff (rewriting is idempotent)."""
        delay = 0.5
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return write_chunk(
                    self._lake,
                    buffer.topic,
                    buffer.partition,
                    buffer.first_offset,
                    buffer.last_offset,
                    groups,
                    publish=self._publish,
                )
            except (OSError, LakeError) as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise FatalError(
                        f"cannot write {buffer.topic}[{buffer.partition}] {buffer.first_offset}..{buffer.last_offset} "
                        f"to the lake at {self._lake.describe()}: {exc}"
                    ) from exc
                logger.warning("lake write failed; retrying", extra={"attempt": attempt, "error": str(exc)})
                self._shutdown.wait(random.uniform(0, delay))  # noqa: S311 - jitter, not security
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def _deliver_dead_letters(self) -> None:
        """Wait until every dead letter produced so far is acknowledged.

        Called before a chunk's files are written: a chunk's range includes the offsets it
        dead-lettered, and once its files exist a restarted sink skips the whole range (it adopts
        the chunk) and never reads those records again. So the dead letters must be durable first;
        a crash in between only dead-letters them a second time (at-least-once).

        Raises:
            FatalError: a dead letter was not delivered (the range is then neither written nor
                committed, and is read again after the restart).
        """
        if self._undelivered_dead_letters and self._producer is not None:
            flush_or_fail(self._producer)
            self._delivery.raise_if_failed()
            self._undelivered_dead_letters = 0

    def _commit(self) -> None:
        if not self._to_commit or self._consumer is None or self._producer is None:
            return
        # Dead letters of the committed ranges are delivered before their offsets are committed.
        self._deliver_dead_letters()
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in self._to_commit.items()]
        try:
            # Exactly-once files: every chunk below these offsets is fsynced and renamed (or uploaded)
            # already, and a crash before this line is repaired from the files on restart.
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal():
                raise FatalError(f"offset commit failed: {error}") from exc
            # The files are durable: a later commit (or the next owner of the partition) covers them.
            logger.warning("offset commit failed; retrying with the next one", extra={"error": str(error)})
            return
        self._liveness.progressed(
            0, {f"{topic}[{partition}]": offset for (topic, partition), offset in self._to_commit.items()}
        )
        self._to_commit.clear()

    def _update_lag(self) -> None:
        now = self._clock.monotonic_ns()
        if now - self._last_lag_check_ns < 1_000_000_000 or self._consumer is None:
            return
        self._last_lag_check_ns = now
        total = 0
        for topic, partition in list(self._buffers):
            try:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            position = self._positions.get((topic, partition))
            if high < 0 or position is None:
                continue
            # A transactional topic ends with a commit marker that is never delivered: one offset
            # past the position is "caught up".
            lag = max(0, high - position - 1)
            CONSUMER_LAG.labels(self._service, topic, str(partition)).set(lag)
            total += lag
        self._liveness.set_lag(total)


def _group_rows(table: pa.Table, directories: list[str], first: str | None) -> list[tuple[str, pa.Table]]:
    """Split a chunk's rows by hive directory (row order kept); the first row's directory comes first."""
    encoded = pa.array(directories, pa.string()).dictionary_encode()
    codes = encoded.indices.to_numpy()
    names = encoded.dictionary.to_pylist()
    order = sorted(range(len(names)), key=lambda i: (names[i] != first, names[i]))
    groups = []
    for code in order:
        rows = np.flatnonzero(codes == code)
        groups.append((names[code], table.take(pa.array(rows))))
    return groups
