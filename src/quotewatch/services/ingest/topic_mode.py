"""``INGEST_SOURCE=topic``: re-normalise ``<prefix>.md.raw`` into ``<prefix>.md.events``, exactly-once.

Replays and backtests run the normaliser over the stored raw log with the core
:class:`~quotewatch.core.processor.StreamProcessor` (one Kafka transaction per batch: events,
dead letters and input offsets together). Because the raw log holds every input of the
normaliser (frames and control records, with their ``ts_init`` and exchange-time estimates), the
events are byte for byte those the live ingest wrote.
"""

from __future__ import annotations

from collections.abc import Iterator

from quotewatch.core.clock import Clock
from quotewatch.core.kafka import dead_letter
from quotewatch.core.processor import InRecord, OutRecord
from quotewatch.core.records import RawFrame
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.coinbase import FrameError
from quotewatch.domain.venue.normaliser import Normaliser

SERVICE = "ingest"


class NormaliseTask:
    """StreamTask: one raw record in, its MarketEvents (and dead letters) out.

    State: the normaliser's, which a CONNECTED record resets. ``restart_offset`` is therefore the
    offset of the latest CONNECTED record (or the first record seen): re-processing from there
    rebuilds the state exactly.
    """

    def __init__(self, topics: TopicNames, clock: Clock) -> None:
        self._topics = topics
        self._clock = clock
        self._normaliser = Normaliser()
        self._restart: int | None = None

    def process(self, record: InRecord[RawFrame]) -> Iterator[OutRecord]:
        raw = record.value
        if raw.kind == "CONNECTED" or self._restart is None:
            self._restart = record.offset
        out = self._normaliser.process(raw)
        for event in out.events:
            yield OutRecord(self._topics.md_events, event.symbol, event)
        for reject in out.rejects:
            letter = dead_letter(
                service=SERVICE,
                clock=self._clock,
                error=FrameError(reject.reason, book_affected=False),
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                source_value=raw.text.encode(),
                source_timestamp_ns=raw.ts_init,
                source_ref=reject.source_ref,
                exchange=raw.exchange,
                symbol=reject.symbol,
                error_type=reject.error_type,
            )
            yield OutRecord(self._topics.dlq, record.topic, letter)

    def restart_offset(self, topic: str, partition: int) -> int | None:
        return self._restart

    def reset(self, topic: str, partition: int) -> None:
        self._normaliser.reset()
        self._restart = None
