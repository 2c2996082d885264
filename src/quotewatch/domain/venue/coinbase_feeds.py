"""The two Coinbase feeds as the ingest meets them: which parser reads a frame, what to subscribe.

See :mod:`quotewatch.domain.venue.coinbase` for the protocols themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from quotewatch.domain.venue.coinbase import ADVANCED, EXCHANGE, FEED_ADVANCED, FEED_EXCHANGE, FEEDS, JsonMessage
from quotewatch.domain.venue.coinbase_advanced import parse_advanced_message
from quotewatch.domain.venue.coinbase_auth import ExchangeCredentials, exchange_signature
from quotewatch.domain.venue.coinbase_exchange import parse_exchange_message

PARSERS: Final = {FEED_ADVANCED: parse_advanced_message, FEED_EXCHANGE: parse_exchange_message}


def detect_feed(message: Any) -> str | None:
    """Which protocol a decoded message speaks: Advanced messages have ``channel``, Exchange ``type``."""
    if isinstance(message, dict):
        if "channel" in message:
            return FEED_ADVANCED
        if "type" in message:
            return FEED_EXCHANGE
    return None


def subscribe_messages(
    feed: str,
    symbols: Sequence[str],
    *,
    credentials: ExchangeCredentials | None = None,
    timestamp: str | None = None,
    jwt: Callable[[], str] | None = None,
) -> list[JsonMessage]:
    """The subscribe messages to send after connecting, in order.

    Advanced Trade takes one channel per message (``level2``, ``heartbeats``, ``market_trades``);
    with ``jwt`` (a CDP API key), each message carries a fresh token from it (Coinbase's JWTs live
    two minutes). Exchange takes one message for all channels: ``level2_batch`` + ``matches`` +
    ``heartbeat``, or the authenticated ``level2`` instead of ``level2_batch`` when ``credentials``
    are given (then ``timestamp``, seconds since the epoch as a string, is signed).
    """
    products = list(symbols)
    if feed == FEED_ADVANCED:
        return [_advanced("subscribe", channel, products, jwt) for channel in ADVANCED.channels]
    if feed != FEED_EXCHANGE:
        raise ValueError(f"unknown feed {feed!r}; one of {', '.join(FEEDS)}")
    channels = list(EXCHANGE.channels)
    message: JsonMessage = {"type": "subscribe", "product_ids": products, "channels": channels}
    if credentials is not None:
        if timestamp is None:
            raise ValueError("an authenticated subscribe needs the signing timestamp")
        channels[0] = "level2"
        message.update(
            {
                "signature": exchange_signature(credentials.secret_b64, timestamp),
                "key": credentials.key,
                "passphrase": credentials.passphrase,
                "timestamp": timestamp,
            }
        )
    return [message]


def book_resubscribe_messages(symbols: Sequence[str], *, jwt: Callable[[], str] | None = None) -> list[JsonMessage]:
    """Advanced Trade: unsubscribe, then subscribe again, the ``level2`` channel of ``symbols``.

    The server answers the subscribe with a fresh snapshot of each product: a per-product resync
    that leaves the connection's other products alone.
    """
    products = list(symbols)
    return [_advanced(kind, ADVANCED.channels[0], products, jwt) for kind in ("unsubscribe", "subscribe")]


def _advanced(kind: str, channel: str, products: list[str], jwt: Callable[[], str] | None) -> JsonMessage:
    message: JsonMessage = {"type": kind, "product_ids": products, "channel": channel}
    if jwt is not None:
        message["jwt"] = jwt()
    return message
