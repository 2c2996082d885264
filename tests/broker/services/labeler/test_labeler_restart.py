"""The labeler on the real broker: a fresh task after a restart rebuilds its window from the
restart offset stored with the commit, so the labels equal an uninterrupted run, exactly once."""

from __future__ import annotations

from typing import Any

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import make_producer
from quotewatch.core.records import BookTop
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler
from quotewatch.services.labeler.main import LabelerTask
from tests.broker.services.book.streams import running
from tests.helpers import read_topic, wait_for
from tests.records import plain
from tests.unit.services.book.market_events import synthetic_feed


def book_tops() -> list[BookTop]:
    pipeline = BookPipeline(100)
    tops: list[BookTop] = []
    for position, record in enumerate(synthetic_feed(99, symbols=("BTC-USD", "ETH-USD"), count=1500)):
        tops.extend(output.book_top for output in pipeline.process(record, position))
    return tops


def produce(settings: CommonSettings, tops: list[BookTop]) -> None:
    topic = TopicNames(settings.topic_prefix).book_top3
    serde = AvroSerde()
    producer = make_producer(settings, "test-tops")
    for top in tops:
        producer.produce(topic, key=top.symbol.encode(), value=serde.encode(topic, top))
    assert producer.flush(30) == 0


def strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def test_labels_after_a_restart_equal_an_uninterrupted_run(topics: CommonSettings) -> None:
    names = TopicNames(topics.topic_prefix)
    tops = book_tops()
    labeler = Labeler(500, 100)
    expected = [plain(label) for top in tops if (label := labeler.process(top)) is not None]
    half = len(tops) // 2
    labeler = Labeler(500, 100)
    first_labels = sum(labeler.process(top) is not None for top in tops[:half])

    produce(topics, tops[:half])
    with running(topics, "labeler", LabelerTask(names, 500, 100), names.book_top3):
        wait_for(lambda: len(read_topic(topics, names.labels)) >= first_labels, timeout=60, message="first labels")
    produce(topics, tops[half:])
    with running(topics, "labeler", LabelerTask(names, 500, 100), names.book_top3):  # a fresh, empty task
        wait_for(lambda: len(read_topic(topics, names.labels)) >= len(expected), timeout=60, message="all labels")
    got = [strip(r) for r in read_topic(topics, names.labels)]
    assert sorted(got, key=lambda r: (r["symbol"], r["t_event"])) == sorted(
        expected, key=lambda r: (r["symbol"], r["t_event"])
    )
    assert len(read_topic(topics, names.labels, isolation="read_uncommitted")) == len(expected), "no duplicates"
    assert first_labels < len(expected)
