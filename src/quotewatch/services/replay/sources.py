"""Where replays and backtests read a past window: a topic namespace, the lake, a capture, the synthetic market.

**The window** is ``[--from, --to)`` on ``ts_init``, the receive time of the raw frames (the
ingest's clock; for a capture, its sidecar). ``ts_init`` is what grows in log order in
``md.raw`` (one partition, appended as received) and in each ``md.events`` partition (events
carry the ``ts_init`` of the frame they came from), and it is what the Kafka record timestamps
approximate (the producer's create time, a few ms after receipt), so a window is found with
``offsets_for_times`` and a binary search on the decoded ``ts_init`` instead of a scan. A
backtest reports the ticks ``t`` (event time) inside the window.

**Raw windows start at a CONNECTED record** at or before ``--from``. The normaliser's state (which
symbols are synced, the last sequence number, the subscriptions) is built up over a connection,
and a CONNECTED record resets it, so re-normalising from there gives exactly the events the live
ingest wrote; starting in the middle of a connection would start without the book snapshots
(no features until the next resubscription) and with a sequence check that does not know the last
number. The records between that CONNECTED and ``--from`` are read too (the warm-up: the
snapshot and everything the book and feature windows need). An events window starts at the first
event made from that CONNECTED record (``ts_init`` >= its ``ts_init``), in every partition.

A replay reads up to ``--to``. A backtest reads further (:meth:`Window.extended`): the label of a
tick just before ``--to`` is known only Δ later.

A source yields :class:`LogRecord` items (decoded value, plus the original bytes when they come
from Kafka, so a topic-to-topic replay forwards them unchanged) in log order.
"""

from __future__ import annotations

import heapq
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import ConfigError, QuoteWatchError
from quotewatch.core.kafka import make_admin, make_consumer, poll_batch, query_watermarks
from quotewatch.core.records import MarketEvent, RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = 1_000_000
TIMESTAMP_SLACK_MS = 60_000
"""How much later than ``ts_init`` a record's Kafka timestamp may be (ingest queueing); bounds the search."""
LAKE_LOOKBACK_NS = 3_600 * 10**9
"""First look-back of the lake's CONNECTED search (doubled until found)."""
LAKE_MAX_LOOKBACK_NS = 90 * 24 * 3_600 * 10**9
LAKE_MARGIN_NS = 5 * 60 * 10**9
"""Control records are filed by their exchange-time estimate: read this much around the window."""
_LAKE_DROP_COLUMNS = frozenset({"_topic", "_partition", "_offset", "_key", "_timestamp_ms", "date", "hour"})

LogValue = RawFrame | MarketEvent
"""What a replay source yields: the raw log, or the market events made from it."""
LogValueT = TypeVar("LogValueT", RawFrame, MarketEvent)


class ReplayError(QuoteWatchError):
    """A window cannot be read as asked (no CONNECTED record before it, empty log, bad source)."""


_SECONDS_FRACTION = re.compile(r"^(?P<head>[^T ]+[T ][\d:]+)[.,](?P<fraction>\d+)(?P<zone>.*)$")
"""Date, time to the second | the fraction of the second | the zone, if any."""


def parse_time(text: str) -> int:
    """ISO 8601 (``2018-04-13T21:00:00Z``, ``2018-04-13 21:00:00.5+02:00``; no zone = UTC) -> ns since the epoch.

    Exact to the nanosecond (``ts_*`` fields are integer ns): the fraction of the second is read
    here, as ``datetime`` keeps microseconds only; digits past the ninth are dropped.

    Raises:
        ConfigError: not an ISO 8601 date-time.
    """
    stripped = text.strip()
    fraction_ns = 0
    split = _SECONDS_FRACTION.match(stripped)
    if split is not None:
        stripped = split["head"] + split["zone"]
        fraction_ns = int(split["fraction"][:9].ljust(9, "0"))
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not an ISO 8601 date-time (e.g. 2018-04-13T21:00:00Z)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1_000 + fraction_ns


def format_time(ts_ns: int) -> str:
    """ns since the epoch -> ISO 8601 UTC: whole seconds, microseconds or nanoseconds, as exact as needed."""
    seconds, fraction_ns = divmod(ts_ns, 1_000_000_000)
    text = (_EPOCH + timedelta(seconds=seconds)).isoformat().replace("+00:00", "")
    if fraction_ns % 1_000:
        text += f".{fraction_ns:09d}"
    elif fraction_ns:
        text += f".{fraction_ns // 1_000:06d}"
    return text + "Z"


