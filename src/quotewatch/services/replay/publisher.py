"""``quotewatch replay``: re-publish a past window's raw frames (or market events) into a fresh namespace.

The records are written in order into ``NAME.md.raw`` (or ``NAME.md.events``) of a namespace
whose catalog topics this creates; the unchanged services then run against ``TOPIC_PREFIX=NAME``.
For a raw replay the ingest in ``INGEST_SOURCE=topic`` mode re-normalises ``NAME.md.raw`` into
``NAME.md.events`` (exactly the events the live ingest wrote: the raw log is the normaliser's
complete input), then book, labeler and inference produce what they produced live.

Records read from Kafka are forwarded byte for byte (value and key); records from the lake, a
capture or the synthetic market are encoded with the topic's current schema. Pacing
(``--speed``) follows ``ts_init`` from ``--from`` on: ``1x`` keeps the original gaps between
records, ``Nx`` divides them by N, ``max`` does not wait; the warm-up before ``--from`` (from the
CONNECTED record on) always goes at full speed.

**Delivery.** One idempotent producer (acks=all, no reordering on retry); every delivery
report is checked and the replay fails (exit 1) if any record was not delivered, after flushing
what it could. A failed replay leaves a partial namespace: replay into a new NAME.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, Message, Producer

from quotewatch.core.clock import Clock
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import ConfigError
from quotewatch.core.kafka import (
    DeliveryTracker,
    encode_key,
    ensure_topics,
    flush_or_fail,
    make_admin,
    make_producer,
    query_watermarks,
)
from quotewatch.core.records import MarketEvent, RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.replay import lake_source, sources
from quotewatch.services.replay.sources import LogRecord, RawStart, ReplayError, SourceSpec, Window, format_time

logger = logging.getLogger(__name__)

SERVICE = "replay"
_CHECK_EVERY = 1_000
_POLL_EVERY = 256


def parse_speed(text: str) -> float | None:
    """``max`` -> None (no pacing); ``1x``, ``10x``, ``0.5x`` -> the factor.

    Raises:
        ConfigError: anything else.
    """
    value = text.strip().lower()
    if value == "max":
        return None
    try:
        factor = float(value[:-1]) if value.endswith("x") else float("nan")
    except ValueError:
        factor = float("nan")
    if not factor > 0:
        raise ConfigError(f"--speed {text!r}: expected max, 1x or Nx (N > 0)")
    return factor


@dataclass(frozen=True)
class ReplaySummary:
    """What a replay wrote."""

    topic: str
    records: int
    start: RawStart | None
    first_ts_init: int | None
    last_ts_init: int | None
    seconds: float

    def describe(self) -> str:
        if not self.records:
            return f"nothing to replay into {self.topic}"
        assert self.first_ts_init is not None
        assert self.last_ts_init is not None
        rate = self.records / self.seconds if self.seconds > 0 else float("inf")
        start = ""
        if self.start is not None:
            start = f" (from the CONNECTED of {self.start.connection_id} at {format_time(self.start.ts_init)})"
        return (
            f"replayed {self.records} records into {self.topic}{start}: ts_init "
            f"{format_time(self.first_ts_init)} .. {format_time(self.last_ts_init)} in {self.seconds:.1f}s "
            f"({rate:,.0f} records/s)"
        )


def open_source(
    settings: CommonSettings, source: SourceSpec, window: Window, what: str, serde: AvroSerde
) -> tuple[RawStart | None, int | None, Iterator[LogRecord]]:
    """(the CONNECTED the window starts at, record count if known, the records) of a replay source.

    Raises:
        ConfigError: ``events`` asked of a capture or the synthetic market (they are raw logs).
    """
    if source.kind == "topic":
        if what == "raw":
            return sources.topic_raw_records(settings, source.prefix, window, serde)
        return sources.topic_event_records(settings, source.prefix, window, serde)
    if source.kind == "lake":
        read_lake = lake_source.lake_raw_records if what == "raw" else lake_source.lake_event_records
        return read_lake(settings.lake_uri, source.prefix, window)
    if what != "raw":
        raise ConfigError(f"--what events needs a topic or lake source; {source.describe()} is a raw log")
    if source.kind == "capture":
        assert source.path is not None
        raws: Iterable[RawFrame] = sources.capture_raw_records(source.path, window)
    else:
        raws = sources.synthetic_raw_records(source.seed, source.hours, settings.symbols, settings.tick_ms, window)
    return None, None, (LogRecord(raw, raw.feed.encode()) for raw in raws)


def check_fresh(settings: CommonSettings, target: str, source: SourceSpec) -> None:
    """Refuse to replay into the source's own namespace or into topics that already hold records."""
    if source.kind in ("topic", "lake") and source.prefix == target:
        raise ConfigError(f"--prefix {target} is the source namespace: replay into a fresh one")
    from quotewatch.core.kafka import make_consumer

    names = TopicNames(target)
    consumer = make_consumer(settings, f"{target}.replay-check", "replay-check")
    try:
        metadata = make_admin(settings).list_topics(timeout=30).topics
        for topic in (names.md_raw, names.md_events):
            if topic not in metadata:
                continue
            for partition in metadata[topic].partitions:
                from confluent_kafka import TopicPartition

                _, high = query_watermarks(consumer, TopicPartition(topic, partition), timeout=30)
                if high > 0:
                    raise ReplayError(f"{topic} already holds records: replay into a fresh --prefix")
    finally:
        consumer.close()


