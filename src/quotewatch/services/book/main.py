"""``quotewatch run book``: <prefix>.md.events -> <prefix>.book.top3 + <prefix>.features, exactly-once.

A thin shell around :class:`quotewatch.domain.market.book_pipeline.BookPipeline` (the same code the
backtest runs): :class:`BookTask` feeds it each decoded MarketEvent with its offset and turns the
closed ticks into output records; :func:`quotewatch.core.service.run_stream_service` does the
consuming, producing, transactions and recovery.

**Delivery.** Exactly-once (see :class:`quotewatch.core.runtime.StreamProcessor`): each consumed
batch is one Kafka transaction holding its BookTop and FeatureVector records, its dead letters
and its input offsets. **Recovery.** At each commit the processor stores
:meth:`BookTask.restart_offset` (per partition: the earliest offset from which the symbols'
books, features, time and feed state are rebuilt, normally the current epoch's snapshot) in the
offset metadata; after a crash it replays from there with outputs discarded, so a restarted
service emits exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import click

from quotewatch.core.clock import Clock
from quotewatch.core.config import BookSettings, load_settings
from quotewatch.core.errors import ConfigError
from quotewatch.core.records import MarketEvent
from quotewatch.core.runtime import InRecord, OutRecord
from quotewatch.core.service import run_stream_service, service_context
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import BookPipeline, MarketEventError, TickOutput
from quotewatch.domain.market.features import FeatureState

logger = logging.getLogger(__name__)

SERVICE = "book"


class BookTask:
    """The book service's :class:`~quotewatch.core.runtime.StreamTask`.

    Who calls it: the StreamProcessor, from one thread, in offset order per partition.
    """

    def __init__(self, topics: TopicNames, tick_ms: int, clock: Clock) -> None:
        self.topics = topics
        self.pipeline = BookPipeline(tick_ms)
        self._clock = clock
        self._symbols_of: dict[tuple[str, int], set[str]] = {}

    def process(self, record: InRecord[MarketEvent]) -> Iterable[OutRecord]:
        """Feed one MarketEvent to its symbol's pipeline; return the ticks it closed.

        A bad event (a missing body, a book change the book cannot apply) is re-raised for the
        dead-letter topic after the valid ticks it closed are handed over in the same call.
        """
        event = record.value
        self._symbols_of.setdefault((record.topic, record.partition), set()).add(event.symbol)
        try:
            ticks = self.pipeline.process(event, record.offset)
        except MarketEventError as exc:
            if not exc.outputs:
                raise
            # The ticks the event closed before its bad part are valid: emit them, and dead-letter
            # the event ourselves in the same transaction (raising would discard the ticks).
            logger.warning(
                "dead-lettering a market event after emitting the %d ticks it closed: %s",
                len(exc.outputs),
                exc,
                extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
            )
            out = self._records(event.symbol, exc.outputs)
            # The dead letter carries the bytes consumed and their coordinates (nothing re-encoded).
            out.append(OutRecord(self.topics.dlq, record.topic, record.dead_letter(SERVICE, self._clock, exc)))
            return out
        return self._records(event.symbol, ticks)

    def _records(self, key: str, ticks: list[TickOutput]) -> list[OutRecord]:
        out: list[OutRecord] = []
        for tick in ticks:
            out.append(OutRecord(self.topics.book_top3, key, tick.book_top))
            if tick.features is not None:
                out.append(OutRecord(self.topics.features, key, tick.features))
        return out

    def restart_offset(self, topic: str, partition: int) -> int | None:
        """The earliest offset of ``topic[partition]`` that rebuilds every symbol's state there."""
        symbols = self._symbols_of.get((topic, partition))
        return self.pipeline.restart_position(symbols) if symbols else None

    def reset(self, topic: str, partition: int) -> None:
        """Forget the symbols of ``topic[partition]`` (revoked, or about to be replayed)."""
        symbols = self._symbols_of.pop((topic, partition), set())
        self.pipeline.drop(symbols)


@click.command("book")
def command() -> None:
    """Order book + features per symbol on the TICK_MS event-time grid (exactly-once)."""
    settings = load_settings(BookSettings)
    try:
        FeatureState(settings.tick_ms)
    except ValueError as exc:  # TICK_MS must divide the feature windows
        raise ConfigError(str(exc)) from exc
    with service_context(SERVICE, settings) as context:
        task = BookTask(context.topics, settings.tick_ms, context.clock)
        # Exactly-once: each consumed batch of md.events is one transaction with its BookTop and
        # FeatureVector records, its dead letters and its input offsets (+ restart offsets in the
        # offset metadata), so a crash neither loses nor duplicates a tick for read_committed readers.
        run_stream_service(context, task, [context.topics.md_events], exactly_once=True)
