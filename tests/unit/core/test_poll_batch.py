"""``poll_batch``: every batch is what one librdkafka call returned (see its docstring for why)."""

from __future__ import annotations

from typing import Any, cast

from confluent_kafka import Consumer

from quotewatch.core.kafka import poll_batch


class RecordingConsumer:
    """Stands in for confluent_kafka.Consumer: hands out queued records and logs each call."""

    def __init__(self, fetched: list[str], arriving: str | None = None) -> None:
        self.fetched = list(fetched)
        self.arriving = arriving
        self.calls: list[tuple[str, int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.calls.append(("consume", num_messages, timeout))
        taken, self.fetched = self.fetched[:num_messages], self.fetched[num_messages:]
        return taken

    def poll(self, timeout: float) -> Any:
        self.calls.append(("poll", 1, timeout))
        return self.arriving


def batch(consumer: RecordingConsumer, max_records: int) -> list[Any]:
    return list(poll_batch(cast(Consumer, consumer), max_records, 0.5))


def test_records_already_fetched_come_from_a_single_consume_call() -> None:
    consumer = RecordingConsumer(["a", "b", "c"])
    assert batch(consumer, 2) == ["a", "b"]
    assert consumer.calls == [("consume", 2, 0)]


def test_with_nothing_fetched_it_waits_for_one_record_and_returns_it_alone() -> None:
    consumer = RecordingConsumer([], arriving="x")
    assert batch(consumer, 500) == ["x"]
    assert consumer.calls == [("consume", 500, 0), ("poll", 1, 0.5)]


def test_nothing_arrives_within_the_timeout() -> None:
    consumer = RecordingConsumer([])
    assert batch(consumer, 500) == []


def test_a_batch_of_one_is_a_single_poll() -> None:
    consumer = RecordingConsumer(["a", "b"], arriving="x")
    assert batch(consumer, 1) == ["x"]
    assert consumer.calls == [("poll", 1, 0.5)]
