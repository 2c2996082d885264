"""The live ingest: Coinbase WebSocket -> ``qw.md.raw`` + ``qw.md.events`` (+ ``qw.dlq``).

Three parts, joined by one bounded queue (:class:`~quotewatch.services.ingest.writer.RecordQueue`):

- the **readers** (asyncio), one per connection
  (:class:`~quotewatch.services.ingest.connection.FeedConnection`): ``SYMBOLS`` are spread over
  connections of at most ``PRODUCTS_PER_CONNECTION`` products (Coinbase's advice), each with its
  own state machine, socket, subscribes and watchdog for silence and subscribe timeouts. A reader
  stamps every frame (``ts_init``) and puts it on the queue with ``put_nowait``: it never waits for
  the broker. The queue is bounded in records (INGEST_QUEUE_MAX) and in bytes of text
  (INGEST_QUEUE_MAX_BYTES), so a burst of large snapshots cannot take the process's memory. When
  the queue is full either way it stops accepting frames, closes its connection, and (once the
  writer has made room) records an OVERFLOW control record with the number and indexes of the
  frames it could not keep, then the DISCONNECTED record: the loss is in the log, the normaliser
  turns it into GAP events for that connection's products, and the reconnect's snapshots rebuild
  their books.
- the **clock**: every TICK_MS of wall time one CLOCK control record per connection goes on the
  queue. It carries the id of the connection whose CONNECTED record that slot queued last (also
  between connections and while the next one is still connecting): within one slot, every record
  from a CONNECTED up to the next CONNECTED carries that connection's id (only the DISCONNECTED of a
  failed connect attempt carries the attempt's own id), which is what a replay's search for a
  window's CONNECTED record relies on. With one connection (the default for up to 10 products)
  the log is exactly that; with several, their stretches interleave.
- the **writer** (a thread, :class:`~quotewatch.services.ingest.writer.RawWriter`): takes records
  in order, writes each to ``qw.md.raw`` (key = feed; one log for every connection), runs the
  :class:`~quotewatch.domain.venue.normaliser.Normaliser` over it and writes its events to
  ``qw.md.events`` (key = symbol) and its rejects to ``qw.dlq``. Control records get their
  ``ts_event`` here: the exchange-time estimate of their connection
  (:class:`~quotewatch.services.ingest.writer.ExchangeClock`). When the normaliser asks for a
  resync (sequence jump, a book frame lost to a parse error) the writer tells the connection, which
  reconnects for fresh snapshots, or resubscribes one product when only its event was bad.

Delivery: at-least-once into the broker, never silent loss. The producer is idempotent (acks=all,
retries without duplicates or reordering); a delivery failure after its retries is fatal (the
service exits non-zero rather than carry on with a hole). What is still in the local queue when the
process dies was never accepted: the next process's CONNECTED records mark the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable

from confluent_kafka import Producer

from quotewatch.core.clock import Clock
from quotewatch.core.config import IngestSettings
from quotewatch.core.errors import ConfigError, FatalError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import DeliveryTracker, make_producer
from quotewatch.core.metrics import FEED_STATE, RECONNECTS
from quotewatch.core.serde import AvroSerde
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FEED_EXCHANGE, FEED_SPECS
from quotewatch.domain.venue.coinbase_auth import CdpCredentials, CdpKeyError, ExchangeCredentials, cdp_websocket_jwt
from quotewatch.services.ingest.connection import FeedConnection
from quotewatch.services.ingest.state_machine import ConnectionStateMachine, FeedState, Transition
from quotewatch.services.ingest.writer import SERVICE, STOP, IngestStats, RawWriter, RecordQueue

logger = logging.getLogger(__name__)

__all__ = ["SERVICE", "IngestService", "product_groups"]


def product_groups(symbols: list[str], per_connection: int) -> list[list[str]]:
    """``symbols`` in order, cut into groups of at most ``per_connection`` (one connection each)."""
    return [symbols[i : i + per_connection] for i in range(0, len(symbols), per_connection)]


class IngestService:
    """The live ingest. ``await run()`` until :meth:`stop` (or a fatal error).

    Args:
        producer: injected for tests; default an idempotent producer from the settings.
        url: the WebSocket URL (default COINBASE_WS_URL, else the feed's public endpoint).
        rng: the random source of the reconnect jitter and backoff (injected for deterministic tests).
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
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.feed = settings.feed
        self.url = url or settings.coinbase_ws_url or FEED_SPECS[self.feed].url
        self.symbols = list(settings.symbols)
        self.groups = product_groups(self.symbols, settings.products_per_connection)
        self._clock = clock
        self._liveness = liveness
        self.stats = IngestStats()
        self._delivery = DeliveryTracker()
        self._producer = producer or make_producer(
            settings, f"{SERVICE}-{settings.instance_id}", on_delivery=self._delivery
        )
        self._records = RecordQueue(
            clock, settings.ingest_queue_max, lambda: self._writer.alive, settings.ingest_queue_max_bytes
        )
        self._writer = RawWriter(
            settings=settings,
            feed=self.feed,
            groups=self.groups,
            serde=serde,
            producer=self._producer,
            delivery=self._delivery,
            clock=clock,
            items=self._records.items,
            liveness=liveness,
            stats=self.stats,
            on_resync=self._resync_from_writer,
        )
        jwt = _cdp_jwt_factory(settings, clock)
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.connections = [
            FeedConnection(
                slot,
                group,
                settings=settings,
                url=self.url,
                clock=clock,
                records=self._records,
                stats=self.stats,
                on_transition=self._on_transition,
                rng=rng,
                credentials=_exchange_credentials(settings),
                jwt=jwt,
            )
            for slot, group in enumerate(self.groups)
        ]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        for state in FeedState:
            FEED_STATE.labels(SERVICE, state.value).set(len(self.connections) if state is FeedState.INIT else 0)

    @property
    def machine(self) -> ConnectionStateMachine:
        """The first connection's state machine (the only one with up to PRODUCTS_PER_CONNECTION products)."""
        return self.connections[0].machine

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
        readers = [asyncio.create_task(c.run(self._stopping)) for c in self.connections]
        try:
            await asyncio.gather(*readers)
        finally:
            for task in (ticker, watcher, *readers):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._records.put(STOP)
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
        for connection in self.connections:
            connection.request_stop(reason)

    async def _watch_writer(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if not self._writer.alive:
                self._request_stop("the writer stopped")
                return

    def _resync_from_writer(self, connection_id: str, reason: str, symbols: list[str]) -> None:
        """Called from the writer thread: the normaliser lost continuity on ``connection_id``."""
        if self._loop is None:
            return

        def resync() -> None:
            for connection in self.connections:
                if connection.connection_id == connection_id:
                    connection.resync(connection_id, reason, symbols)

        self._loop.call_soon_threadsafe(resync)

    async def _clock_ticker(self) -> None:
        tick_ns = self.settings.tick_ms * 1_000_000
        while True:
            now = self._clock.now_ns()
            await asyncio.sleep((tick_ns - now % tick_ns) / 1e9)
            for connection in self.connections:
                connection.clock_tick()

    # -- state machine hooks ------------------------------------------------------------------

    def _on_transition(self, transition: Transition) -> None:
        logger.info(
            "feed state %s -> %s",
            transition.previous.value,
            transition.state.value,
            extra={"reason": transition.reason, "delay_seconds": round(transition.delay_seconds, 3)},
        )
        FEED_STATE.labels(SERVICE, transition.previous.value).dec()
        FEED_STATE.labels(SERVICE, transition.state.value).inc()
        if transition.state is FeedState.RECONNECTING or (
            transition.state is FeedState.CONNECTING and transition.previous is FeedState.BACKOFF
        ):
            RECONNECTS.labels(SERVICE).inc()


def _exchange_credentials(settings: IngestSettings) -> ExchangeCredentials | None:
    values = (settings.coinbase_api_key, settings.coinbase_api_secret, settings.coinbase_api_passphrase)
    if settings.feed != FEED_EXCHANGE or not all(values):
        return None
    key, secret, passphrase = (v.get_secret_value() for v in values if v is not None)
    return ExchangeCredentials(key=key, secret_b64=secret, passphrase=passphrase)


def _cdp_jwt_factory(settings: IngestSettings, clock: Clock) -> Callable[[], str] | None:
    """A fresh Advanced Trade JWT per call (per subscribe message), or None without a CDP key.

    Raises:
        ConfigError: only one of the two variables is set, or the private key is not an EC PEM key.
    """
    name, pem = settings.coinbase_cdp_key_name, settings.coinbase_cdp_private_key
    if name is None and pem is None:
        return None
    if name is None or pem is None:
        raise ConfigError("set both COINBASE_CDP_KEY_NAME and COINBASE_CDP_PRIVATE_KEY, or neither")
    if settings.feed != FEED_ADVANCED:
        raise ConfigError("COINBASE_CDP_KEY_NAME/COINBASE_CDP_PRIVATE_KEY authenticate FEED=coinbase-advanced only")
    credentials = CdpCredentials(key_name=name.get_secret_value(), private_key_pem=pem.get_secret_value())
    try:
        key = credentials.private_key()
    except CdpKeyError as exc:
        raise ConfigError(str(exc)) from None

    def jwt() -> str:
        # Coinbase's JWTs live 2 minutes: one per subscribe message, with a random nonce.
        return cdp_websocket_jwt(
            credentials.key_name, key, now_seconds=clock.now_ns() // 1_000_000_000, nonce=secrets.token_hex(16)
        )

    return jwt
