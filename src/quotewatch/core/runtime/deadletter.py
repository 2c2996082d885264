"""The one dead-letter mapper: a rejection -> a ``DeadLetter`` record with its coordinates.

Every caller that rejects input maps it here: the stream processor (a record that does not
decode or that its task rejects), the lake sink (a record that does not decode or fit its file
schema) and both Normaliser drivers (the live ingest writer and ``INGEST_SOURCE=topic``). So a
dead letter always says the same things the same way: the original bytes, topic, partition and
offset (-1 when the input never was a Kafka record), key, source timestamp, a reference inside
the source (e.g. ``connection:frame``), and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Message

from quotewatch.core.clock import Clock
from quotewatch.core.records import DeadLetter

REASON_MAX_CHARS = 4000
"""A reason longer than this is cut (an exception message can embed a whole payload)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """What was rejected and where it came from (the coordinates a dead letter carries)."""

    topic: str
    """The source topic (for the ingest: the raw topic the frame is logged to)."""
    value: bytes
    """The original bytes, never re-encoded."""
    partition: int = -1
    offset: int = -1
    key: bytes | None = None
    timestamp_ns: int | None = None
    """The source's time (a consumed record's timestamp, a frame's ``ts_init``), else now."""
    ref: str = ""
    """Where inside the source (``connection_id:frame_index`` for a feed frame), or empty."""
    exchange: str | None = None
    symbol: str | None = None

    @classmethod
    def of_message(cls, message: Message) -> Rejection:
        """The coordinates of a consumed Kafka message."""
        _, timestamp_ms = message.timestamp()
        partition, offset = message.partition(), message.offset()
        return cls(
            topic=message.topic() or "",
            value=message.value() or b"",
            partition=partition if partition is not None else -1,
            offset=offset if offset is not None else -1,
            key=message.key(),
            timestamp_ns=timestamp_ms * 1_000_000 if timestamp_ms and timestamp_ms > 0 else None,
        )


def dead_letter(
    service: str, clock: Clock, rejection: Rejection, error: BaseException, error_type: str | None = None
) -> DeadLetter:
    """The ``DeadLetter`` of ``rejection``: its bytes and coordinates, and why (``error``).

    ``error_type`` defaults to the class name of ``error``; the reason is ``str(error)`` (or the
    class name when empty), cut at :data:`REASON_MAX_CHARS`.
    """
    reason = str(error) or type(error).__name__
    now = clock.now_ns()
    return DeadLetter(
        ts_event=rejection.timestamp_ns if rejection.timestamp_ns is not None else now,
        ts_init=now,
        exchange=rejection.exchange,
        symbol=rejection.symbol,
        service=service,
        source_topic=rejection.topic,
        source_partition=rejection.partition,
        source_offset=rejection.offset,
        source_ref=rejection.ref,
        source_key=rejection.key,
        source_value=rejection.value,
        error_type=error_type if error_type is not None else type(error).__name__,
        reason=reason[:REASON_MAX_CHARS],
    )