@dataclass(frozen=True, slots=True)
class Window:
    """``[start_ns, end_ns)`` on ``ts_init``; None = unbounded."""

    start_ns: int | None = None
    end_ns: int | None = None

    def __post_init__(self) -> None:
        if self.start_ns is not None and self.end_ns is not None and self.end_ns <= self.start_ns:
            raise ConfigError(f"--to ({format_time(self.end_ns)}) must be after --from ({format_time(self.start_ns)})")

    def before_end(self, ts_ns: int) -> bool:
        return self.end_ns is None or ts_ns < self.end_ns

    def contains(self, ts_ns: int) -> bool:
        return (self.start_ns is None or ts_ns >= self.start_ns) and self.before_end(ts_ns)

    def extended(self, past_end_ns: int) -> Window:
        """This window with its end ``past_end_ns`` later.

        A backtest's input: see :mod:`quotewatch.services.replay.engine`.
        """
        return self if self.end_ns is None else Window(self.start_ns, self.end_ns + past_end_ns)

    def describe(self) -> str:
        start = format_time(self.start_ns) if self.start_ns is not None else "the start"
        end = format_time(self.end_ns) if self.end_ns is not None else "the end"
        return f"[{start}, {end})"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record of a source, in log order."""

    value: LogValue
    key: bytes | None = None
    data: bytes | None = None
    """The original encoded value when read from Kafka (forwarded unchanged by a replay)."""
    partition: int = 0
    offset: int = -1


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed ``--source``: ``topic:PREFIX``, ``lake[:PREFIX]``, ``capture:FILE`` or ``synthetic:SEED:HOURS``."""

    kind: str
    prefix: str = ""
    path: Path | None = None
    seed: int = 0
    hours: float = 0.0

    def describe(self) -> str:
        if self.kind in ("topic", "lake"):
            return f"{self.kind}:{self.prefix}"
        if self.kind == "capture":
            return f"capture:{self.path.name if self.path is not None else ''}"
        return f"synthetic:{self.seed}:{self.hours:g}"


def parse_source(text: str, default_prefix: str) -> SourceSpec:
    """Parse ``--source`` (``topic`` and ``lake`` alone mean the TOPIC_PREFIX namespace).

    Raises:
        ConfigError: an unknown kind or a malformed argument.
    """
    kind, _, rest = text.partition(":")
    if kind in ("topic", "lake"):
        return SourceSpec(kind, prefix=rest or default_prefix)
    if kind == "capture":
        if not rest:
            raise ConfigError("--source capture:FILE needs a capture file (.jsonl or .jsonl.gz)")
        return SourceSpec(kind, path=Path(rest))
    if kind == "synthetic":
        seed, _, hours = rest.partition(":")
        try:
            parsed = SourceSpec(kind, seed=int(seed), hours=float(hours))
        except ValueError as exc:
            raise ConfigError(f"--source {text!r}: expected synthetic:SEED:HOURS, e.g. synthetic:7:24") from exc
        if parsed.hours <= 0:
            raise ConfigError(f"--source {text!r}: HOURS must be positive")
        return parsed
    raise ConfigError(f"--source {text!r}: expected topic:PREFIX, lake[:PREFIX], capture:FILE or synthetic:SEED:HOURS")


# -- Kafka -----------------------------------------------------------------------------------------


