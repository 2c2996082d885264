"""The ingest's writer thread and what it shares with the readers: the record queue and the exchange clock.

Records (frames and control records) go from the readers (one per connection, and the clock
ticker) through one bounded :class:`RecordQueue` to the :class:`RawWriter`, which logs each to
``qw.md.raw``, runs the normaliser over it and publishes the events. See
:mod:`quotewatch.services.ingest.service` for the whole picture and the delivery guarantees.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer

from quotewatch.core.clock import Clock
from quotewatch.core.config import IngestSettings
from quotewatch.core.errors import EncodeError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import DeliveryTracker, flush_or_fail
from quotewatch.core.metrics import CONTROL_FRAME_ANOMALIES, DEAD_LETTERS, FEED_ERRORS, GAPS, RECORDS_OUT
from quotewatch.core.records import RawFrame, RawKind
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.coinbase import ExchangeMessageError
from quotewatch.domain.venue.normaliser import Normaliser, Notice, Reject, control_text
from quotewatch.services.ingest.rejects import SERVICE, reject_dead_letter

logger = logging.getLogger(__name__)


class QueueItem(NamedTuple):
    """One raw record waiting for the writer (the readers build these: cheap tuples)."""

    kind: RawKind
    text: str
    connection_id: str
    frame_index: int
    ts_init: int
    slot: int
    """The connection slot (which group of products) the record belongs to."""


STOP = QueueItem("CLOCK", "stop", "", -1, 0, 0)
"""Ends the writer; recognised by identity (``item is STOP``), never written."""
_ITEM_OVERHEAD = 200
"""Bytes counted per queued record beyond its text (the tuple, its strings and ints)."""


class ByteBoundedQueue(queue.Queue[QueueItem]):
    """A queue of records bounded in records **and** in bytes of text.

    ``put_nowait`` raises :class:`queue.Full` when ``maxsize`` records are queued or the record
    would take the queued text past ``max_bytes`` -- except into an empty queue, so a frame larger
    than ``max_bytes`` (up to WS_MAX_FRAME_BYTES) is never refused for its size alone. Blocking
    puts are not supported: the readers never wait on the queue (:meth:`RecordQueue.put` offers
    again until there is room).
    """

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.bytes = 0

    def put(self, item: QueueItem, block: bool = True, timeout: float | None = None) -> None:
        if block:
            raise NotImplementedError("the ingest never waits on its queue: put_nowait, or offer again later")
        with self.not_full:
            size = len(item.text) + _ITEM_OVERHEAD
            if self._qsize() >= self.maxsize or (self._qsize() and self.bytes + size > self.max_bytes):
                raise queue.Full
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _put(self, item: QueueItem) -> None:
        self.queue.append(item)
        self.bytes += len(item.text) + _ITEM_OVERHEAD

    def _get(self) -> QueueItem:
        item: QueueItem = self.queue.popleft()
        self.bytes -= len(item.text) + _ITEM_OVERHEAD
        return item


class RecordQueue:
    """The bounded queue between the readers and the writer, and the ``ts_init`` stamp of every record.

    Readers never wait for the broker on frames (:meth:`offer`); control records, written when no
    frames are being read, wait for room (:meth:`put`). Bounded in records (INGEST_QUEUE_MAX) and in
    bytes of text (INGEST_QUEUE_MAX_BYTES, :class:`ByteBoundedQueue`), so a burst of large snapshots
    cannot take the process's memory; full either way, a reader records an overflow (a gap, a resync).
    """

    def __init__(
        self, clock: Clock, maxsize: int, writer_alive: Callable[[], bool], max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self.items: queue.Queue[QueueItem] = ByteBoundedQueue(maxsize, max_bytes)
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._clock = clock
        self._writer_alive = writer_alive
        self._last_ts_init = 0

    def stamp(self) -> int:
        """``ts_init`` of a new record: wall time, strictly increasing over every connection."""
        self._last_ts_init = max(self._clock.now_ns(), self._last_ts_init + 1)
        return self._last_ts_init

    def offer(self, item: QueueItem) -> bool:
        try:
            self.items.put_nowait(item)
        except queue.Full:
            return False
        return True

    async def put(self, item: QueueItem) -> None:
        """Queue a record, waiting for room (only used when no frames are being read).

        If the writer has died there will never be room: the service is failing fatally anyway
        (``run`` raises), so the record is abandoned rather than waited for forever.
        """
        while not self.offer(item):
            if not self._writer_alive():
                logger.error("the writer is gone; not queueing", extra={"kind": item.kind})
                return
            await asyncio.sleep(0.005)

    async def put_control(
        self, kind: RawKind, connection_id: str, slot: int, state: str, reason: str, **details: Any
    ) -> None:
        """Queue a control record, waiting for room (no frames are being read when this runs)."""
        text = control_text(state, reason, **details)
        await self.put(QueueItem(kind, text, connection_id, -1, self.stamp(), slot))


class ExchangeClock:
    """Estimates exchange time from local time, for CLOCK and other control records.

    Offset samples are ``ts_event - ts_init`` of the frames' market events; the estimate uses the
    smallest offset of the last ``window_ns`` of samples (the slowest recent delivery), so CLOCK
    ticks trail the exchange rather than run ahead of events still in flight. Pure and
    deterministic in the order of its calls.

    **One clock.** The estimate is made only from exchange times, never from the local clock
    alone: the local clock may be off by any amount (a VM after suspend, no NTP) and a feed may
    serve a session recorded long ago with its own times. So:

    - the samples are per connection (:meth:`new_connection` forgets them): a new connection's
      exchange may be a different clock (a feed server replaying a recording from its start);
    - :meth:`estimate` goes back never within a connection;
    - before the connection's first exchange time (``not ready``) there is no estimate:
      :meth:`last_known` gives the latest estimate of an earlier connection, or ``None``.
    """

    def __init__(self, window_ns: int = 10_000_000_000) -> None:
        self._window_ns = window_ns
        self._samples: deque[tuple[int, int]] = deque()  # (ts_init, offset), offsets increasing
        self._last = -1
        self._last_known: int | None = None

    def new_connection(self) -> None:
        """A new connection starts: forget the samples (its exchange time is not known yet)."""
        if self._last >= 0:
            self._last_known = self._last
        self._samples.clear()
        self._last = -1

    def observe(self, ts_event: int, ts_init: int) -> None:
        offset = ts_event - ts_init
        samples = self._samples
        while samples and samples[-1][1] >= offset:
            samples.pop()
        samples.append((ts_init, offset))
        while samples[0][0] < ts_init - self._window_ns:
            samples.popleft()

    @property
    def ready(self) -> bool:
        """True once an exchange time has been seen on this connection."""
        return bool(self._samples)

    def estimate(self, ts_init: int) -> int:
        """Exchange time at local time ``ts_init`` (only while :attr:`ready`)."""
        if not self._samples:
            raise ValueError("no exchange time has been seen on this connection")
        self._last = max(self._last, ts_init + self._samples[0][1])
        return self._last

    def last_known(self) -> int | None:
        """The latest exchange-time estimate made, on this connection or an earlier one, or None."""
        return self._last if self._last >= 0 else self._last_known


@dataclass
class IngestStats:
    """Counters the tests and the health endpoint read."""

    frames: int = 0
    overflows: int = 0
    dropped_frames: int = 0
    connections: int = 0
    resyncs: int = 0
    product_resyncs: int = 0
    """Per-product resyncs (a bad event in a multi-product frame: that product resubscribed)."""
    dead_letters: int = 0
    raw_written: int = 0
    events_written: int = 0


class RawWriter:
    """The writer thread: queue -> ``md.raw`` -> normaliser -> ``md.events`` + ``dlq``.

    Who calls it: :class:`IngestService` starts it with :meth:`start` and ends it by queueing
    the stop marker; :meth:`run` returns after draining the queue and flushing the producer.
    """

    def __init__(
        self,
        *,
        settings: IngestSettings,
        feed: str,
        groups: Sequence[Sequence[str]],
        serde: AvroSerde,
        producer: Producer,
        delivery: DeliveryTracker,
        clock: Clock,
        items: queue.Queue[QueueItem],
        liveness: Liveness,
        stats: IngestStats,
        on_resync: Callable[[str, str, list[str]], None],
    ) -> None:
        self._settings = settings
        self._feed = feed
        self._serde = serde
        self._producer = producer
        self._delivery = delivery
        self._clock = clock
        self._items = items
        self._liveness = liveness
        self._stats = stats
        self._on_resync = on_resync
        self._topics = TopicNames(settings.topic_prefix)
        self._groups = [tuple(group) for group in groups]
        self._normaliser = Normaliser()
        self._exchange_clocks = [ExchangeClock() for _ in self._groups]
        """One per connection slot: each connection's exchange time is its own (docs: "Time")."""
        self._noticed: set[tuple[str, str, str]] = set()
        self._out = {
            topic: RECORDS_OUT.labels(SERVICE, topic)
            for topic in (self._topics.md_raw, self._topics.md_events, self._topics.dlq)
        }
        self._progress_pending = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # handed to the service, which exits non-zero
            logger.exception("the ingest writer failed")
            self.error = exc

    def run(self) -> None:
        written_since_check = 0
        while True:
            try:
                item = self._items.get(timeout=0.2)
            except queue.Empty:
                if self._progress_pending:
                    self._liveness.progressed(self._progress_pending)
                    self._progress_pending = 0
                self._liveness.beat()
                self._producer.poll(0)
                self._delivery.raise_if_failed()
                continue
            if item is STOP:
                break
            self.write(item)
            written_since_check += 1
            if written_since_check >= 100:
                written_since_check = 0
                # A delivery failure after the idempotent producer's retries would be silent loss.
                self._delivery.raise_if_failed()
                self._liveness.set_lag(self._items.qsize())
        # Shutdown: everything queued before the stop marker has been written; deliver it.
        flush_or_fail(self._producer, 30)
        self._delivery.raise_if_failed()

    def write(self, item: QueueItem) -> None:
        """Log one record to ``md.raw`` and publish what the normaliser makes of it.

        CLOCK ticks before the first exchange time of the connection are not logged: they would carry
        local time, possibly ahead of the exchange, and move downstream grids past events to come.
        """
        exchange_clock = self._exchange_clocks[item.slot]
        if item.kind == "CONNECTED":
            exchange_clock.new_connection()
        if item.kind == "FRAME":
            ts_event = item.ts_init
        elif exchange_clock.ready:
            ts_event = exchange_clock.estimate(item.ts_init)
        elif item.kind == "CLOCK":
            return
        else:
            # A control record before this connection's first exchange time (CONNECTED, the
            # DISCONNECTED of a failed attempt): the latest exchange time known, else the local
            # time, the only one there is. Either way the book never takes its time from it
            # (GAP and STATUS move no grid; docs/architecture.md, "Time").
            last_known = exchange_clock.last_known()
            ts_event = item.ts_init if last_known is None else last_known
        raw = RawFrame(
            ts_event=ts_event,
            ts_init=item.ts_init,
            exchange=self._settings.exchange,
            feed=self._feed,
            symbols=self._groups[item.slot],
            connection_id=item.connection_id,
            frame_index=item.frame_index,
            kind=item.kind,
            text=item.text,
        )
        raw_topic = self._topics.md_raw
        try:
            self._produce(raw_topic, self._feed, self._serde.encode(raw_topic, raw))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self._dead_letter(Reject(f"frame too large for {raw_topic}: {exc}", "FrameTooLarge", raw))
            self._on_resync(item.connection_id, f"frame {item.frame_index} was too large to log", [])
            return
        self._stats.raw_written += 1
        try:
            out = self._normaliser.process(raw)
        except Exception as exc:  # the normaliser never raises on input; a bug must not stop ingest
            logger.exception(
                "normaliser failed on a raw record", extra={"ref": f"{item.connection_id}:{item.frame_index}"}
            )
            self._dead_letter(Reject(f"normaliser error: {exc!r}", type(exc).__name__, raw))
            return
        events_topic = self._topics.md_events
        for event in out.events:
            kind = event.kind
            if kind in ("UPDATE", "TRADE", "HEARTBEAT"):
                exchange_clock.observe(event.ts_event, item.ts_init)
            elif kind == "GAP" and event.gap is not None:
                GAPS.labels(SERVICE, event.symbol, event.gap.reason).inc()
            try:
                value = self._serde.encode(events_topic, event)
            except EncodeError as exc:
                # A value the parser let through but no record can carry: the frame goes to the
                # DLQ and, as its event is missing downstream, the books are rebuilt (resync).
                self._dead_letter(Reject(f"event not encodable: {exc}", "EncodeError", raw, event.symbol))
                self._on_resync(item.connection_id, f"frame {item.frame_index}: an event could not be encoded", [])
                continue
            self._produce(events_topic, event.symbol, value)
            self._stats.events_written += 1
        for reject in out.rejects:
            self._dead_letter(reject)
        for notice in out.notices:
            self._notice(notice)
        if out.resync is not None:
            self._on_resync(item.connection_id, out.resync, [])
        elif out.resync_symbols:
            self._on_resync(item.connection_id, "a bad book event", out.resync_symbols)
        self._progress_pending += 1
        if self._progress_pending >= 50 or item.kind != "FRAME":
            self._liveness.progressed(self._progress_pending)
            self._progress_pending = 0

    def _notice(self, notice: Notice) -> None:
        """An odd control frame, used anyway: counted, and logged (a warning the first time per kind)."""
        CONTROL_FRAME_ANOMALIES.labels(SERVICE, self._feed, notice.message_type, notice.code).inc()
        key = (notice.message_type, notice.code, notice.detail)
        first = key not in self._noticed and len(self._noticed) < 1000
        if first:
            self._noticed.add(key)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "odd %s frame accepted: %s",
            notice.message_type,
            notice.detail,
            extra={"ref": notice.source_ref, "anomaly": notice.code},
        )

    def _dead_letter(self, reject: Reject) -> None:
        if reject.error_type == ExchangeMessageError.error_type:
            # The exchange refused something (a subscribe, a key): the operator must see it.
            FEED_ERRORS.labels(SERVICE, self._feed).inc()
            logger.error("the exchange sent an error: %s", reject.reason, extra={"ref": reject.source_ref})
        logger.warning(
            "dead-lettering a frame: %s",
            reject.reason,
            extra={"ref": reject.source_ref, "error_type": reject.error_type},
        )
        record = reject_dead_letter(self._clock, reject, topic=self._topics.md_raw, key=self._feed.encode())
        dlq = self._topics.dlq
        self._produce(dlq, self._topics.md_raw, self._serde.encode(dlq, record))
        DEAD_LETTERS.labels(SERVICE, self._topics.md_raw, reject.error_type).inc()
        self._stats.dead_letters += 1

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key.encode())
                break
            except BufferError:
                # librdkafka's queue is full (the broker is slow): the writer waits here, the
                # reader keeps reading into the bounded queue, which overflows into a gap if need be.
                # Waiting for the broker is not a stuck loop: the beat keeps the watchdog away.
                self._producer.poll(0.05)
                self._liveness.beat()
        self._producer.poll(0)
        self._out[topic].inc()
