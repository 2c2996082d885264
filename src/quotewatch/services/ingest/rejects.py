"""A frame the Normaliser rejected -> its dead letter, the same for both Normaliser drivers.

The live ingest (:mod:`~quotewatch.services.ingest.writer`, before the frame has a Kafka offset)
and ``INGEST_SOURCE=topic`` (:mod:`~quotewatch.services.ingest.topic_mode`, re-normalising
``md.raw``) reject the same frames for the same reasons; both map them here onto the one
dead-letter mapper (:mod:`quotewatch.core.runtime.deadletter`).
"""

from __future__ import annotations

from quotewatch.core.clock import Clock
from quotewatch.core.records import DeadLetter
from quotewatch.core.runtime.deadletter import Rejection, dead_letter
from quotewatch.domain.venue.coinbase import FrameError
from quotewatch.domain.venue.normaliser import Reject

SERVICE = "ingest"
MAX_FRAME_BYTES = 8 * 1024 * 1024
"""A rejected frame's text is kept up to this many bytes (a frame too large to log is rejected too)."""


def reject_dead_letter(
    clock: Clock,
    reject: Reject,
    *,
    topic: str,
    partition: int = -1,
    offset: int = -1,
    key: bytes | None = None,
) -> DeadLetter:
    """The dead letter of ``reject``: the frame's text, ``topic`` (the raw log) and its coordinates
    there (-1 while the frame is not logged yet), ``connection_id:frame_index``, the reason."""
    raw = reject.raw
    rejection = Rejection(
        topic=topic,
        value=raw.text.encode()[:MAX_FRAME_BYTES],
        partition=partition,
        offset=offset,
        key=key,
        timestamp_ns=raw.ts_init,
        ref=reject.source_ref,
        exchange=raw.exchange,
        symbol=reject.symbol,
    )
    return dead_letter(SERVICE, clock, rejection, FrameError(reject.reason, book_affected=False), reject.error_type)
