"""One feed connection of the ingest: its state machine, socket, subscribes and watchdog.

The ingest spreads its products over several connections (``PRODUCTS_PER_CONNECTION``); each
:class:`FeedConnection` carries one group of products (its *slot*) and has its own
:class:`~quotewatch.services.ingest.state_machine.ConnectionStateMachine`, reconnects, overflow
handling and resyncs. All of them write into the one record queue, so the raw log interleaves
their records; every record carries its connection id and its group of products, and the
normaliser keeps a state per connection.

Timeouts. Before the subscription is confirmed, ``SUBSCRIBE_TIMEOUT_SECONDS`` is the longest
*silence* allowed (every byte received resets it, a fragment of a large frame included: Coinbase
confirms ``level2`` only after its multi-megabyte snapshots, which a slow link takes a while to
download), and ``SUBSCRIBE_MAX_SECONDS`` caps the whole wait. Once subscribed,
``HEARTBEAT_TIMEOUT_SECONDS`` of silence is a dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from quotewatch.core.clock import Clock
from quotewatch.core.config import IngestSettings
from quotewatch.core.metrics import RECORDS_IN
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FrameError, JsonMessage
from quotewatch.domain.venue.coinbase_auth import ExchangeCredentials
from quotewatch.domain.venue.coinbase_feeds import PARSERS, book_resubscribe_messages, subscribe_messages
from quotewatch.services.ingest.state_machine import ConnectionStateMachine, FeedState, Transition
from quotewatch.services.ingest.writer import SERVICE, IngestStats, QueueItem, RecordQueue

logger = logging.getLogger(__name__)

_SUBSCRIPTION_PROBE_BYTES = 64 * 1024


class ByteWatchingConnection(ClientConnection):
    """A client connection that reports every chunk of bytes received (the watchdog's sign of life)."""

    on_bytes: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.on_bytes is not None:
            self.on_bytes()
        super().data_received(data)


class SessionEndedError(Exception):
    """Why a connection attempt or session ended."""

    def __init__(self, reason: str, *, subscribed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subscribed = subscribed


class FeedConnection:
    """One connection slot: connect, subscribe, read, reconnect, until the service stops.

    Who calls it: :class:`~quotewatch.services.ingest.service.IngestService` runs :meth:`run` as
    one task per slot on its event loop and calls :meth:`request_stop`, :meth:`resync` and
    :meth:`clock_tick` from that loop.
    """

    def __init__(
        self,
        slot: int,
        symbols: list[str],
        *,
        settings: IngestSettings,
        url: str,
        clock: Clock,
        records: RecordQueue,
        stats: IngestStats,
        on_transition: Callable[[Transition], None],
        rng: random.Random | None = None,
        credentials: ExchangeCredentials | None = None,
        jwt: Callable[[], str] | None = None,
    ) -> None:
        self.slot = slot
        self.symbols = symbols
        self.settings = settings
        self.feed = settings.feed
        self.url = url
        self._clock = clock
        self._records = records
        self.stats = stats
        self._credentials = credentials
        self._jwt = jwt
        self.machine = ConnectionStateMachine(
            backoff_initial_seconds=settings.backoff_initial_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
            backoff_reset_seconds=settings.backoff_reset_seconds,
            monotonic_ns=clock.monotonic_ns,
            rng=rng,
            on_transition=on_transition,
            reconnect_jitter_seconds=settings.reconnect_jitter_seconds,
        )
        self._stopping: asyncio.Event | None = None
        self._ws: ClientConnection | None = None
        self.connection_id = ""
        self._last_connection_id = ""
        self.clock_connection_id = ""
        """The connection of this slot's latest CONNECTED record queued (what its CLOCK records carry);
        set only once that record is on the queue, so no CLOCK carries an id ahead of its CONNECTED."""
        self._end_reason: str | None = None
        self._overflow: list[int] | None = None
        self._overflow_ticks = 0
        self._session_task: asyncio.Task[None] | None = None
        self._last_seen_ns = 0
        self._subscribed = False

    @property
    def connected(self) -> bool:
        return self._ws is not None

    # -- the connection loop ------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Connect, read and reconnect until ``stopping`` is set; the last record is the STOPPED one."""
        self._stopping = stopping
        machine = self.machine
        while not stopping.is_set():
            if machine.state in (FeedState.INIT, FeedState.BACKOFF):
                machine.connect(f"connecting to {self.url}")
            self._session_task = asyncio.create_task(self._session())
            try:
                await self._session_task
            except asyncio.CancelledError:
                if not stopping.is_set():
                    raise
                break
            except SessionEndedError as end:
                if stopping.is_set():
                    break
                if end.subscribed:
                    machine.lost(end.reason)
                    if machine.should_back_off():
                        machine.back_off(f"{machine.failures} short-lived connections in a row: {end.reason}")
                else:
                    machine.failed(end.reason)
                transition = machine.history[-1]
                # The loss (and the state it leads to) is in the raw log before anything that follows.
                await self._records.put_control(
                    "DISCONNECTED",
                    self._last_connection_id,
                    self.slot,
                    machine.state.value,
                    end.reason,
                    delay_seconds=round(transition.delay_seconds, 3),
                )
                if transition.delay_seconds > 0:
                    # BACKOFF after failures, or the jitter after a lost connection (no thundering herd).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), transition.delay_seconds)
        machine.stop("stop requested")
        await self._records.put_control(
            "DISCONNECTED", self._last_connection_id, self.slot, FeedState.STOPPED.value, "stop requested"
        )

    def request_stop(self, reason: str) -> None:
        """Close the socket (or cancel a connect in progress); :meth:`run` then ends."""
        if self._ws is not None:
            self.close(reason)
        elif self._session_task is not None:
            self._session_task.cancel()  # still connecting: nothing to close

    async def _session(self) -> None:
        """One connection: connect, subscribe, read until it ends (raises :class:`SessionEndedError`)."""
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
                create_connection=ByteWatchingConnection,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            raise SessionEndedError(
                f"connect to {self.url} failed: {type(exc).__name__}: {exc}", subscribed=False
            ) from None
        self._ws = ws
        self.connection_id = connection_id
        self.stats.connections += 1
        await self._records.put_control(
            "CONNECTED", connection_id, self.slot, self.machine.state.value, f"connected to {self.url}", url=self.url
        )
        # Not before: a tick during the handshake (or while the CONNECTED waited for room) still
        # belongs to the previous connection's stretch of the log.
        self.clock_connection_id = connection_id
        self._last_seen_ns = self._clock.monotonic_ns()
        if isinstance(ws, ByteWatchingConnection):
            ws.on_bytes = self._saw_bytes
        watchdog = asyncio.create_task(self._watchdog())
        frame_index = 0
        try:
            for message in self._subscribe_messages():
                await ws.send(orjson.dumps(message).decode())
            confirmed: set[str] = set()
            while True:
                received = await ws.recv()
                ts_init = self._records.stamp()
                self._last_seen_ns = self._clock.monotonic_ns()
                text = received if isinstance(received, str) else received.decode("utf-8", "replace")
                self.stats.frames += 1
                RECORDS_IN.labels(SERVICE, "websocket").inc()
                if self._overflow is not None:
                    self._overflow.append(frame_index)
                elif not self._records.offer(QueueItem("FRAME", text, connection_id, frame_index, ts_init, self.slot)):
                    self._start_overflow(frame_index)
                frame_index += 1
                if not self._subscribed:
                    confirmed.update(self._confirmations(text))
                    if confirmed.issuperset(self.symbols):
                        self._subscribed = True
                        self.machine.subscribed(f"book subscription confirmed for {', '.join(self.symbols)}")
        except ConnectionClosed as exc:
            raise SessionEndedError(
                self._end_reason or f"connection closed: {exc}", subscribed=self._subscribed
            ) from None
        except OSError as exc:
            raise SessionEndedError(self._end_reason or f"socket error: {exc}", subscribed=self._subscribed) from None
        finally:
            watchdog.cancel()
            self._ws = None
            self.connection_id = ""
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
            if self._overflow is not None:
                await self._record_overflow(connection_id)

    def _saw_bytes(self) -> None:
        self._last_seen_ns = self._clock.monotonic_ns()

    def _subscribe_messages(self) -> list[JsonMessage]:
        timestamp = str(int(self._clock.now_ns() // 1_000_000_000)) if self._credentials else None
        return subscribe_messages(
            self.feed, self.symbols, credentials=self._credentials, timestamp=timestamp, jwt=self._jwt
        )

    def _confirmations(self, text: str) -> tuple[str, ...]:
        """Symbols whose book subscription this frame confirms (only small frames are parsed here)."""
        if len(text) > _SUBSCRIPTION_PROBE_BYTES or "subscriptions" not in text:
            return ()
        try:
            return PARSERS[self.feed](orjson.loads(text)).confirmed
        except (orjson.JSONDecodeError, FrameError):
            return ()

    async def _watchdog(self) -> None:
        """Close the connection on silence: before the confirmation (and past the hard cap), and after it."""
        settings = self.settings
        started = self._clock.monotonic_ns()
        subscribe_silence_ns = int(settings.subscribe_timeout_seconds * 1e9)
        subscribe_cap_ns = int(settings.subscribe_max_seconds * 1e9)
        silence_ns = int(settings.heartbeat_timeout_seconds * 1e9)
        interval = min(0.1, settings.heartbeat_timeout_seconds / 10, settings.subscribe_timeout_seconds / 10)
        while True:
            await asyncio.sleep(interval)
            now = self._clock.monotonic_ns()
            silent_ns = now - self._last_seen_ns
            if not self._subscribed:
                if silent_ns > subscribe_silence_ns:
                    self.close(f"no subscription confirmed: silent for more than {settings.subscribe_timeout_seconds}s")
                    return
                if now - started > subscribe_cap_ns:
                    self.close(f"no subscription confirmed within {settings.subscribe_max_seconds}s")
                    return
            elif silent_ns > silence_ns:
                self.close(f"silent for more than {settings.heartbeat_timeout_seconds}s (watchdog)")
                return

    def close(self, reason: str) -> None:
        """Close the current connection (if any) for ``reason`` (the first reason given is kept)."""
        ws = self._ws
        if ws is None:
            return
        if self._end_reason is None:
            self._end_reason = reason
        logger.info("closing the connection", extra={"connection_id": self.connection_id, "reason": reason})
        asyncio.get_running_loop().create_task(ws.close(1000, reason[:100]))

    def resync(self, connection_id: str, reason: str, symbols: list[str]) -> None:
        """The normaliser lost continuity on ``connection_id``: resubscribe ``symbols``, or reconnect.

        With ``symbols`` (a bad event of those products in a multi-product frame), Advanced Trade
        resubscribes their ``level2`` channel on the same connection: fresh snapshots for them, the
        other products carry on. Otherwise (or on the Exchange feed) the connection is closed and the
        reconnect's snapshots rebuild every book of the slot.
        """
        ws = self._ws
        if connection_id != self.connection_id or ws is None:
            return
        if symbols and self.feed == FEED_ADVANCED:
            self.stats.product_resyncs += 1
            logger.info(
                "resubscribing the book of %s: %s",
                ", ".join(symbols),
                reason,
                extra={"connection_id": connection_id},
            )
            messages = [orjson.dumps(m).decode() for m in book_resubscribe_messages(symbols, jwt=self._jwt)]
            asyncio.get_running_loop().create_task(self._send_all(ws, messages))
            return
        self.stats.resyncs += 1
        self.close(f"resync: {reason}")

    @staticmethod
    async def _send_all(ws: ClientConnection, messages: list[str]) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):  # a closing connection resyncs anyway
            for text in messages:
                await ws.send(text)

    # -- overflow -------------------------------------------------------------------------------

    def _start_overflow(self, frame_index: int) -> None:
        """The queue is full: keep no more frames of this connection, close it, record the loss after."""
        self._overflow = [frame_index]
        self.stats.overflows += 1
        logger.warning(
            "queue full: the writer cannot keep up; resyncing",
            extra={"connection_id": self.connection_id, "frame_index": frame_index},
        )
        self.close(f"local buffer overflow at frame {frame_index}")

    async def _record_overflow(self, connection_id: str) -> None:
        """After an overflow: log, once the writer made room, which frames were not kept."""
        dropped = self._overflow or []
        self._overflow = None
        frames = [i for i in dropped if i >= 0]
        self.stats.dropped_frames += len(frames)
        span = f" (frame_index {frames[0]}..{frames[-1]})" if frames else ""
        limits = f"{self._records.maxsize} records or {self._records.max_bytes} bytes"
        text = (
            f"queue full ({limits}): {len(frames)} frames not logged{span}, {self._overflow_ticks} clock ticks skipped"
        )
        await self._records.put(QueueItem("OVERFLOW", text, connection_id, -1, self._records.stamp(), self.slot))

    def clock_tick(self) -> None:
        """Queue this slot's CLOCK record; a full queue is an overflow of this connection."""
        item = QueueItem("CLOCK", "tick", self.clock_connection_id, -1, self._records.stamp(), self.slot)
        if self._records.offer(item):
            return
        if self._ws is not None:
            # A full queue is an overflow whoever finds it; the session records it.
            if self._overflow is None:
                self._start_overflow(-1)
            self._overflow_ticks += 1
        else:
            logger.warning("queue full: a clock tick could not be queued", extra={"slot": self.slot})