def replay(
    settings: CommonSettings,
    source: SourceSpec,
    window: Window,
    target_prefix: str,
    *,
    what: str = "raw",
    speed: float | None = None,
    serde: AvroSerde | None = None,
    clock: Clock | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress: bool = True,
    producer: Producer | None = None,
) -> ReplaySummary:
    """Re-publish the window of ``source`` into ``<target_prefix>.md.raw`` (or ``.md.events``).

    Raises:
        ReplayError: the window cannot be read, or the target is not fresh.
        FatalError: a record was not delivered.
    """
    from quotewatch.core.clock import SystemClock

    if what not in ("raw", "events"):
        raise ConfigError(f"--what {what!r}: expected raw or events")
    serde = serde or AvroSerde()
    clock = clock or SystemClock()
    check_fresh(settings, target_prefix, source)
    ensure_topics(make_admin(settings), target_prefix)
    names = TopicNames(target_prefix)
    topic = names.md_raw if what == "raw" else names.md_events
    delivery = DeliveryTracker()
    own_producer = producer is None
    # Delivery reports for failures only: a lost record still fails the replay, without a Python
    # callback per delivered record.
    if producer is None:
        only_errors: dict[str, Any] = {"delivery.report.only.error": True}  # not a topic record: librdkafka config
        producer = make_producer(settings, f"replay-{target_prefix}", None, on_delivery=delivery, **only_errors)
    start: RawStart | None
    total: int | None
    batches: Iterator[list[Message]] | None = None
    records: Iterator[LogRecord] | None = None
    if speed is None and source.kind == "topic" and what == "raw":
        # A raw topic window at --speed max: its end offset is known, so the records are forwarded
        # as the consumer fetched them, bytes and keys unchanged, never decoded.
        start, total, batches = sources.topic_raw_batches(settings, source.prefix, window, serde)
    else:
        start, total, records = open_source(settings, source, window, what, serde)
    started = clock.monotonic_ns()
    try:
        with _progress(total, topic, progress) as bar:
            if batches is not None:
                source_topic = TopicNames(source.prefix).md_raw
                count, first_ts, last_ts = _forward(producer, topic, batches, bar, delivery, serde, source_topic)
            else:
                assert records is not None
                pacer = _Pacer(speed, clock, sleep, window.start_ns) if speed is not None else None
                count, first_ts, last_ts = _publish(producer, topic, what, records, pacer, bar, delivery, serde)
    finally:
        if own_producer:
            # Everything handed to the producer is delivered (or the replay fails) before returning.
            flush_or_fail(producer, 60)
    delivery.raise_if_failed()
    seconds = (clock.monotonic_ns() - started) / 1e9
    summary = ReplaySummary(topic, count, start, first_ts, last_ts, seconds)
    logger.info(summary.describe())
    return summary


def _progress(total: int | None, topic: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc=f"replay -> {topic}", disable=not enabled, mininterval=0.5)


