"""What the feed server serves: the synthetic market or a recorded capture; capture helpers.

- :class:`SyntheticSource`: one shared :class:`~quotewatch.domain.simulation.synthetic.SyntheticMarket`
  advanced with the wall clock (event time = wall time from the server start).
- :class:`CaptureSource`: a recorded capture replayed from its start for each connection, at the
  original pace, x N, or as fast as possible, with its original exchange timestamps (default) or
  moved to the connection's start (``--timestamps now``, :mod:`quotewatch.services.feed_server.retime`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from quotewatch.domain.simulation.synthetic import SyntheticConfig, SyntheticMarket
from quotewatch.domain.venue.captures import Capture, read_capture
from quotewatch.domain.venue.coinbase import JsonMessage, parse_time_ns
from quotewatch.services.feed_server.retime import TIMESTAMPS, Timestamps, first_exchange_time, shift_for


class FeedServerError(ValueError):
    """The server was configured in a way it cannot honour."""


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
        self.messages = [decode(line) for line in capture.lines]
        first = first_exchange_time(self.messages)
        self.first_exchange_ns = first if first is not None else (capture.recv_ns[0] if capture.recv_ns else 0)
        """The capture's first exchange time (its first receive time if no message has one)."""

    def shift_at(self, wall_ns: int) -> int:
        """The offset added to every exchange time of a connection that starts at ``wall_ns``."""
        return shift_for(wall_ns, self.first_exchange_ns) if self.timestamps == "now" else 0

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.capture.symbols


def decode(line: str) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def classify(message: Any, advanced: bool) -> tuple[str | None, list[str], bool]:
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


def renumber(message: JsonMessage, sequence: int) -> str:
    return orjson.dumps({**message, "sequence_num": sequence}).decode()


def event_time(message: Any) -> int | None:
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
