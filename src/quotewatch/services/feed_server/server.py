"""A local WebSocket server speaking both Coinbase market-data protocols, with fault injection.

Coinbase cannot be reached from the build machines, so the ingest is tested against this server
over real sockets with real message formats. It honours subscribe semantics: only subscribed
channels and products are sent, the book snapshot comes first, a connection without a subscribe
within ``subscribe_timeout`` seconds is closed (Coinbase does the same after 5 s), heartbeats are
sent once a second on the heartbeat channel.

Sources:

- :class:`SyntheticSource`: one shared :class:`~quotewatch.domain.simulation.synthetic.SyntheticMarket`
  advanced with the wall clock (event time = wall time from the server start); every
  connection gets a snapshot of the current book on subscribing, then the live batches.
- :class:`CaptureSource`: a recorded capture replayed from its start for each connection, at the
  original pace, x N, or as fast as possible (Advanced ``sequence_num`` renumbered per connection),
  with its original exchange timestamps (default) or moved to the connection's start
  (``--timestamps now``, :mod:`quotewatch.services.feed_server.retime`).

Faults (:class:`FaultPlan`) apply to the first ``connections`` connections (0 = all), counting
frames sent on the connection: drop the TCP connection, go silent, skip a sequence number (drop
one book update; Advanced only), send a malformed (truncated) frame in place of a book update,
delay frames.

Usable in-process (``await FeedServer(...).start()``, :func:`serve_in_thread`) and from the CLI
(``quotewatch feed serve``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from quotewatch.domain.simulation.synthetic import SyntheticBatch, SyntheticConfig, SyntheticMarket
from quotewatch.domain.venue import coinbase_messages as msgs
from quotewatch.domain.venue.captures import Capture, read_capture
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FEED_EXCHANGE, parse_time_ns
from quotewatch.domain.venue.coinbase_auth import EXCHANGE_SIGNATURE_PATH
from quotewatch.domain.venue.coinbase_messages import TradePrint
from quotewatch.services.feed_server.retime import TIMESTAMPS, Timestamps, first_exchange_time, shift_for, shifted

logger = logging.getLogger(__name__)

Protocol = Literal["advanced", "exchange"]
PROTOCOL_FEEDS = {"advanced": FEED_ADVANCED, "exchange": FEED_EXCHANGE}

ADVANCED_CHANNELS = frozenset({"level2", "heartbeats", "market_trades", "ticker", "candles"})
EXCHANGE_CHANNELS = frozenset({"level2", "level2_batch", "matches", "heartbeat", "ticker"})
EXCHANGE_AUTH_CHANNELS = frozenset({"level2"})
_BOOK_CHANNELS = frozenset({"level2", "level2_batch"})


class FeedServerError(ValueError):
    """The server was configured in a way it cannot honour."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject, counted in frames sent on a connection."""

    drop_after: int | None = None
    """Abort the TCP connection (no close frame) after this many frames."""
    silent_after: int | None = None
    """Send nothing more (the socket stays open) after this many frames."""
    skip_sequence_after: int | None = None
    """Advanced: after this many frames, drop the next book update (its sequence_num is consumed)."""
    malformed_after: int | None = None
    """After this many frames, replace the next book update by its truncated text."""
    delay_after: int | None = None
    """After this many frames, hold each of the next ``delay_frames`` frames back for ``delay_ms``."""
    delay_ms: int = 0
    delay_frames: int = 1
    connections: int = 1
    """Faults apply to the first N connections; 0 = every connection."""

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (
                self.drop_after,
                self.silent_after,
                self.skip_sequence_after,
                self.malformed_after,
                self.delay_after,
            )
        )


@dataclass
class ConnectionStats:
    """What happened on one connection (read by tests and logged on close)."""

    number: int
    remote: str
    faulted: bool
    subscriptions: dict[str, list[str]] = field(default_factory=dict)
    subscribe_messages: int = 0
    frames_sent: int = 0
    book_updates_sent: int = 0
    skipped_sequences: list[int] = field(default_factory=list)
    malformed_sent: int = 0
    delayed: int = 0
    silent: bool = False
    dropped: bool = False
    replay_finished: bool = False
    """Capture replay: every frame of the capture has been queued for this connection."""
    closed: str | None = None