class _Pacer:
    """Waits until a record is due: its ``ts_init`` gap from the window start, divided by the speed.

    Records before ``start_ns`` (the warm-up from the CONNECTED record on) are due at once; the
    first record at or after it fixes the origin, ``start_ns`` at that moment (without a window
    start: the first record's ``ts_init``).
    """

    def __init__(self, speed: float, clock: Clock, sleep: Callable[[float], None], start_ns: int | None = None) -> None:
        self._speed = speed
        self._clock = clock
        self._sleep = sleep
        self._start_ns = start_ns
        self._origin: tuple[int, int] | None = None

    def wait(self, ts_init: int) -> None:
        if self._origin is None:
            if self._start_ns is not None and ts_init < self._start_ns:
                return
            self._origin = (self._clock.monotonic_ns(), ts_init if self._start_ns is None else self._start_ns)
        now = self._clock.monotonic_ns()
        due_ns = self._origin[0] + int((ts_init - self._origin[1]) / self._speed)
        if due_ns > now:
            self._sleep((due_ns - now) / 1e9)


def _publish(
    producer: Producer,
    topic: str,
    what: str,
    records: Iterable[LogRecord],
    pacer: _Pacer | None,
    bar: Any,
    delivery: DeliveryTracker,
    serde: AvroSerde,
) -> tuple[int, int | None, int | None]:
    """Produce every record (encoded when it has no bytes), paced: (count, first ts_init, last ts_init)."""
    count = 0
    first_ts: int | None = None
    ts_init: int | None = None
    for record in records:
        ts_init = record.value.ts_init
        if first_ts is None:
            first_ts = ts_init
        if pacer is not None:
            pacer.wait(ts_init)
        value = record.data if record.data is not None else serde.encode(topic, record.value)
        key = record.key if record.key is not None else encode_key(_key_of(what, record.value))
        _produce(producer, topic, key, value)
        count += 1
        if count % _POLL_EVERY == 0:
            producer.poll(0)  # serve delivery reports (the DeliveryTracker counts failures)
        if count % _CHECK_EVERY == 0:
            bar.update(_CHECK_EVERY)
            delivery.raise_if_failed()  # a lost record would make the replay silently differ
    bar.update(count % _CHECK_EVERY)
    return count, first_ts, ts_init


def _forward(
    producer: Producer,
    topic: str,
    batches: Iterable[list[Message]],
    bar: Any,
    delivery: DeliveryTracker,
    serde: AvroSerde,
    source_topic: str,
) -> tuple[int, int | None, int | None]:
    """Produce every fetched message's value and key unchanged: (count, first ts_init, last ts_init)."""
    produce = producer.produce
    count = 0
    first: Message | None = None
    last: Message | None = None
    for messages in batches:
        for message in messages:
            try:
                produce(topic, message.value(), message.key())
            except BufferError:
                _produce(producer, topic, message.key(), message.value())  # waits for room, then produces
            except KafkaException as exc:
                raise ReplayError(f"cannot produce to {topic}: {exc}") from exc
        count += len(messages)
        if first is None:  # not `first or ...`: a Message's truth is its value's length
            first = messages[0]
        last = messages[-1]
        producer.poll(0)  # serve delivery reports (the DeliveryTracker counts failures)
        bar.update(len(messages))
        delivery.raise_if_failed()  # a lost record would make the replay silently differ
    return count, _message_ts_init(first, serde, source_topic), _message_ts_init(last, serde, source_topic)


def _message_ts_init(message: Message | None, serde: AvroSerde, topic: str) -> int | None:
    if message is None:
        return None
    return serde.decode(message.value() or b"", topic).ts_init


def _key_of(what: str, value: RawFrame | MarketEvent) -> str:
    return value.feed if what == "raw" or not isinstance(value, MarketEvent) else value.symbol


def _produce(producer: Producer, topic: str, key: bytes | None, value: bytes | None) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key)
            break
        except BufferError:
            # The local queue is full: serve delivery reports until there is room (bounded wait).
            producer.poll(0.1)
        except KafkaException as exc:
            raise ReplayError(f"cannot produce to {topic}: {exc}") from exc
