"""Helpers of the book/labeler broker and e2e tests: run a StreamTask in-process on the real
broker, produce MarketEvents, and compute what the pure domain code expects."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import CommonSettings
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, make_producer
from quotewatch.core.records import BookTop, FeatureVector, MarketEvent
from quotewatch.core.runtime import StreamProcessor, StreamTask
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler

TICK_MS = 100
DELTA_MS = 500


@contextmanager
def running(settings: CommonSettings, service: str, task: StreamTask, topic: str) -> Iterator[None]:
    shutdown = ShutdownSignal()
    processor = StreamProcessor(
        settings=settings,
        service=service,
        task=task,
        input_topics=[topic],
        serde=AvroSerde(),
        clock=SystemClock(),
        shutdown=shutdown,
        liveness=Liveness(service, SystemClock(), 30),
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            processor.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield
    finally:
        shutdown.set()
        thread.join(60)
        assert not thread.is_alive(), f"{service} did not stop"
        assert not errors, errors


def produce_events(settings: CommonSettings, events: list[MarketEvent]) -> None:
    topic = TopicNames(settings.topic_prefix).md_events
    serde = AvroSerde()
    producer = make_producer(settings, "test-events")
    for record in events:
        producer.produce(topic, key=record.symbol.encode(), value=serde.encode(topic, record))
        producer.poll(0)
    assert producer.flush(30) == 0


def expected_outputs(events: list[MarketEvent]) -> tuple[list[BookTop], list[FeatureVector], int]:
    """BookTops, FeatureVectors and the label count the pure domain code gives."""
    pipeline = BookPipeline(TICK_MS)
    tops: list[BookTop] = []
    vectors: list[FeatureVector] = []
    for position, record in enumerate(events):
        for output in pipeline.process(record, position):
            tops.append(output.book_top)
            if output.features is not None:
                vectors.append(output.features)
    labeler = Labeler(DELTA_MS, TICK_MS)
    labels = sum(1 for top in tops if labeler.process(top) is not None)
    return tops, vectors, labels