@dataclass(slots=True)
class _Item:
    """One message waiting to be sent to one connection (rendered late: Advanced sequence numbers
    are per connection)."""

    render: Callable[[int], str]
    """sequence_num -> text (Exchange renderers ignore it)."""
    book_update: bool = False
    consumes_sequence: bool = True


class _Connection:
    """Per-connection state: subscriptions, the outgoing queue, sequence numbers, faults."""

    def __init__(self, server: FeedServer, ws: ServerConnection, stats: ConnectionStats, faults: FaultPlan) -> None:
        self.server = server
        self.ws = ws
        self.stats = stats
        self.faults = faults if stats.faulted else FaultPlan()
        self.queue: deque[_Item] = deque()
        self.wakeup = asyncio.Event()
        self.sequence = 0
        self.subscribed = asyncio.Event()
        self.replay: asyncio.Task[None] | None = None
        self.heartbeats: asyncio.Task[None] | None = None
        self._skipped = False
        self._malformed = False
        self.capture_clock_ns = 0
        """Capture replay: event time of the last frame queued (heartbeats are stamped from it)."""
        self.capture_clock_at = time.monotonic_ns()
        source = server.source
        self.capture_shift_ns = source.shift_at(time.time_ns()) if isinstance(source, CaptureSource) else 0
        """Capture replay: added to every recorded exchange time (``--timestamps now``), else 0."""

    # -- subscriptions ------------------------------------------------------------------------

    def products(self, channel: str) -> list[str]:
        return self.stats.subscriptions.get(channel, [])

    def wants(self, channel: str, product: str | None = None) -> bool:
        products = self.stats.subscriptions.get(channel)
        return products is not None and (product is None or product in products)

    @property
    def book_channel(self) -> str | None:
        for name in ("level2", "level2_batch"):
            if name in self.stats.subscriptions:
                return name
        return None

    # -- sending ------------------------------------------------------------------------------

    def enqueue(self, item: _Item) -> None:
        if len(self.queue) >= self.server.max_queue:
            # Coinbase drops consumers that cannot keep up; so does this server.
            raise _SlowConsumerError(f"{len(self.queue)} messages queued")
        self.queue.append(item)
        self.wakeup.set()

    async def sender(self) -> None:
        """Send queued items in order, applying the connection's faults, until the connection closes."""
        with contextlib.suppress(ConnectionClosed):
            await self._send_loop()

    async def _send_loop(self) -> None:
        faults = self.faults
        stats = self.stats
        advanced = self.server.protocol == "advanced"
        while True:
            while not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            item = self.queue.popleft()
            sent = stats.frames_sent
            if stats.silent:
                continue
            if faults.silent_after is not None and sent >= faults.silent_after:
                stats.silent = True
                logger.info("fault: going silent", extra={"connection": stats.number, "frames": sent})
                continue
            if (
                item.book_update
                and advanced
                and not self._skipped
                and faults.skip_sequence_after is not None
                and sent >= faults.skip_sequence_after
            ):
                self._skipped = True
                stats.skipped_sequences.append(self.sequence)
                self.sequence += 1
                logger.info("fault: skipping a sequence number", extra={"connection": stats.number})
                continue
            text = item.render(self.sequence)
            if item.consumes_sequence:
                self.sequence += 1
            if (
                item.book_update
                and not self._malformed
                and faults.malformed_after is not None
                and sent >= faults.malformed_after
            ):
                self._malformed = True
                stats.malformed_sent += 1
                text = text[: max(1, len(text) // 2)]
                logger.info("fault: sending a malformed frame", extra={"connection": stats.number})
            if (
                faults.delay_after is not None
                and sent >= faults.delay_after
                and stats.delayed < faults.delay_frames
                and faults.delay_ms > 0
            ):
                stats.delayed += 1
                await asyncio.sleep(faults.delay_ms / 1000)
            await self.ws.send(text)
            stats.frames_sent += 1
            if item.book_update:
                stats.book_updates_sent += 1
            if faults.drop_after is not None and stats.frames_sent >= faults.drop_after:
                stats.dropped = True
                logger.info("fault: dropping the connection", extra={"connection": stats.number})
                self.ws.transport.abort()
                return


class _SlowConsumerError(Exception):
    pass


class SyntheticSource:
    """The shared synthetic market, advanced with the wall clock in batch steps."""

    def __init__(self, config: SyntheticConfig, max_updates: int | None = None) -> None:
        self.config = config
        self.max_updates = max_updates
        self.market: SyntheticMarket | None = None
        self._started_wall_ns = 0

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.config.symbols

    def create(self, wall_ns: int) -> SyntheticMarket:
        # Event time = wall time: the market starts now, so its timestamps look live.
        self.market = SyntheticMarket(SyntheticConfig(**{**self.config.__dict__, "start_ns": wall_ns}))
        self._started_wall_ns = wall_ns
        return self.market

    @property
    def exhausted(self) -> bool:
        return (
            self.market is not None and self.max_updates is not None and self.market.level_updates >= self.max_updates
        )


class CaptureSource:
    """A recorded capture, replayed per connection.

    Args:
        speed: None = as fast as possible; 1.0 = original pace; N = N times faster.
        timestamps: ``original`` (the default: exchange times as recorded) or ``now`` (moved so
            that each connection's replay starts at its own wall-clock start; :mod:`.retime`).
    """

    def __init__(self, capture: Capture, speed: float | None, timestamps: Timestamps = "original") -> None:
        if timestamps not in TIMESTAMPS:
            raise FeedServerError(f"--timestamps must be one of {', '.join(TIMESTAMPS)}, not {timestamps!r}")
        self.capture = capture
        self.speed = speed
        self.timestamps: Timestamps = timestamps
        self._messages = [_decode(line) for line in capture.lines]
        first = first_exchange_time(self._messages)
        self.first_exchange_ns = first if first is not None else (capture.recv_ns[0] if capture.recv_ns else 0)
        """The capture's first exchange time (its first receive time if no message has one)."""

    def shift_at(self, wall_ns: int) -> int:
        """The offset added to every exchange time of a connection that starts at ``wall_ns``."""
        return shift_for(wall_ns, self.first_exchange_ns) if self.timestamps == "now" else 0

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.capture.symbols


def _decode(line: str) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


class FeedServer:
    """The Coinbase-protocol WebSocket server. ``await start()``, read ``port``, ``await stop()``."""

    def __init__(
        self,
        protocol: Protocol,
        source: SyntheticSource | CaptureSource,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        subscribe_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        exchange_api_secret: str | None = None,
        max_queue: int = 100_000,
    ) -> None:
        if protocol not in PROTOCOL_FEEDS:
            raise FeedServerError(f"unknown protocol {protocol!r}; advanced or exchange")
        faults = faults or FaultPlan()
        if faults.skip_sequence_after is not None and protocol != "advanced":
            raise FeedServerError(
                "skip-sequence needs --protocol advanced: Exchange level2 messages carry no sequence number, "
                "so a skipped one could not be detected by any client"
            )
        if isinstance(source, CaptureSource) and PROTOCOL_FEEDS[protocol] != source.capture.feed:
            raise FeedServerError(
                f"{source.capture.path.name} is a {source.capture.feed} capture; serve it with the matching --protocol"
            )
        self.protocol: Protocol = protocol
        self.source = source
        self.host = host
        self._requested_port = port
        self.faults = faults
        self.subscribe_timeout = subscribe_timeout
        self.heartbeat_interval = heartbeat_interval
        self.exchange_api_secret = exchange_api_secret
        self.max_queue = max_queue
        self.connections: list[ConnectionStats] = []
        self._live: set[_Connection] = set()
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._numbers = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the feed server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def market(self) -> SyntheticMarket | None:
        return self.source.market if isinstance(self.source, SyntheticSource) else None

    async def start(self) -> FeedServer:
        """Bind and start serving (and, for a synthetic source, start the market)."""
        self._server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            compression=None,
            max_size=2**20,
            ping_interval=None,
        )
        if isinstance(self.source, SyntheticSource):
            self.source.create(time.time_ns())
            self._ticker = asyncio.create_task(self._synthetic_ticker(self.source))
        logger.info("feed server listening", extra={"url": self.url, "protocol": self.protocol})
        return self

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- the synthetic market -----------------------------------------------------------------

    async def _synthetic_ticker(self, source: SyntheticSource) -> None:
        market = source.market
        assert market is not None
        batch_s = market.config.batch_ns / 1e9
        while True:
            await asyncio.sleep(batch_s)
            if source.exhausted:
                continue
            # Every generated batch is in the market's book, so every one is broadcast.
            for batch in market.advance(time.time_ns()):
                self._broadcast(batch)

    def _broadcast(self, batch: SyntheticBatch) -> None:
        market = self.market
        assert market is not None
        for conn in list(self._live):
            try:
                self._enqueue_batch(conn, market, batch)
            except _SlowConsumerError as exc:
                logger.warning("dropping a slow consumer", extra={"connection": conn.stats.number, "why": str(exc)})
                conn.stats.closed = f"slow consumer: {exc}"
                conn.ws.transport.abort()
                self._live.discard(conn)

    def _enqueue_batch(self, conn: _Connection, market: SyntheticMarket, batch: SyntheticBatch) -> None:
        symbol = batch.symbol
        if self.protocol == "advanced":
            if batch.trades and conn.wants("market_trades", symbol):
                trades = batch.trades
                conn.enqueue(_Item(partial(_advanced_trades, batch.ts_ns, trades, "update")))
            if batch.changes and conn.wants("level2", symbol):
                changes = batch.changes
                conn.enqueue(
                    _Item(
                        partial(_advanced_l2, batch.ts_ns, symbol, "update", changes),
                        book_update=True,
                    )
                )
        else:
            if batch.trades and conn.wants("matches", symbol):
                for trade in batch.trades:
                    text = msgs.exchange_match(trade, market.next_exchange_sequence(symbol))
                    conn.enqueue(_Item(_fixed(text)))
            book = conn.book_channel
            if batch.changes and book and conn.wants(book, symbol):
                text = msgs.exchange_l2update(symbol, batch.changes, batch.ts_ns)
                conn.enqueue(_Item(_fixed(text), book_update=True))

    def _synthetic_snapshot(self, conn: _Connection, symbol: str) -> None:
        market = self.market
        assert market is not None
        bids, asks = market.book_levels(symbol)
        now = market.now_ns
        if self.protocol == "advanced":
            levels = [("BID", p, s) for p, s in bids] + [("ASK", p, s) for p, s in asks]
            conn.enqueue(_Item(partial(_advanced_l2, now, symbol, "snapshot", levels)))
        else:
            text = msgs.exchange_snapshot(symbol, bids, asks, now)
            conn.enqueue(_Item(_fixed(text)))

    # -- connections --------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        number = next(self._numbers)
        faulted = self.faults.any and (self.faults.connections == 0 or number <= self.faults.connections)
        stats = ConnectionStats(number=number, remote=str(ws.remote_address), faulted=faulted)
        self.connections.append(stats)
        conn = _Connection(self, ws, stats, self.faults)
        sender = asyncio.create_task(conn.sender())
        logger.info("connection opened", extra={"connection": number, "faulted": faulted})
        deadline = asyncio.get_running_loop().time() + self.subscribe_timeout
        try:
            while True:
                timeout = None
                if not conn.subscribed.is_set():
                    timeout = max(0.0, deadline - asyncio.get_running_loop().time())
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout)
                except TimeoutError:
                    stats.closed = "no subscribe within the subscribe timeout"
                    await ws.close(1008, "subscribe timeout")
                    return
                self._on_message(conn, raw)
                if sender.done():
                    return
        except ConnectionClosed as exc:
            stats.closed = stats.closed or f"closed by the client: {exc.rcvd.code if exc.rcvd else 'abnormal'}"
        except _SlowConsumerError as exc:
            stats.closed = f"slow consumer: {exc}"
        finally:
            self._live.discard(conn)
            for task in (sender, conn.replay, conn.heartbeats):
                if task is not None:
                    task.cancel()
            if stats.dropped:
                stats.closed = "dropped (fault)"
            logger.info("connection closed", extra={"connection": number, "why": stats.closed})

    def _on_message(self, conn: _Connection, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._error(conn, "Malformed JSON", "the message is not JSON")
            return
        if not isinstance(message, dict) or message.get("type") not in ("subscribe", "unsubscribe"):
            self._error(conn, "Failed to subscribe", "type must be subscribe or unsubscribe")
            return
        conn.stats.subscribe_messages += 1
        try:
            requested = (
                self._advanced_request(message) if self.protocol == "advanced" else self._exchange_request(message)
            )
        except FeedServerError as exc:
            self._error(conn, "Failed to subscribe", str(exc))
            return
        if message["type"] == "unsubscribe":
            for channel, products in requested.items():
                left = [p for p in conn.products(channel) if p not in products] if products else []
                if left:
                    conn.stats.subscriptions[channel] = left
                else:
                    conn.stats.subscriptions.pop(channel, None)
            self._send_subscriptions(conn)
            return
        new_book: list[str] = []
        for channel, products in requested.items():
            current = conn.stats.subscriptions.setdefault(channel, [])
            for product in products:
                if product not in current:
                    current.append(product)
                    if channel in _BOOK_CHANNELS:
                        new_book.append(product)
        self._send_subscriptions(conn)
        if "market_trades" in requested and self.protocol == "advanced":
            now = self._now_ns(conn)
            conn.enqueue(_Item(partial(_advanced_trades, now, [], "snapshot")))
        self._live.add(conn)
        conn.subscribed.set()
        if isinstance(self.source, SyntheticSource):
            for product in new_book:
                self._synthetic_snapshot(conn, product)
        elif conn.replay is None and conn.book_channel is not None:
            conn.replay = asyncio.create_task(self._replay(conn, self.source))
        if conn.heartbeats is None and (
            "heartbeats" in conn.stats.subscriptions or "heartbeat" in conn.stats.subscriptions
        ):
            conn.heartbeats = asyncio.create_task(self._heartbeats(conn))

    def _advanced_request(self, message: dict[str, Any]) -> dict[str, list[str]]:
        channel = message.get("channel")
        if not isinstance(channel, str):
            raise FeedServerError("one channel per subscribe message: 'channel' must be a string")
        if channel not in ADVANCED_CHANNELS:
            raise FeedServerError(f"unknown channel {channel!r}")
        products = message.get("product_ids") or []
        if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
            raise FeedServerError("product_ids must be a list of strings")
        if channel == "heartbeats":
            return {"heartbeats": ["heartbeats"]}
        if not products and message["type"] == "subscribe":
            raise FeedServerError(f"{channel} needs product_ids")
        self._check_products(products)
        return {channel: products}

    def _exchange_request(self, message: dict[str, Any]) -> dict[str, list[str]]:
        default_products = message.get("product_ids") or []
        channels = message.get("channels")
        if not isinstance(channels, list) or not channels:
            raise FeedServerError("channels must be a non-empty list")
        requested: dict[str, list[str]] = {}
        for channel in channels:
            if isinstance(channel, str):
                name, products = channel, default_products
            elif isinstance(channel, dict) and isinstance(channel.get("name"), str):
                name, products = channel["name"], channel.get("product_ids") or default_products
            else:
                raise FeedServerError(f"invalid channel {channel!r:.60}")
            if name not in EXCHANGE_CHANNELS:
                raise FeedServerError(f"unknown channel {name!r}")
            if name in EXCHANGE_AUTH_CHANNELS and message["type"] == "subscribe":
                self._check_exchange_auth(message)
            if not isinstance(products, list) or not products or not all(isinstance(p, str) for p in products):
                raise FeedServerError(f"{name} needs product_ids")
            self._check_products(products)
            requested[name] = list(products)
        return requested

    def _check_exchange_auth(self, message: dict[str, Any]) -> None:
        fields = [message.get(k) for k in ("key", "signature", "timestamp", "passphrase")]
        if not all(isinstance(f, str) and f for f in fields):
            raise FeedServerError("level2 requires authentication: key, signature, timestamp and passphrase")
        if self.exchange_api_secret is not None:
            expected = base64.b64encode(
                hmac.new(
                    base64.b64decode(self.exchange_api_secret),
                    f"{message['timestamp']}GET{EXCHANGE_SIGNATURE_PATH}".encode(),
                    hashlib.sha256,
                ).digest()
            ).decode()
            if not hmac.compare_digest(expected, message["signature"]):
                raise FeedServerError("invalid signature")

    def _check_products(self, products: list[str]) -> None:
        unknown = [p for p in products if p not in self.source.symbols]
        if unknown:
            raise FeedServerError(f"unknown product ids {unknown}; this server has {list(self.source.symbols)}")

    def _error(self, conn: _Connection, message: str, reason: str) -> None:
        if self.protocol == "advanced":
            text = orjson.dumps({"type": "error", "message": f"{message}: {reason}"}).decode()
        else:
            text = msgs.exchange_error(message, reason)
        conn.enqueue(_Item(_fixed(text), consumes_sequence=False))

    def _send_subscriptions(self, conn: _Connection) -> None:
        subs = {k: list(v) for k, v in conn.stats.subscriptions.items()}
        if self.protocol == "advanced":
            ts = self._now_ns(conn)
            conn.enqueue(_Item(partial(_advanced_subscriptions, ts, subs)))
        else:
            text = msgs.exchange_subscriptions(subs)
            conn.enqueue(_Item(_fixed(text)))

    def _now_ns(self, conn: _Connection) -> int:
        """Exchange time now: the market's clock, or the replayed capture's clock."""
        if isinstance(self.source, SyntheticSource):
            market = self.source.market
            return market.now_ns if market is not None else time.time_ns()
        return conn.capture_clock_ns or self.source.first_exchange_ns + conn.capture_shift_ns

    async def _heartbeats(self, conn: _Connection) -> None:
        counter = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            counter += 1
            ts = self._heartbeat_time(conn)
            if self.protocol == "advanced":
                conn.enqueue(_Item(partial(_advanced_heartbeat, ts, counter)))
            else:
                market = self.market
                for product in conn.products("heartbeat"):
                    sequence = market.next_exchange_sequence(product) if market else counter
                    last_trade = market.last_trade_id(product) if market else 0
                    text = msgs.exchange_heartbeat(product, sequence, last_trade, ts)
                    conn.enqueue(_Item(_fixed(text)))

    def _heartbeat_time(self, conn: _Connection) -> int:
        if isinstance(self.source, SyntheticSource):
            return self._now_ns(conn)
        # Capture replay: the capture's clock, moved on by the wall time since the last frame.
        base = conn.capture_clock_ns or self.source.first_exchange_ns + conn.capture_shift_ns
        return base + time.monotonic_ns() - conn.capture_clock_at

    # -- capture replay -----------------------------------------------------------------------

    async def _replay(self, conn: _Connection, source: CaptureSource) -> None:
        capture = source.capture
        started = time.monotonic()
        first_ns = capture.recv_ns[0]
        advanced = self.protocol == "advanced"
        for index, (line, message) in enumerate(zip(capture.lines, source._messages, strict=True)):
            channel, products, book_update = _classify(message, advanced)
            if channel == "level2_batch":
                channel = conn.book_channel or channel  # Exchange: level2 (authenticated) gets the same messages
            if channel is None:
                continue
            wanted = any(conn.wants(channel, p) for p in products) if products else conn.wants(channel)
            if not wanted:
                continue
            if source.speed is not None:
                due = started + (capture.recv_ns[index] - first_ns) / 1e9 / source.speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % 200 == 0:
                await asyncio.sleep(0)
            while len(conn.queue) > 1000:
                await asyncio.sleep(0.001)
            shift = conn.capture_shift_ns
            if shift:
                message = shifted(message, shift)
            event_ns = _event_time(message)
            if event_ns is not None:
                conn.capture_clock_ns = event_ns
                conn.capture_clock_at = time.monotonic_ns()
            if advanced:
                conn.enqueue(_Item(partial(_renumber, message), book_update=book_update))
            elif shift:
                conn.enqueue(_Item(_fixed(orjson.dumps(message).decode()), book_update=book_update))
            else:
                conn.enqueue(_Item(_fixed(line), book_update=book_update))
        conn.stats.replay_finished = True
        logger.info("capture replay finished", extra={"connection": conn.stats.number, "frames": len(capture.lines)})


# Renderers: sequence_num last, so ``partial`` binds everything else.


def _fixed(text: str) -> Callable[[int], str]:
    def render(_sequence: int) -> str:
        return text

    return render


def _advanced_l2(ts_ns: int, symbol: str, kind: str, changes: list[msgs.Change], sequence: int) -> str:
    return msgs.advanced_l2(sequence, ts_ns, symbol, kind, changes, ts_ns)


def _advanced_trades(ts_ns: int, trades: list[TradePrint], kind: str, sequence: int) -> str:
    return msgs.advanced_trades(sequence, ts_ns, trades, kind=kind)


def _advanced_subscriptions(ts_ns: int, subscriptions: dict[str, list[str]], sequence: int) -> str:
    return msgs.advanced_subscriptions(sequence, ts_ns, subscriptions)


def _advanced_heartbeat(ts_ns: int, counter: int, sequence: int) -> str:
    return msgs.advanced_heartbeat(sequence, ts_ns, counter)


def _classify(message: Any, advanced: bool) -> tuple[str | None, list[str], bool]:
    """(subscription channel, products, is a book update) of a captured message; channel None = never replayed.

    An empty product list means "not per product" (ticker/candles are matched on the channel alone).
    """
    if not isinstance(message, dict):
        return None, [], False
    if advanced:
        channel = message.get("channel")
        events = [e for e in message.get("events") or () if isinstance(e, dict)]
        if channel == "l2_data":
            products = [e["product_id"] for e in events if isinstance(e.get("product_id"), str)]
            return "level2", products, any(e.get("type") == "update" for e in events)
        if channel == "market_trades":
            trades = [t for e in events for t in e.get("trades") or () if isinstance(t, dict)]
            return "market_trades", [t["product_id"] for t in trades if isinstance(t.get("product_id"), str)], False
        if channel in ("ticker", "candles"):
            return str(channel), [], False
        return None, [], False  # subscriptions and heartbeats are the server's own
    kind = message.get("type")
    product = message.get("product_id")
    products = [product] if isinstance(product, str) else []
    if kind in ("snapshot", "l2update"):
        return "level2_batch", products, kind == "l2update"
    if kind in ("match", "last_match"):
        return "matches", products, False
    if kind == "ticker":
        return "ticker", products, False
    return None, [], False


def _renumber(message: dict[str, Any], sequence: int) -> str:
    return orjson.dumps({**message, "sequence_num": sequence}).decode()


def _event_time(message: Any) -> int | None:
    if not isinstance(message, dict):
        return None
    for key in ("timestamp", "time"):
        value = message.get(key)
        if isinstance(value, str):
            try:
                return parse_time_ns(value)
            except ValueError:
                return None
    return None


# -- running the server --------------------------------------------------------------------------


class RunningFeedServer:
    """A :class:`FeedServer` on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, server: FeedServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="feed-server", daemon=True)

    def start(self) -> RunningFeedServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (consistent reads of the market and stats)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    @property
    def url(self) -> str:
        return str(self.call(lambda: self.server.url))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


@contextlib.contextmanager
def serve_in_thread(server: FeedServer) -> Iterator[RunningFeedServer]:
    """Run ``server`` in a background thread for the duration of the block."""
    running = RunningFeedServer(server).start()
    try:
        yield running
    finally:
        running.stop()


def capture_source(path: Path | str, speed: str, timestamps: str = "original") -> CaptureSource:
    """A capture source from a file, a ``--speed`` value (``max``, ``1x`` or ``Nx``) and ``--timestamps``.

    Raises:
        FeedServerError: the speed or the timestamps mode is not one of those.
    """
    if timestamps not in TIMESTAMPS:
        raise FeedServerError(f"--timestamps must be one of {', '.join(TIMESTAMPS)}, not {timestamps!r}")
    return CaptureSource(read_capture(path), parse_speed(speed), timestamps)  # type: ignore[arg-type]  # checked above


def parse_speed(speed: str) -> float | None:
    if speed == "max":
        return None
    text = speed.removesuffix("x")
    try:
        value = float(text)
    except ValueError:
        raise FeedServerError(f"--speed must be max, 1x or Nx, not {speed!r}") from None
    if value <= 0:
        raise FeedServerError("--speed must be positive")
    return value


__all__ = [
    "CaptureSource",
    "ConnectionStats",
    "FaultPlan",
    "FeedServer",
    "FeedServerError",
    "RunningFeedServer",
    "SyntheticSource",
    "TradePrint",
    "capture_source",
    "serve_in_thread",
]
