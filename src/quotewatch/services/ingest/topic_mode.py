"""``INGEST_SOURCE=topic``: re-normalise ``<prefix>.md.raw`` into ``<prefix>.md.events``, exactly-once.

Replays and backtests run the normaliser over the stored raw log with the core
:class:`~quotewatch.core.runtime.StreamProcessor` (one Kafka transaction per batch: events,
dead letters and input offsets together). Because the raw log holds every input of the
normaliser (frames and control records, with their ``ts_init`` and exchange-time estimates), the
events are byte for byte those the live ingest wrote.
"""

from __future__ import annotations

from collections.abc import Iterator

from quotewatch.core.clock import Clock
from quotewatch.core.records import RawFrame
from quotewatch.core.runtime import InRecord, OutRecord
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.ingest.rejects import reject_dead_letter


class NormaliseTask:
    """StreamTask: one raw record in, its MarketEvents (and dead letters) out.

    State: the normaliser's, one per connection, which the connection's CONNECTED record starts
    afresh (the ingest may hold several connections at once, their records interleaved).
    ``restart_offset`` is therefore the offset of the earliest CONNECTED record among the
    connections the normaliser still keeps (or of a connection's first record when its CONNECTED
    was never seen): re-processing from there rebuilds every kept state exactly.
    """

    def __init__(self, topics: TopicNames, clock: Clock) -> None:
        self._topics = topics
        self._clock = clock
        self._normaliser = Normaliser()
        self._starts: dict[str, int] = {}
        """connection_id -> offset of its CONNECTED record (or its first record)."""
        self._first: int | None = None

    def process(self, record: InRecord[RawFrame]) -> Iterator[OutRecord]:
        raw = record.value
        if self._first is None:
            self._first = record.offset
        connection_id = raw.connection_id
        if raw.kind == "CONNECTED" or connection_id not in self._starts:
            self._starts[connection_id] = record.offset
        out = self._normaliser.process(raw)
        if raw.kind == "CONNECTED":
            kept = self._normaliser.connection_ids
            self._starts = {c: offset for c, offset in self._starts.items() if c in kept}
        for event in out.events:
            yield OutRecord(self._topics.md_events, event.symbol, event)
        for reject in out.rejects:
            letter = reject_dead_letter(
                self._clock, reject, topic=record.topic, partition=record.partition, offset=record.offset
            )
            yield OutRecord(self._topics.dlq, record.topic, letter)

    def restart_offset(self, topic: str, partition: int) -> int | None:
        kept = [offset for c, offset in self._starts.items() if c in self._normaliser.connection_ids]
        return min(kept) if kept else self._first

    def reset(self, topic: str, partition: int) -> None:
        self._normaliser.reset()
        self._starts = {}
        self._first = None
