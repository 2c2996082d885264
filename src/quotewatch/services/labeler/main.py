"""``quotewatch run labeler``: <prefix>.book.top3 -> <prefix>.labels, exactly-once.

A thin shell around :class:`quotewatch.domain.market.labels.Labeler` (the same code the backtest runs):
each BookTop at tick t + Δ yields the Label of tick t, flagged `synced_over_horizon` when both ticks share
a sync epoch.

**Delivery.** Exactly-once (see :class:`quotewatch.core.runtime.StreamProcessor`): each consumed
batch is one Kafka transaction holding its labels, its dead letters and its input offsets.
**Recovery.** :meth:`LabelerTask.restart_offset` is the offset of the oldest tick per partition
still waiting for its label; the processor stores it with each commit and, after a crash,
replays from there with outputs discarded, so no label is lost or duplicated.
"""

from __future__ import annotations

from collections.abc import Iterable

import click

from quotewatch.core.config import LabelerSettings, load_settings
from quotewatch.core.records import BookTop
from quotewatch.core.runtime import InRecord, OutRecord
from quotewatch.core.service import run_stream_service, service_context
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.labels import Labeler

SERVICE = "labeler"


class LabelerTask:
    """The labeler's :class:`~quotewatch.core.runtime.StreamTask`.

    Who calls it: the StreamProcessor, from one thread, in offset order per partition.
    """

    def __init__(self, topics: TopicNames, delta_ms: int, tick_ms: int) -> None:
        self.topics = topics
        self.labeler = Labeler(delta_ms, tick_ms)
        self._symbols_of: dict[tuple[str, int], set[str]] = {}

    def process(self, record: InRecord[BookTop]) -> Iterable[OutRecord]:
        """Feed one BookTop to its symbol's labeler; return the label it completes, if any.

        A BookTop the labeler rejects (older than the symbol's last tick, off the grid) raises
        and is dead-lettered by the processor; the state is unchanged.
        """
        top = record.value
        self._symbols_of.setdefault((record.topic, record.partition), set()).add(top.symbol)
        label = self.labeler.process(top, record.offset)
        return [] if label is None else [OutRecord(self.topics.labels, top.symbol, label)]

    def restart_offset(self, topic: str, partition: int) -> int | None:
        """Offset of the oldest tick of ``topic[partition]`` still waiting for its label."""
        symbols = self._symbols_of.get((topic, partition))
        return self.labeler.restart_position(symbols) if symbols else None

    def reset(self, topic: str, partition: int) -> None:
        """Forget the symbols of ``topic[partition]`` (revoked, or about to be replayed)."""
        self.labeler.drop(self._symbols_of.pop((topic, partition), set()))


@click.command("labeler")
def command() -> None:
    """y(t) for the DELTA_MS horizon from the top-3 ticks (exactly-once)."""
    settings = load_settings(LabelerSettings)
    with service_context(SERVICE, settings) as context:
        task = LabelerTask(context.topics, settings.delta_ms, settings.tick_ms)
        # Exactly-once: each consumed batch of book.top3 is one transaction with its labels, its
        # dead letters and its input offsets (+ the oldest pending tick as restart offset).
        run_stream_service(context, task, [context.topics.book_top3], exactly_once=True)
