"""What a stream service supplies to the runtime: a :class:`StreamTask` over :class:`InRecord` s."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from quotewatch.core.clock import Clock
from quotewatch.core.records import DeadLetter, Record
from quotewatch.core.runtime.deadletter import Rejection, dead_letter

V = TypeVar("V", bound=Record)
V_co = TypeVar("V_co", bound=Record, covariant=True)
V_contra = TypeVar("V_contra", bound=Record, contravariant=True)


@dataclass(frozen=True, slots=True)
class InRecord(Generic[V_co]):
    """A consumed record: the typed value, the bytes it was decoded from and its coordinates.

    ``raw`` and the coordinates are what a dead letter needs (:meth:`dead_letter`): the record is
    never encoded again to reject it, so the dead letter carries exactly the bytes consumed.
    """

    topic: str
    partition: int
    offset: int
    key: str | None
    value: V_co
    """The record of the topic's value schema (:mod:`quotewatch.core.records`)."""
    timestamp_ms: int
    raw: bytes = b""
    """The value's bytes as consumed (framing + Avro body)."""
    replaying: bool = False
    """True while state is being rebuilt from already-committed input (outputs are discarded)."""

    def rejection(self) -> Rejection:
        """This record's coordinates and original bytes, as a dead letter carries them."""
        value = self.value
        return Rejection(
            topic=self.topic,
            value=self.raw,
            partition=self.partition,
            offset=self.offset,
            key=self.key.encode() if self.key is not None else None,
            timestamp_ns=self.timestamp_ms * 1_000_000 if self.timestamp_ms > 0 else None,
            exchange=getattr(value, "exchange", None),
            symbol=getattr(value, "symbol", None),
        )

    def dead_letter(self, service: str, clock: Clock, error: BaseException) -> DeadLetter:
        """The ``DeadLetter`` of this record: its original bytes, key and coordinates, and ``error``."""
        return dead_letter(service, clock, self.rejection(), error)


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to produce: the topic's catalog schema encodes ``value`` (its generated class)."""

    topic: str
    key: str
    value: Record


class StreamTask(Protocol[V_contra]):
    """The processing logic of a stream service. Who calls it: the
    :class:`~quotewatch.core.runtime.processor.StreamProcessor`, from one thread.

    ``V_contra`` is the union of the value classes of the task's input topics.
    """

    def process(self, record: InRecord[V_contra]) -> Iterable[OutRecord]:
        """Process one record (called in offset order per partition) and return its outputs.

        What an exception means (:mod:`quotewatch.core.errors`): a
        :class:`~quotewatch.core.errors.RetriableError` rewinds the batch and retries it after a
        backoff; a :class:`~quotewatch.core.errors.FatalError` ends the service (non-zero exit);
        any other exception dead-letters the record and the loop carries on with the next one.
        """
        ...

    def restart_offset(self, topic: str, partition: int) -> int | None:
        """The earliest offset of ``topic[partition]`` from which re-processing rebuilds the current
        state, or None when the state needs nothing before the next offset. Called at each commit."""
        ...

    def reset(self, topic: str, partition: int) -> None:
        """Forget all state derived from ``topic[partition]`` (revoked, or about to be replayed)."""
        ...
