"""A local WebSocket server speaking both Coinbase market-data protocols, with fault injection.

Coinbase cannot be reached from the build machines, so the ingest is tested against this server
over real sockets with real message formats. It honours subscribe semantics: only subscribed
channels and products are sent, the book snapshot comes first, a connection without a subscribe
within ``subscribe_timeout`` seconds is closed (Coinbase does the same after 5 s), heartbeats are
sent once a second on the heartbeat channel. In Coinbase's order: Advanced Trade confirms a
``level2`` subscription (the ``subscriptions`` message) only *after* the products' snapshots (the
2026 capture has the acknowledgement at sequence 24, after a 5.1 MB and a 2.5 MB snapshot);
Exchange confirms first. With ``cdp_public_key`` (``--require-jwt``) every Advanced subscribe must
carry a valid CDP API key JWT (:func:`~quotewatch.domain.venue.coinbase_auth.verify_cdp_websocket_jwt`),
else it is refused with an ``error`` message.

Sources (:mod:`.sources`): the synthetic market (every connection gets a snapshot of the current
book on subscribing, then the live batches) or a capture replayed from its start for each
connection (Advanced ``sequence_num`` renumbered per connection).

Faults (:class:`FaultPlan`) apply to the first ``connections`` connections (0 = all), counting
frames sent on the connection: drop the TCP connection, go silent, skip a sequence number (drop
one book update; Advanced only), send a malformed (truncated) frame in place of a book update,
delay frames, send snapshots slowly in fragments (a slow link), send odd control frames
(:class:`~.connection.FaultPlan`).

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
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from quotewatch.domain.simulation.synthetic import SyntheticBatch, SyntheticMarket
from quotewatch.domain.venue import coinbase_messages as msgs
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FEED_EXCHANGE, JsonMessage
from quotewatch.domain.venue.coinbase_auth import EXCHANGE_SIGNATURE_PATH, verify_cdp_websocket_jwt
from quotewatch.domain.venue.coinbase_messages import TradePrint
from quotewatch.services.feed_server.connection import (
    Connection,
    ConnectionStats,
    FaultPlan,
    Item,
    SlowConsumerError,
    advanced_heartbeat,
    advanced_l2,
    advanced_subscriptions,
    advanced_trades,
    fixed,
)
from quotewatch.services.feed_server.retime import shifted
from quotewatch.services.feed_server.sources import (
    CaptureSource,
    FeedServerError,
    SyntheticSource,
    capture_source,
    classify,
    event_time,
    parse_speed,
    renumber,
)

logger = logging.getLogger(__name__)

Protocol = Literal["advanced", "exchange"]
PROTOCOL_FEEDS = {"advanced": FEED_ADVANCED, "exchange": FEED_EXCHANGE}

ADVANCED_CHANNELS = frozenset({"level2", "heartbeats", "market_trades", "ticker", "candles"})
EXCHANGE_CHANNELS = frozenset({"level2", "level2_batch", "matches", "heartbeat", "ticker"})
EXCHANGE_AUTH_CHANNELS = frozenset({"level2"})
_BOOK_CHANNELS = frozenset({"level2", "level2_batch"})


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
        cdp_public_key: str | None = None,
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
        if cdp_public_key is not None and protocol != "advanced":
            raise FeedServerError("--require-jwt needs --protocol advanced (CDP API keys are Advanced Trade's)")
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
        self.cdp_public_key = cdp_public_key
        """PEM public key of the CDP API key every Advanced subscribe must be signed with (None: no auth)."""
        self.max_queue = max_queue
        self.connections: list[ConnectionStats] = []
        self._live: set[Connection] = set()
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
            except SlowConsumerError as exc:
                logger.warning("dropping a slow consumer", extra={"connection": conn.stats.number, "why": str(exc)})
                conn.stats.closed = f"slow consumer: {exc}"
                conn.ws.transport.abort()
                self._live.discard(conn)

    def _enqueue_batch(self, conn: Connection, market: SyntheticMarket, batch: SyntheticBatch) -> None:
        symbol = batch.symbol
        if self.protocol == "advanced":
            if batch.trades and conn.wants("market_trades", symbol):
                trades = batch.trades
                conn.enqueue(Item(partial(advanced_trades, batch.ts_ns, trades, "update")))
            if batch.changes and conn.wants("level2", symbol):
                changes = batch.changes
                conn.enqueue(
                    Item(
                        partial(advanced_l2, batch.ts_ns, symbol, "update", changes),
                        book_update=True,
                    )
                )
        else:
            if batch.trades and conn.wants("matches", symbol):
                for trade in batch.trades:
                    text = msgs.exchange_match(trade, market.next_exchange_sequence(symbol))
                    conn.enqueue(Item(fixed(text)))
            book = conn.book_channel
            if batch.changes and book and conn.wants(book, symbol):
                text = msgs.exchange_l2update(symbol, batch.changes, batch.ts_ns)
                conn.enqueue(Item(fixed(text), book_update=True))

    def _synthetic_snapshot(self, conn: Connection, symbol: str) -> None:
        market = self.market
        assert market is not None
        bids, asks = market.book_levels(symbol)
        now = market.now_ns
        if self.protocol == "advanced":
            levels = [("BID", p, s) for p, s in bids] + [("ASK", p, s) for p, s in asks]
            conn.enqueue(Item(partial(advanced_l2, now, symbol, "snapshot", levels), snapshot=True))
        else:
            text = msgs.exchange_snapshot(symbol, bids, asks, now)
            conn.enqueue(Item(fixed(text), snapshot=True))

    # -- connections --------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        number = next(self._numbers)
        faulted = self.faults.any and (self.faults.connections == 0 or number <= self.faults.connections)
        stats = ConnectionStats(number=number, remote=str(ws.remote_address), faulted=faulted)
        self.connections.append(stats)
        source = self.source
        shift = source.shift_at(time.time_ns()) if isinstance(source, CaptureSource) else 0
        conn = Connection(
            ws,
            stats,
            self.faults,
            advanced=self.protocol == "advanced",
            max_queue=self.max_queue,
            capture_shift_ns=shift,
        )
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
        except SlowConsumerError as exc:
            stats.closed = f"slow consumer: {exc}"
        finally:
            self._live.discard(conn)
            for task in (sender, conn.replay, conn.heartbeats):
                if task is not None:
                    task.cancel()
            if stats.dropped:
                stats.closed = "dropped (fault)"
            logger.info("connection closed", extra={"connection": number, "why": stats.closed})

    def _on_message(self, conn: Connection, raw: str | bytes) -> None:
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
                self._advanced_request(message, conn)
                if self.protocol == "advanced"
                else self._exchange_request(message)
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
        advanced = self.protocol == "advanced"
        replaying = isinstance(self.source, CaptureSource) and conn.replay is not None
        if advanced and not replaying:
            # Coinbase's order: a level2 subscription is acknowledged after its snapshots.
            conn.unacked_book.update(new_book)
        else:
            self._send_subscriptions(conn)  # Exchange acknowledges first
        if "market_trades" in requested and advanced:
            now = self._now_ns(conn)
            conn.enqueue(Item(partial(advanced_trades, now, [], "snapshot")))
        self._live.add(conn)
        conn.subscribed.set()
        if isinstance(self.source, SyntheticSource):
            for product in new_book:
                self._synthetic_snapshot(conn, product)
            conn.unacked_book.difference_update(new_book)
        elif conn.replay is None and conn.book_channel is not None:
            conn.replay = asyncio.create_task(self._replay(conn, self.source))
        if advanced and not replaying and (not conn.unacked_book or not new_book):
            self._send_subscriptions(conn)
        if conn.heartbeats is None and (
            "heartbeats" in conn.stats.subscriptions or "heartbeat" in conn.stats.subscriptions
        ):
            conn.heartbeats = asyncio.create_task(self._heartbeats(conn))

    def _advanced_request(self, message: JsonMessage, conn: Connection) -> dict[str, list[str]]:
        if self.cdp_public_key is not None:
            try:
                verify_cdp_websocket_jwt(message.get("jwt"), self.cdp_public_key, now_seconds=int(time.time()))
            except ValueError as exc:
                conn.stats.auth_failures.append(str(exc))
                logger.warning("refusing a subscribe: %s", exc, extra={"connection": conn.stats.number})
                raise FeedServerError(f"authentication failed: {exc}") from None
            conn.stats.authenticated += 1
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

    def _exchange_request(self, message: JsonMessage) -> dict[str, list[str]]:
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

    def _check_exchange_auth(self, message: JsonMessage) -> None:
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

    def _error(self, conn: Connection, message: str, reason: str) -> None:
        if self.protocol == "advanced":
            text = orjson.dumps({"type": "error", "message": f"{message}: {reason}"}).decode()
        else:
            text = msgs.exchange_error(message, reason)
        conn.enqueue(Item(fixed(text), consumes_sequence=False))

    def _send_subscriptions(self, conn: Connection) -> None:
        """Queue the ``subscriptions`` message (Advanced: book products without their snapshot left out)."""
        if self.protocol == "advanced":
            subs = {k: [p for p in v if p not in conn.unacked_book] for k, v in conn.stats.subscriptions.items()}
            ts = self._now_ns(conn)
            acked = {k: v for k, v in subs.items() if v}
            conn.enqueue(Item(partial(advanced_subscriptions, ts, acked), control=True))
        else:
            subs = {k: list(v) for k, v in conn.stats.subscriptions.items()}
            conn.enqueue(Item(fixed(msgs.exchange_subscriptions(subs)), control=True))

    def _now_ns(self, conn: Connection) -> int:
        """Exchange time now: the market's clock, or the replayed capture's clock."""
        if isinstance(self.source, SyntheticSource):
            market = self.source.market
            return market.now_ns if market is not None else time.time_ns()
        return conn.capture_clock_ns or self.source.first_exchange_ns + conn.capture_shift_ns

    async def _heartbeats(self, conn: Connection) -> None:
        counter = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            counter += 1
            ts = self._heartbeat_time(conn)
            if self.protocol == "advanced":
                conn.enqueue(Item(partial(advanced_heartbeat, ts, counter), control=True))
            else:
                market = self.market
                for product in conn.products("heartbeat"):
                    sequence = market.next_exchange_sequence(product) if market else counter
                    last_trade = market.last_trade_id(product) if market else 0
                    text = msgs.exchange_heartbeat(product, sequence, last_trade, ts)
                    conn.enqueue(Item(fixed(text), control=True))

    def _heartbeat_time(self, conn: Connection) -> int:
        if isinstance(self.source, SyntheticSource):
            return self._now_ns(conn)
        # Capture replay: the capture's clock, moved on by the wall time since the last frame.
        base = conn.capture_clock_ns or self.source.first_exchange_ns + conn.capture_shift_ns
        return base + time.monotonic_ns() - conn.capture_clock_at

    # -- capture replay -----------------------------------------------------------------------

    async def _replay(self, conn: Connection, source: CaptureSource) -> None:
        capture = source.capture
        started = time.monotonic()
        first_ns = capture.recv_ns[0]
        advanced = self.protocol == "advanced"
        for index, (line, message) in enumerate(zip(capture.lines, source.messages, strict=True)):
            channel, products, book_update = classify(message, advanced)
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
            event_ns = event_time(message)
            if event_ns is not None:
                conn.capture_clock_ns = event_ns
                conn.capture_clock_at = time.monotonic_ns()
            if advanced:
                snapshots = _snapshot_products(message)
                conn.enqueue(Item(partial(renumber, message), book_update=book_update, snapshot=bool(snapshots)))
                if conn.unacked_book and snapshots:
                    conn.unacked_book.difference_update(snapshots)
                    if not conn.unacked_book:
                        self._send_subscriptions(conn)
            elif shift:
                conn.enqueue(Item(fixed(orjson.dumps(message).decode()), book_update=book_update))
            else:
                conn.enqueue(Item(fixed(line), book_update=book_update))
        if conn.unacked_book:  # the capture has no snapshot of some product: acknowledge at its end
            conn.unacked_book.clear()
            self._send_subscriptions(conn)
        conn.stats.replay_finished = True
        logger.info("capture replay finished", extra={"connection": conn.stats.number, "frames": len(capture.lines)})


def _snapshot_products(message: Any) -> set[str]:
    """The products an Advanced ``l2_data`` message carries a snapshot of."""
    if not isinstance(message, dict) or message.get("channel") != "l2_data":
        return set()
    events = message.get("events") or ()
    return {
        e["product_id"]
        for e in events
        if isinstance(e, dict) and e.get("type") == "snapshot" and isinstance(e.get("product_id"), str)
    }


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
    "parse_speed",
    "serve_in_thread",
]
