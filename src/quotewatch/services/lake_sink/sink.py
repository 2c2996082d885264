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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

import numpy as np
import pyarrow as pa
from confluent_kafka import KafkaException, Message, TopicPartition

from quotewatch.core.clock import Clock
from quotewatch.core.config import LakeSinkSettings
from quotewatch.core.errors import FatalError, SerdeError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, query_watermarks
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
    LAKE_BYTES_WRITTEN,
    LAKE_FILES_WRITTEN,
    LAKE_ROWS_WRITTEN,
    PROCESSING_SECONDS,
    RECORDS_IN,
)
from quotewatch.core.runtime.session import LoopOptions, TopicPartitionKey
from quotewatch.core.runtime.sink import SinkRunner
from quotewatch.core.serde import AvroSerde
from quotewatch.core.service import ServiceContext

logger = logging.getLogger(__name__)

SERVICE = "lake-sink"
CONVERT_ROWS = 4096
"""Decoded rows are turned into an Arrow record batch every this many rows (bounds Python objects)."""
WRITE_ATTEMPTS = 5


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
    """The lake's :class:`~quotewatch.core.runtime.sink.SinkWriter`: Kafka partitions -> chunks of files.

    Who builds it: ``quotewatch run lake-sink`` (:func:`from_context`). It runs in a
    :class:`~quotewatch.core.runtime.sink.SinkRunner` (consumer, rebalances, dead letters, lag,
    liveness, offset commits after the files are durable); this class keeps the file protocol.

    Args:
        publish: how a file is made visible (default :func:`quotewatch.core.lake.publish_file`).
        options: the runner's :class:`~quotewatch.core.runtime.session.LoopOptions` (group, batch
            size, poll timeout, consumer overrides, input probe).
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
        publish: Publisher = publish_file,
        **options: Unpack[LoopOptions],
    ) -> None:
        self._settings = settings
        self._serde = serde
        self._clock = clock
        self._shutdown = shutdown
        self._lake = lake_location(lake if lake is not None else settings.lake_uri)
        self._service = service
        self._topics = [spec.name(settings.topic_prefix) for spec in LAKE_TOPICS]
        self._publish = publish
        self._flush_ns = int(settings.lake_flush_seconds * 1e9)
        self._schemas = {topic: file_schema_for(topic) for topic in self._topics}
        self._columns = {topic: partition_column(topic) for topic in self._topics}
        self._records_in = {topic: RECORDS_IN.labels(service, topic) for topic in self._topics}
        self._consumed: dict[str, int] = dict.fromkeys(self._topics, 0)
        """Records consumed per topic since the counters were last updated (once per turn)."""
        self._buffers: dict[TopicPartitionKey, _Buffer] = {}
        self._runner = SinkRunner(
            settings=settings,
            service=service,
            input_topics=self._topics,
            serde=serde,
            clock=clock,
            shutdown=shutdown,
            liveness=liveness,
            **options,
        )

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
        logger.info("lake sink writing", extra={"lake": self._lake.describe(), "topics": self._topics})
        self._runner.run(self)

    # -- assignment and recovery -------------------------------------------------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """SinkWriter hook: a buffer per partition, starting at the committed offset (or after the
        lake's last chunk when the group has none)."""
        for tp in partitions:
            key = (tp.topic, tp.partition)
            buffer = _Buffer(tp.topic, tp.partition, self._schemas[tp.topic], first_offset=0)
            if tp.offset >= 0:
                buffer.first_offset = tp.offset
            else:
                self._resume_from_lake(buffer)
            tp.offset = buffer.first_offset
            self._buffers[key] = buffer
            logger.info(
                "partition assigned",
                extra={"topic": tp.topic, "partition": tp.partition, "from_offset": buffer.first_offset},
            )

    def _resume_from_lake(self, buffer: _Buffer) -> None:
        """No committed offset: continue after the last chunk the lake holds, else from the log start."""
        chunk = last_chunk(self._lake, buffer.topic, buffer.partition)
        if chunk is None:
            buffer.first_offset = max(self._low_watermark(buffer), 0)
            return
        if missing_files(self._lake, chunk):
            buffer.first_offset = chunk.first_offset
            buffer.forced_last = chunk.last_offset
            buffer.verify = False
        else:
            buffer.first_offset = chunk.last_offset + 1
            # The lake holds everything before it: commit that, or the group shows lag forever.
            self._runner.commit_later(buffer.topic, buffer.partition, buffer.first_offset)
        logger.warning(
            "no committed offset: resuming after the lake's last chunk",
            extra={"topic": buffer.topic, "partition": buffer.partition, "from_offset": buffer.first_offset},
        )

    def forget(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """SinkWriter hook: the partitions are gone (revoked after :meth:`flush`, or lost)."""
        for key in partitions:
            self._buffers.pop(key, None)

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
        next_offset = chunk.last_offset + 1
        buffer.restart(next_offset)
        buffer.verify = True
        self._runner.seek(buffer.topic, buffer.partition, next_offset)
        self._runner.commit_later(buffer.topic, buffer.partition, next_offset)

    # -- per record --------------------------------------------------------------------------

    def write(self, message: Message) -> None:
        """SinkWriter hook: buffer one record as a row of its partition's open chunk (or dead-letter it)."""
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
            self._runner.dead_letter(message, exc, log_traceback=False)
            buffer.last_offset = offset
            self._cut_if_forced(buffer, offset)
            return
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError) as exc:
            self._runner.dead_letter(message, exc, log_traceback=True)
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
        if offset == buffer.first_offset:
            return
        low = self._low_watermark(buffer)
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
        try:
            low, _ = self._runner.session.consumer.get_watermark_offsets(
                TopicPartition(buffer.topic, buffer.partition), cached=True
            )
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

    def _low_watermark(self, buffer: _Buffer) -> int:
        """The partition's log start offset, retrying transient broker errors (e.g. a leader election)."""
        partition = TopicPartition(buffer.topic, buffer.partition)
        try:
            low, _ = query_watermarks(self._runner.session.consumer, partition, timeout=60, wait=self._shutdown.wait)
        except KafkaException as exc:
            raise FatalError(f"cannot read the log start of {buffer.topic}[{buffer.partition}]: {exc}") from exc
        return low

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
                    self._runner.dead_letter(message, exc, log_traceback=True)
                    buffer.rows -= 1
        buffer.pending_rows = []
        buffer.pending_directories = []
        buffer.pending_messages = []

    # -- cutting chunks ----------------------------------------------------------------------

    def flush(self, partitions: Sequence[TopicPartitionKey] | None) -> None:
        """SinkWriter hook: once a turn (None), cut the buffers whose oldest row is LAKE_FLUSH_SECONDS
        old; on revoke and shutdown, cut those of ``partitions``."""
        if partitions is None:
            self._count_consumed()
            self._cut_aged()
        else:
            self._cut_all(partitions)

    def _count_consumed(self) -> None:
        for topic, count in self._consumed.items():
            if count:
                self._records_in[topic].inc(count)
                self._consumed[topic] = 0

    def _cut_aged(self) -> None:
        now = self._clock.monotonic_ns()
        for buffer in list(self._buffers.values()):
            if buffer.rows and buffer.forced_last is None and now - buffer.started_ns >= self._flush_ns:
                self._cut(buffer)

    def _cut_all(self, keys: Sequence[TopicPartitionKey]) -> None:
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
        self._runner.deliver_dead_letters()
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
        self._runner.commit_later(topic, buffer.partition, buffer.last_offset + 1)
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
