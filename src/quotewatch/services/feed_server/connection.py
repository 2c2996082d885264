"""One connection of the feed server: its subscriptions, its outgoing queue, its faults; the renderers.

Messages are queued as :class:`Item` renderers and rendered when sent, because Advanced
``sequence_num`` counts the messages actually sent on the connection (a skipped one included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from quotewatch.domain.venue import coinbase_messages as msgs
from quotewatch.domain.venue.coinbase_messages import TradePrint

logger = logging.getLogger(__name__)


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
    bad_event_after: int | None = None
    """Advanced: after this many frames, the next book update also carries an event for another
    subscribed product whose price does not parse (one bad event in a multi-product frame)."""
    snapshot_fragment_ms: int = 0
    """A slow link: send each book snapshot as a fragmented message, one ``snapshot_fragment_bytes``
    fragment every this many ms (never silent longer, however long the whole snapshot takes)."""
    snapshot_fragment_bytes: int = 4096
    odd_control_frames: bool = False
    """Send subscription acks with an empty ``timestamp`` and an undocumented field, and heartbeats
    with an undocumented field (control frames a strict client would wrongly refuse)."""
    connections: int = 1
    """Faults apply to the first N connections; 0 = every connection."""

    @property
    def any(self) -> bool:
        return (
            self.snapshot_fragment_ms > 0
            or self.odd_control_frames
            or any(
                v is not None
                for v in (
                    self.drop_after,
                    self.silent_after,
                    self.skip_sequence_after,
                    self.malformed_after,
                    self.delay_after,
                    self.bad_event_after,
                )
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
    fragmented_snapshots: int = 0
    bad_event_product: str | None = None
    """The product whose event was made bad (``bad_event_after``)."""
    auth_failures: list[str] = field(default_factory=list)
    """Why subscribe messages were refused authentication (``--require-jwt``)."""
    authenticated: int = 0
    """Subscribe messages with a valid JWT."""
    closed: str | None = None


@dataclass(slots=True)
class Item:
    """One message waiting to be sent to one connection (rendered late: Advanced sequence numbers
    are per connection)."""

    render: Callable[[int], str]
    """sequence_num -> text (Exchange renderers ignore it)."""
    book_update: bool = False
    consumes_sequence: bool = True
    snapshot: bool = False
    control: bool = False
    """A subscriptions ack or a heartbeat (``odd_control_frames`` applies)."""


class Connection:
    """Per-connection state: subscriptions, the outgoing queue, sequence numbers, faults."""

    def __init__(
        self,
        ws: ServerConnection,
        stats: ConnectionStats,
        faults: FaultPlan,
        *,
        advanced: bool,
        max_queue: int,
        capture_shift_ns: int = 0,
    ) -> None:
        self.ws = ws
        self.advanced = advanced
        self.max_queue = max_queue
        self.stats = stats
        self.faults = faults if stats.faulted else FaultPlan()
        self.queue: deque[Item] = deque()
        self.wakeup = asyncio.Event()
        self.sequence = 0
        self.subscribed = asyncio.Event()
        self.replay: asyncio.Task[None] | None = None
        self.heartbeats: asyncio.Task[None] | None = None
        self._skipped = False
        self._malformed = False
        self._bad_event = False
        self.capture_clock_ns = 0
        """Capture replay: event time of the last frame queued (heartbeats are stamped from it)."""
        self.capture_clock_at = time.monotonic_ns()
        self.capture_shift_ns = capture_shift_ns
        """Capture replay: added to every recorded exchange time (``--timestamps now``), else 0."""
        self.unacked_book: set[str] = set()
        """Advanced: book products subscribed whose snapshot is not queued yet (not in acks until it is)."""

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

    def enqueue(self, item: Item) -> None:
        if len(self.queue) >= self.max_queue:
            # Coinbase drops consumers that cannot keep up; so does this server.
            raise SlowConsumerError(f"{len(self.queue)} messages queued")
        self.queue.append(item)
        self.wakeup.set()

    def _with_bad_event(self, text: str) -> str:
        """``text`` (one product's l2_data update) plus a bad event for another subscribed product."""
        message = orjson.loads(text)
        product = message["events"][0]["product_id"]
        others = [p for p in self.products("level2") if p != product]
        if not others:
            return text
        self._bad_event = True
        self.stats.bad_event_product = others[0]
        update = dict(message["events"][0]["updates"][0], price_level="not-a-price")
        message["events"].append({"type": "update", "product_id": others[0], "updates": [update]})
        logger.info("fault: a bad event for %s", others[0], extra={"connection": self.stats.number})
        return orjson.dumps(message).decode()

    async def sender(self) -> None:
        """Send queued items in order, applying the connection's faults, until the connection closes."""
        with contextlib.suppress(ConnectionClosed):
            await self._send_loop()

    async def _send_loop(self) -> None:
        faults = self.faults
        stats = self.stats
        advanced = self.advanced
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
            if (
                item.book_update
                and advanced
                and not self._bad_event
                and faults.bad_event_after is not None
                and sent >= faults.bad_event_after
            ):
                text = self._with_bad_event(text)
            if item.control and faults.odd_control_frames:
                text = _odd(text)
            if item.snapshot and faults.snapshot_fragment_ms > 0:
                stats.fragmented_snapshots += 1
                await self.ws.send(_fragments(text, faults.snapshot_fragment_bytes, faults.snapshot_fragment_ms))
            else:
                await self.ws.send(text)
            stats.frames_sent += 1
            if item.book_update:
                stats.book_updates_sent += 1
            if faults.drop_after is not None and stats.frames_sent >= faults.drop_after:
                stats.dropped = True
                logger.info("fault: dropping the connection", extra={"connection": stats.number})
                self.ws.transport.abort()
                return


class SlowConsumerError(Exception):
    pass


# -- renderers: sequence_num last, so ``partial`` binds everything else -----------------------------


def fixed(text: str) -> Callable[[int], str]:
    def render(_sequence: int) -> str:
        return text

    return render


def advanced_l2(ts_ns: int, symbol: str, kind: str, changes: list[msgs.Change], sequence: int) -> str:
    return msgs.advanced_l2(sequence, ts_ns, symbol, kind, changes, ts_ns)


def advanced_trades(ts_ns: int, trades: list[TradePrint], kind: str, sequence: int) -> str:
    return msgs.advanced_trades(sequence, ts_ns, trades, kind=kind)


def advanced_subscriptions(ts_ns: int, subscriptions: dict[str, list[str]], sequence: int) -> str:
    return msgs.advanced_subscriptions(sequence, ts_ns, subscriptions)


def advanced_heartbeat(ts_ns: int, counter: int, sequence: int) -> str:
    return msgs.advanced_heartbeat(sequence, ts_ns, counter)


def _odd(text: str) -> str:
    """A control frame as an odd but harmless server might send it (``odd_control_frames``)."""
    message = orjson.loads(text)
    if "timestamp" in message and message.get("channel") == "subscriptions":
        message["timestamp"] = ""
    message["x_undocumented"] = {"note": "a field no client knows"}
    return orjson.dumps(message).decode()


async def _fragments(text: str, size: int, interval_ms: int) -> AsyncIterator[str]:
    """``text`` in fragments of ``size`` characters, one every ``interval_ms`` (a slow link)."""
    for start in range(0, len(text), size):
        if start:
            await asyncio.sleep(interval_ms / 1000)
        yield text[start : start + size]