class TopicReader:
    """Random access to one topic by offset, for the window searches (no consumer group commits).

    Who uses it: :func:`topic_raw_records` and :func:`topic_event_records`, from one thread.
    """

    def __init__(
        self, settings: CommonSettings, topic: str, serde: AvroSerde, timeout: float = 30.0, poll_timeout: float = 1.0
    ) -> None:
        self.topic = topic
        self._serde = serde
        self._timeout = timeout
        self._poll_timeout = poll_timeout
        self._consumer: Consumer = make_consumer(
            settings,
            f"{settings.topic_prefix}.replay-reader-{uuid.uuid4().hex[:8]}",
            "replay-reader",
            **{"enable.partition.eof": True, "fetch.wait.max.ms": 50},
        )
        try:
            metadata = make_admin(settings).list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise ReplayError(f"cannot read the metadata of {topic}: {exc}") from exc
        if metadata is None or metadata.error is not None or not metadata.partitions:
            self._consumer.close()
            raise ReplayError(f"topic {topic} does not exist")
        self.partitions = sorted(metadata.partitions)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watermarks(self, partition: int) -> tuple[int, int]:
        return query_watermarks(self._consumer, TopicPartition(self.topic, partition), timeout=self._timeout)

    def offset_for_time(self, partition: int, timestamp_ms: int) -> int | None:
        """The first offset whose Kafka timestamp is >= ``timestamp_ms`` (None: no such record)."""
        found = self._consumer.offsets_for_times(
            [TopicPartition(self.topic, partition, max(0, timestamp_ms))], timeout=self._timeout
        )
        offset = found[0].offset
        return int(offset) if offset >= 0 else None

    def read_at(self, partition: int, offset: int, high: int) -> tuple[int, LogValue] | None:
        """The first record at or after ``offset`` (below ``high``), decoded, with its offset; None past the end."""
        for message in self._messages(partition, offset, high):
            return int(message.offset() or 0), self._decode(message)
        return None

    def _messages(self, partition: int, start: int, high: int, batch: int = 1) -> Iterator[Message]:
        """Messages of ``partition`` from ``start`` until ``high`` or the end, fetched ``batch`` at a time."""
        for messages in self.batches(partition, start, high, batch):
            yield from messages

    def batches(self, partition: int, start: int, high: int, batch: int = 1_000) -> Iterator[list[Message]]:
        """The messages of ``partition`` in [start, high), as fetched: lists of up to ``batch``.

        Stops after offset ``high - 1`` without asking for more, or at the partition's end.

        Raises:
            ReplayError: a consumer error, or no record for ``timeout`` seconds.
        """
        if start >= high:
            return
        self._consumer.assign([TopicPartition(self.topic, partition, start)])
        idle = 0
        while True:
            # As fetched, not consume(batch, poll_timeout): that returns only when `batch` messages
            # arrived, so the short last batch of every range waited out the whole poll timeout.
            messages = poll_batch(self._consumer, batch, self._poll_timeout)
            if not messages:
                idle += 1
                if idle * self._poll_timeout > self._timeout:
                    raise ReplayError(f"{self.topic}[{partition}]: no record arrived from offset {start} in time")
                continue
            idle = 0
            for index, message in enumerate(messages):
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise ReplayError(f"{self.topic}[{partition}]: consumer error: {error}")
                if error is not None or (message.offset() or 0) >= high:
                    if index:
                        yield messages[:index]
                    return
            yield messages
            if (messages[-1].offset() or 0) >= high - 1:
                return

    def _decode(self, message: Message) -> LogValue:
        try:
            value = self._serde.decode(message.value() or b"", self.topic)
        except QuoteWatchError as exc:
            raise ReplayError(f"{self.topic}[{message.partition()}]@{message.offset()}: {exc}") from exc
        if not isinstance(value, RawFrame | MarketEvent):
            raise ReplayError(f"{self.topic} holds {type(value).__name__} records, not raw frames or market events")
        return value

    def first_offset_where(self, partition: int, low: int, high: int, predicate: Callable[[LogValue], bool]) -> int:
        """The smallest offset in [low, high) whose record satisfies ``predicate`` (monotone: false..., true...).

        A binary search reading one record per probe; ``high`` when no record does.
        """
        while low < high:
            middle = (low + high) // 2
            found = self.read_at(partition, middle, high)
            if found is None:
                high = middle
                continue
            offset, value = found
            if predicate(value):
                high = middle
            else:
                low = offset + 1
        return low

    def records(self, partition: int, start: int, end: int) -> Iterator[LogRecord]:
        """Every record of [start, end), decoded, with its key and original bytes."""
        for message in self._messages(partition, start, end, batch=1000):
            yield LogRecord(self._decode(message), message.key(), message.value(), partition, message.offset() or 0)

    def first_offset_at_or_after(self, partition: int, ts_init_ns: int, inclusive: bool = True) -> int:
        """The first offset with ``ts_init >= ts_init_ns`` (``>`` when not ``inclusive``); the high watermark if none.

        ``offsets_for_times`` bounds the search from below: a record with a Kafka timestamp before
        ``ts_init_ns - TIMESTAMP_SLACK_MS`` was received before ``ts_init_ns``.
        """
        low, high = self.watermarks(partition)
        hint = self.offset_for_time(partition, ts_init_ns // _MS - TIMESTAMP_SLACK_MS)
        low = max(low, hint if hint is not None else high)
        if inclusive:
            return self.first_offset_where(partition, low, high, lambda v: v.ts_init >= ts_init_ns)
        return self.first_offset_where(partition, low, high, lambda v: v.ts_init > ts_init_ns)


@dataclass(frozen=True, slots=True)
class RawStart:
    """Where a raw window starts: the CONNECTED record at or before ``--from``."""

    offset: int
    ts_init: int
    connection_id: str


def find_raw_start(reader: TopicReader, start_ns: int | None) -> RawStart:
    """The CONNECTED record of the connection live at ``start_ns``: the latest one at or before it.

    Without ``start_ns`` (or with one before the retained log), the CONNECTED that starts the log.

    The ingest stamps every record from a CONNECTED up to the next CONNECTED with that
    connection's id (CLOCK ticks between connections included), so a binary search on the id of
    the last record at or before ``start_ns`` finds where its stretch begins. Stretches that do not
    open with a CONNECTED are stepped over, back to the stretch before: the DISCONNECTED of a
    failed connect attempt (it carries the attempt's own id), and, in logs written before the
    ingest stamped CLOCKs this way, the ticks of a reconnect handshake or a backoff, which carried
    the id of the connection being attempted. CLOCKs ahead of a CONNECTED with its id are
    skipped: its stretch starts at the CONNECTED.

    Raises:
        ReplayError: the log is empty, or the retained log has no CONNECTED record at or before
            ``start_ns`` (retention removed the connection's start).
    """
    low, high = reader.watermarks(0)
    if high <= low:
        raise ReplayError(f"{reader.topic} is empty")
    after = low if start_ns is None else reader.first_offset_at_or_after(0, start_ns, inclusive=False)
    if after <= low:
        # The log's own start: its first stretch (leading CLOCKs skipped) must be a connection's.
        found = _connected_of_stretch(reader, low, high)
        if found is not None:
            return found
        _no_connected(reader, low, high, start_ns)
    position = after - 1
    while position >= low:
        record = reader.read_at(0, position, high)
        if record is None:
            raise ReplayError(f"{reader.topic}: no record at or after offset {position}")
        offset, value = record
        connection = value.connection_id
        first = reader.first_offset_where(0, low, offset, _same_connection(connection))
        found = _connected_of_stretch(reader, first, offset + 1)
        if found is not None:
            return found
        position = first - 1
    _no_connected(reader, low, high, start_ns)


def _same_connection(connection: str) -> Callable[[LogValue], bool]:
    return lambda value: value.connection_id == connection


def values_of(records: Iterable[LogRecord], cls: type[LogValueT]) -> Iterator[LogValueT]:
    """The values of ``records``, each checked to be a ``cls`` (raw frames, or market events).

    Raises:
        ReplayError: a record of the other kind (a source holding what its topic should not).
    """
    return (value for _, value in typed_records(records, cls))


def typed_records(records: Iterable[LogRecord], cls: type[LogValueT]) -> Iterator[tuple[LogRecord, LogValueT]]:
    """Each of ``records`` with its value, checked to be a ``cls`` (:func:`values_of`, with the coordinates).

    Raises:
        ReplayError: a record of the other kind (a source holding what its topic should not).
    """
    for record in records:
        value = record.value
        if not isinstance(value, cls):
            raise ReplayError(
                f"expected {cls.__name__} records, got a {type(value).__name__} at offset {record.offset}"
            )
        yield record, value


def _connected_of_stretch(reader: TopicReader, first: int, end: int) -> RawStart | None:
    """The CONNECTED record that opens the stretch of one ``connection_id`` at ``first``, CLOCKs skipped.

    Looks at offsets [first, end) only; None when the first record there that is not one of the
    connection's CLOCKs is not its CONNECTED, or when there is no such record.
    """
    connection: str | None = None
    for record in reader.records(0, first, end):
        value = record.value
        if connection is None:
            connection = value.connection_id
        if value.connection_id != connection:
            return None
        if value.kind == "CONNECTED":
            return RawStart(record.offset, value.ts_init, connection)
        if value.kind != "CLOCK":
            return None
    return None


def _no_connected(reader: TopicReader, low: int, high: int, start_ns: int | None) -> NoReturn:
    found = reader.read_at(0, low, high)
    assert found is not None
    offset, value = found
    at = format_time(start_ns) if start_ns is not None else "the start of the log"
    raise ReplayError(
        f"{reader.topic}: no CONNECTED record at or before {at}; the retained log starts (offset {offset}, "
        f"{format_time(value.ts_init)}) with a {value.kind} of connection {value.connection_id!r}, "
        "not CONNECTED: the normaliser cannot start clean there (retention removed the connection's start?). "
        "Choose --from at or after the next CONNECTED."
    )


def topic_raw_records(
    settings: CommonSettings, prefix: str, window: Window, serde: AvroSerde
) -> tuple[RawStart, int, Iterator[LogRecord]]:
    """``<prefix>.md.raw`` from the CONNECTED at or before the window to its end: (start, record count, records)."""
    reader, start, end = _raw_range(settings, prefix, window, serde)

    def iterate() -> Iterator[LogRecord]:
        with reader:
            yield from reader.records(0, start.offset, end)

    return start, max(0, end - start.offset), iterate()


def topic_raw_batches(
    settings: CommonSettings, prefix: str, window: Window, serde: AvroSerde
) -> tuple[RawStart, int, Iterator[list[Message]]]:
    """The records of :func:`topic_raw_records` as the consumer fetched them: lists of undecoded messages.

    What a replay at ``--speed max`` forwards: no Python object per record on top of the
    consumer's own.
    """
    reader, start, end = _raw_range(settings, prefix, window, serde)

    def iterate() -> Iterator[list[Message]]:
        with reader:
            yield from reader.batches(0, start.offset, end)

    return start, max(0, end - start.offset), iterate()


def _raw_range(
    settings: CommonSettings, prefix: str, window: Window, serde: AvroSerde
) -> tuple[TopicReader, RawStart, int]:
    """A reader of ``<prefix>.md.raw``, the CONNECTED the window starts at and the end offset (exclusive)."""
    reader = TopicReader(settings, TopicNames(prefix).md_raw, serde)
    try:
        start = find_raw_start(reader, window.start_ns)
        _, high = reader.watermarks(0)
        end = high if window.end_ns is None else reader.first_offset_at_or_after(0, window.end_ns)
    except BaseException:
        reader.close()
        raise
    return reader, start, end


def topic_event_records(
    settings: CommonSettings, prefix: str, window: Window, serde: AvroSerde
) -> tuple[RawStart, int, Iterator[LogRecord]]:
    """``<prefix>.md.events`` from the events of the CONNECTED at or before the window to its end, partitions merged.

    Merged by (ts_init, partition, offset): each partition (each symbol) stays in its order.
    """
    with TopicReader(settings, TopicNames(prefix).md_raw, serde) as raw:
        start = find_raw_start(raw, window.start_ns)
    reader = TopicReader(settings, TopicNames(prefix).md_events, serde)
    ranges: list[tuple[int, int, int]] = []
    try:
        for partition in reader.partitions:
            _, high = reader.watermarks(partition)
            first = reader.first_offset_at_or_after(partition, start.ts_init)
            end = high if window.end_ns is None else reader.first_offset_at_or_after(partition, window.end_ns)
            ranges.append((partition, first, end))
    except BaseException:
        reader.close()
        raise
    total = sum(max(0, end - first) for _, first, end in ranges)

    def iterate() -> Iterator[LogRecord]:
        with reader:
            # One partition at a time into memory would be simpler but unbounded: read them in turn,
            # each through its own pass, then merge. Windows of events are read into memory per
            # partition (a replay window is minutes to hours of one namespace).
            per_partition = [list(reader.records(p, first, end)) for p, first, end in ranges]
        yield from heapq.merge(*per_partition, key=lambda r: (r.value.ts_init, r.partition, r.offset))

    return start, total, iterate()


# -- captures and the synthetic market -------------------------------------------------------------


def capture_raw_records(path: Path, window: Window) -> Iterator[RawFrame]:
    """A capture file as the raw log the ingest would have written (its CONNECTED first), up to the window's end."""
    from quotewatch.domain.venue.captures import read_capture

    for raw in read_capture(path).raw_frames():
        if not window.before_end(raw.ts_init):
            return
        yield raw


def synthetic_raw_records(
    seed: int, hours: float, symbols: Iterable[str], tick_ms: int, window: Window
) -> Iterator[RawFrame]:
    """``hours`` of the seeded synthetic market (Advanced Trade protocol) as a raw log, up to the window's end."""
    from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
    from quotewatch.domain.venue.coinbase import FEED_ADVANCED

    config = SyntheticConfig(symbols=tuple(symbols), seed=seed)
    for raw in synthetic_raw_frames(FEED_ADVANCED, config, int(hours * 3_600 * 10**9), tick_ms=tick_ms):
        if not window.before_end(raw.ts_init):
            return
        yield raw
