"""The live ingest: Coinbase WebSocket -> ``qw.md.raw`` + ``qw.md.events`` (+ ``qw.dlq``).

Three parts, joined by one bounded queue:

- the **reader** (asyncio): the connection state machine, the socket, the subscribes, a
  watchdog for silence and subscribe timeouts. It stamps every frame (``ts_init``) and puts it on
  the queue with ``put_nowait``: it never waits for the broker. When the queue is full it stops
  accepting frames, closes the connection, and (once the writer has made room) records an
  OVERFLOW control record with the number and indexes of the frames it could not keep, then the
  DISCONNECTED record: the loss is in the log, the normaliser turns it into GAP events, and the
  reconnect's snapshots rebuild the books.
- the **clock**: every TICK_MS of wall time a CLOCK control record goes on the queue. It carries
  the id of the connection whose CONNECTED record was queued last (also between connections and
  while the next one is still connecting): every record from a CONNECTED up to the next CONNECTED
  carries that connection's id (only the DISCONNECTED of a failed connect attempt carries the
  attempt's own id), which is what a replay's search for a window's CONNECTED record relies on.
- the **writer** (a thread): takes records in order, writes each to ``qw.md.raw`` (key = feed),
  runs the :class:`~quotewatch.domain.venue.normaliser.Normaliser` over it and writes its events to
  ``qw.md.events`` (key = symbol) and its rejects to ``qw.dlq``. Control records get their
  ``ts_event`` here: the exchange-time estimate (:class:`ExchangeClock`). When the normaliser asks
  for a resync (sequence jump, a book frame lost to a parse error) the writer tells the reader,
  which reconnects for fresh snapshots.

Delivery: at-least-once into the broker, never silent loss. The producer is idempotent (acks=all,
retries without duplicates or reordering); a delivery failure after its retries is fatal (the
service exits non-zero rather than carry on with a hole). What is still in the local queue when the
process dies was never accepted: the next process's CONNECTED record marks the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from quotewatch.core.clock import Clock
from quotewatch.core.config import IngestSettings
from quotewatch.core.errors import EncodeError, FatalError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import DeliveryTracker, dead_letter, flush_or_fail, make_producer
from quotewatch.core.metrics import DEAD_LETTERS, FEED_STATE, GAPS, RECONNECTS, RECORDS_IN, RECORDS_OUT
from quotewatch.core.records import RawFrame, RawKind
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.coinbase import (
    FEED_EXCHANGE,
    FEED_SPECS,
    PARSERS,
    ExchangeCredentials,
    FrameError,
    subscribe_messages,
)
from quotewatch.domain.venue.normaliser import Normaliser, Reject, control_text
from quotewatch.services.ingest.state_machine import ConnectionStateMachine, FeedState, Transition

logger = logging.getLogger(__name__)

SERVICE = "ingest"
_SUBSCRIPTION_PROBE_BYTES = 64 * 1024


class QueueItem(NamedTuple):
    """One raw record waiting for the writer (the reader builds these: cheap tuples)."""

    kind: RawKind
    text: str
    connection_id: str
    frame_index: int
    ts_init: int


_STOP = QueueItem("CLOCK", "stop", "", -1, 0)
"""Ends the writer; recognised by identity (``item is _STOP``), never written."""


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
        serde: AvroSerde,
        producer: Producer,
        delivery: DeliveryTracker,
        clock: Clock,
        items: queue.Queue[QueueItem],
        liveness: Liveness,
        stats: IngestStats,
        on_resync: Callable[[str, str], None],
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
        self._symbols = tuple(settings.symbols)
        self._normaliser = Normaliser()
        self._exchange_clock = ExchangeClock()
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
            if item is _STOP:
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
        exchange_clock = self._exchange_clock
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
            symbols=self._symbols,
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
            self._on_resync(item.connection_id, f"frame {item.frame_index} was too large to log")
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
                self._exchange_clock.observe(event.ts_event, item.ts_init)
            elif kind == "GAP" and event.gap is not None:
                GAPS.labels(SERVICE, event.symbol, event.gap.reason).inc()
            try:
                value = self._serde.encode(events_topic, event)
            except EncodeError as exc:
                # A value the parser let through but no record can carry: the frame goes to the
                # DLQ and, as its event is missing downstream, the books are rebuilt (resync).
                self._dead_letter(Reject(f"event not encodable: {exc}", "EncodeError", raw, event.symbol))
                self._on_resync(item.connection_id, f"frame {item.frame_index}: an event could not be encoded")
                continue
            self._produce(events_topic, event.symbol, value)
            self._stats.events_written += 1
        for reject in out.rejects:
            self._dead_letter(reject)
        if out.resync is not None:
            self._on_resync(item.connection_id, out.resync)
        self._progress_pending += 1
        if self._progress_pending >= 50 or item.kind != "FRAME":
            self._liveness.progressed(self._progress_pending)
            self._progress_pending = 0

    def _dead_letter(self, reject: Reject) -> None:
        raw = reject.raw
        logger.warning(
            "dead-lettering a frame: %s",
            reject.reason,
            extra={"ref": reject.source_ref, "error_type": reject.error_type},
        )
        record = dead_letter(
            service=SERVICE,
            clock=self._clock,
            error=FrameError(reject.reason, book_affected=False),
            source_topic=self._topics.md_raw,
            source_value=raw.text.encode()[: 8 * 1024 * 1024],
            source_key=self._feed.encode(),
            source_timestamp_ns=raw.ts_init,
            source_ref=reject.source_ref,
            exchange=self._settings.exchange,
            symbol=reject.symbol,
            error_type=reject.error_type,
        )
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


class _SessionEndedError(Exception):
    """Why a connection attempt or session ended."""

    def __init__(self, reason: str, *, subscribed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subscribed = subscribed


class IngestService:
    """The live ingest. ``await run()`` until :meth:`stop` (or a fatal error).

    Args:
        producer: injected for tests; default an idempotent producer from the settings.
        monotonic_ns / sleep: injected time for the state machine and backoff waits.
    """

    def __init__(
        self,
        settings: IngestSettings,
        *,
        serde: AvroSerde,
        clock: Clock,
        liveness: Liveness,
        producer: Producer | None = None,
        url: str | None = None,
    ) -> None:
        self.settings = settings
        self.feed = settings.feed
        self.url = url or settings.coinbase_ws_url or FEED_SPECS[self.feed].url
        self.symbols = list(settings.symbols)
        self._clock = clock
        self._liveness = liveness
        self.stats = IngestStats()
        self._items: queue.Queue[QueueItem] = queue.Queue(maxsize=settings.ingest_queue_max)
        self._delivery = DeliveryTracker()
        self._producer = producer or make_producer(
            settings, f"{SERVICE}-{settings.instance_id}", on_delivery=self._delivery
        )
        self.machine = ConnectionStateMachine(
            backoff_initial_seconds=settings.backoff_initial_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
            backoff_reset_seconds=settings.backoff_reset_seconds,
            monotonic_ns=clock.monotonic_ns,
            on_transition=self._on_transition,
        )
        self._writer = RawWriter(
            settings=settings,
            feed=self.feed,
            serde=serde,
            producer=self._producer,
            delivery=self._delivery,
            clock=clock,
            items=self._items,
            liveness=liveness,
            stats=self.stats,
            on_resync=self._resync_from_writer,
        )
        self._credentials = _credentials(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._last_ts_init = 0
        self._ws: ClientConnection | None = None
        self._connection_id = ""
        self._last_connection_id = ""
        # The connection of the latest CONNECTED record queued (what CLOCK records carry); set only
        # once that record is on the queue, so no CLOCK carries an id ahead of its CONNECTED.
        self._clock_connection_id = ""
        self._end_reason: str | None = None
        self._overflow: list[int] | None = None
        self._overflow_ticks = 0
        self._session_task: asyncio.Task[None] | None = None
        self._last_frame_ns = 0
        self._subscribed = False
        for state in FeedState:
            FEED_STATE.labels(SERVICE, state.value).set(1 if state is FeedState.INIT else 0)

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, read and write until :meth:`stop`; then drain, flush and return.

        Raises:
            FatalError: the writer failed (a record was not delivered) or could not drain.
        """
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._writer.start()
        ticker = asyncio.create_task(self._clock_ticker()) if self.settings.clock_events else None
        watcher = asyncio.create_task(self._watch_writer())
        try:
            await self._connection_loop()
        finally:
            for task in (ticker, watcher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._put(_STOP)
            await asyncio.to_thread(self._writer.join, 60)
            self._liveness.stopped("stopped" if self._writer.error is None else repr(self._writer.error))
        if self._writer.error is not None:
            raise FatalError(f"ingest writer failed: {self._writer.error}") from self._writer.error
        if self._writer.alive:
            raise FatalError("ingest writer did not drain within 60 s")

    @property
    def running(self) -> bool:
        """True once :meth:`run` has started (from then on :meth:`stop` takes effect)."""
        return self._loop is not None

    def stop(self) -> None:
        """Request a stop from any state (thread-safe)."""
        if self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._request_stop, "stop requested")

    def _request_stop(self, reason: str) -> None:
        assert self._stopping is not None
        self._stopping.set()
        if self._ws is not None:
            self._close_current(reason)
        elif self._session_task is not None:
            self._session_task.cancel()  # still connecting: nothing to close

    async def _watch_writer(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if not self._writer.alive:
                self._request_stop("the writer stopped")
                return

    # -- the connection loop ------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        assert self._stopping is not None
        machine = self.machine
        while not self._stopping.is_set():
            if machine.state in (FeedState.INIT, FeedState.BACKOFF):
                machine.connect(f"connecting to {self.url}")
            self._session_task = asyncio.create_task(self._session())
            try:
                await self._session_task
            except asyncio.CancelledError:
                if not self._stopping.is_set():
                    raise
                break
            except _SessionEndedError as end:
                if self._stopping.is_set():
                    break
                if end.subscribed:
                    machine.lost(end.reason)
                    if machine.should_back_off():
                        machine.back_off(f"{machine.failures} short-lived connections in a row: {end.reason}")
                else:
                    machine.failed(end.reason)
                transition = machine.history[-1]
                # The loss (and the state it leads to) is in the raw log before anything that follows.
                await self._put_control(
                    "DISCONNECTED",
                    self._last_connection_id,
                    machine.state,
                    end.reason,
                    delay_seconds=round(transition.delay_seconds, 3),
                )
                if machine.state is FeedState.BACKOFF:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), transition.delay_seconds)
        machine.stop("stop requested")
        await self._put_control("DISCONNECTED", self._last_connection_id, FeedState.STOPPED, "stop requested")

    async def _session(self) -> None:
        """One connection: connect, subscribe, read until it ends (raises :class:`_SessionEndedError`)."""
        connection_id = f"{self.settings.instance_id}-{uuid.uuid4().hex[:12]}"
        self._last_connection_id = connection_id
        self._subscribed = False
        self._end_reason = None
        self._overflow = None
        self._overflow_ticks = 0
        try:
            ws = await connect(
                self.url,
                max_size=self.settings.ws_max_frame_bytes,
                open_timeout=self.settings.subscribe_timeout_seconds,
                max_queue=64,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            raise _SessionEndedError(
                f"connect to {self.url} failed: {type(exc).__name__}: {exc}", subscribed=False
            ) from None
        self._ws = ws
        self._connection_id = connection_id
        self.stats.connections += 1
        await self._put_control(
            "CONNECTED", connection_id, self.machine.state, f"connected to {self.url}", url=self.url
        )
        # Not before: a tick during the handshake (or while the CONNECTED waited for room) still
        # belongs to the previous connection's stretch of the log.
        self._clock_connection_id = connection_id
        watchdog = asyncio.create_task(self._watchdog())
        frame_index = 0
        try:
            for message in self._subscribe_messages():
                await ws.send(orjson.dumps(message).decode())
            confirmed: set[str] = set()
            self._last_frame_ns = self._clock.monotonic_ns()
            while True:
                received = await ws.recv()
                ts_init = self._stamp()
                self._last_frame_ns = self._clock.monotonic_ns()
                text = received if isinstance(received, str) else received.decode("utf-8", "replace")
                self.stats.frames += 1
                RECORDS_IN.labels(SERVICE, "websocket").inc()
                if self._overflow is not None:
                    self._overflow.append(frame_index)
                elif not self._offer(QueueItem("FRAME", text, connection_id, frame_index, ts_init)):
                    self._start_overflow(frame_index)
                frame_index += 1
                if not self._subscribed:
                    confirmed.update(self._confirmations(text))
                    if confirmed.issuperset(self.symbols):
                        self._subscribed = True
                        self.machine.subscribed(f"book subscription confirmed for {', '.join(self.symbols)}")
        except ConnectionClosed as exc:
            raise _SessionEndedError(
                self._end_reason or f"connection closed: {exc}", subscribed=self._subscribed
            ) from None
        except OSError as exc:
            raise _SessionEndedError(self._end_reason or f"socket error: {exc}", subscribed=self._subscribed) from None
        finally:
            watchdog.cancel()
            self._ws = None
            self._connection_id = ""
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
            if self._overflow is not None:
                await self._record_overflow(connection_id)

    async def _record_overflow(self, connection_id: str) -> None:
        """After an overflow: log, once the writer made room, which frames were not kept."""
        dropped = self._overflow or []
        self._overflow = None
        frames = [i for i in dropped if i >= 0]
        self.stats.dropped_frames += len(frames)
        span = f" (frame_index {frames[0]}..{frames[-1]})" if frames else ""
        text = (
            f"queue full ({self.settings.ingest_queue_max} records): {len(frames)} frames not logged{span}, "
            f"{self._overflow_ticks} clock ticks skipped"
        )
        await self._put(QueueItem("OVERFLOW", text, connection_id, -1, self._stamp()))

    def _subscribe_messages(self) -> list[dict[str, Any]]:  # not a topic record: subscribe messages
        timestamp = str(int(self._clock.now_ns() // 1_000_000_000)) if self._credentials else None
        return subscribe_messages(self.feed, self.symbols, credentials=self._credentials, timestamp=timestamp)

    def _confirmations(self, text: str) -> tuple[str, ...]:
        """Symbols whose book subscription this frame confirms (only small frames are parsed here)."""
        if len(text) > _SUBSCRIPTION_PROBE_BYTES or "subscriptions" not in text:
            return ()
        try:
            return PARSERS[self.feed](orjson.loads(text)).confirmed
        except (orjson.JSONDecodeError, FrameError):
            return ()

    async def _watchdog(self) -> None:
        """Close the connection on a subscribe timeout or on silence (several heartbeat periods)."""
        subscribe_deadline = self._clock.monotonic_ns() + int(self.settings.subscribe_timeout_seconds * 1e9)
        silence_ns = int(self.settings.heartbeat_timeout_seconds * 1e9)
        while True:
            await asyncio.sleep(min(0.1, self.settings.heartbeat_timeout_seconds / 10))
            now = self._clock.monotonic_ns()
            if not self._subscribed and now > subscribe_deadline:
                self._close_current(f"no subscription confirmed within {self.settings.subscribe_timeout_seconds}s")
                return
            if self._subscribed and now - self._last_frame_ns > silence_ns:
                self._close_current(f"silent for more than {self.settings.heartbeat_timeout_seconds}s (watchdog)")
                return

    def _close_current(self, reason: str) -> None:
        ws = self._ws
        if ws is None:
            return
        if self._end_reason is None:
            self._end_reason = reason
        logger.info("closing the connection", extra={"connection_id": self._connection_id, "reason": reason})
        asyncio.get_running_loop().create_task(ws.close(1000, reason[:100]))

    def _resync_from_writer(self, connection_id: str, reason: str) -> None:
        """Called from the writer thread: the normaliser lost continuity on ``connection_id``."""
        if self._loop is None:
            return

        def resync() -> None:
            if connection_id == self._connection_id:
                self.stats.resyncs += 1
                self._close_current(f"resync: {reason}")

        self._loop.call_soon_threadsafe(resync)

    # -- the queue -----------------------------------------------------------------------------

    def _stamp(self) -> int:
        """``ts_init`` of a new record: wall time, strictly increasing."""
        self._last_ts_init = max(self._clock.now_ns(), self._last_ts_init + 1)
        return self._last_ts_init

    def _offer(self, item: QueueItem) -> bool:
        try:
            self._items.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _start_overflow(self, frame_index: int) -> None:
        """The queue is full: keep no more frames of this connection, close it, record the loss after."""
        self._overflow = [frame_index]
        self.stats.overflows += 1
        logger.warning(
            "queue full: the writer cannot keep up; resyncing",
            extra={"connection_id": self._connection_id, "frame_index": frame_index},
        )
        self._close_current(f"local buffer overflow at frame {frame_index}")

    async def _put(self, item: QueueItem) -> None:
        """Queue a record, waiting for room (only used when no frames are being read).

        If the writer has died there will never be room: the service is failing fatally anyway
        (``run`` raises), so the record is abandoned rather than waited for forever.
        """
        while not self._offer(item):
            if not self._writer.alive:
                logger.error("the writer is gone; not queueing", extra={"kind": item.kind})
                return
            await asyncio.sleep(0.005)

    async def _put_control(
        self, kind: RawKind, connection_id: str, state: FeedState, reason: str, **details: Any
    ) -> None:
        """Queue a control record, waiting for room (no frames are being read when this runs)."""
        await self._put(QueueItem(kind, control_text(state.value, reason, **details), connection_id, -1, self._stamp()))

    async def _clock_ticker(self) -> None:
        tick_ns = self.settings.tick_ms * 1_000_000
        while True:
            now = self._clock.now_ns()
            await asyncio.sleep((tick_ns - now % tick_ns) / 1e9)
            item = QueueItem("CLOCK", "tick", self._clock_connection_id, -1, self._stamp())
            if not self._offer(item):
                if self._ws is not None:
                    # A full queue is an overflow whoever finds it; the session records it.
                    if self._overflow is None:
                        self._start_overflow(-1)
                    self._overflow_ticks += 1
                else:
                    logger.warning("queue full: a clock tick could not be queued")

    # -- state machine hooks ------------------------------------------------------------------

    def _on_transition(self, transition: Transition) -> None:
        logger.info(
            "feed state %s -> %s",
            transition.previous.value,
            transition.state.value,
            extra={"reason": transition.reason, "delay_seconds": round(transition.delay_seconds, 3)},
        )
        FEED_STATE.labels(SERVICE, transition.previous.value).set(0)
        FEED_STATE.labels(SERVICE, transition.state.value).set(1)
        if transition.state is FeedState.RECONNECTING or (
            transition.state is FeedState.CONNECTING and transition.previous is FeedState.BACKOFF
        ):
            RECONNECTS.labels(SERVICE).inc()


def _credentials(settings: IngestSettings) -> ExchangeCredentials | None:
    values = (settings.coinbase_api_key, settings.coinbase_api_secret, settings.coinbase_api_passphrase)
    if settings.feed != FEED_EXCHANGE or not all(values):
        return None
    key, secret, passphrase = (v.get_secret_value() for v in values if v is not None)
    return ExchangeCredentials(key=key, secret_b64=secret, passphrase=passphrase)
