"""query_watermarks: which broker answers are retried, and for how long.

The consumer here is a scripted stand-in for the one call under test (the broker tier runs the
same function against the real broker, right after creating topics).
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from quotewatch.core.kafka import query_watermarks


class ScriptedConsumer:
    """Answers get_watermark_offsets from a script: an exception to raise or a (low, high) pair."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        assert not cached
        assert timeout > 0
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _error(code: int) -> KafkaException:
    return KafkaException(KafkaError(code))


def test_a_leader_not_elected_yet_is_waited_for() -> None:
    pauses: list[float] = []
    consumer = ScriptedConsumer(
        _error(KafkaError.NOT_LEADER_FOR_PARTITION), _error(KafkaError.LEADER_NOT_AVAILABLE), (0, 7)
    )
    assert query_watermarks(consumer, TopicPartition("t", 0), timeout=30, wait=pauses.append) == (0, 7)  # type: ignore[arg-type]
    assert consumer.calls == 3
    assert pauses == [0.05, 0.1]  # growing pauses between attempts


@pytest.mark.parametrize(
    ("code", "stop"),
    [(KafkaError.TOPIC_AUTHORIZATION_FAILED, False), (KafkaError.NOT_LEADER_FOR_PARTITION, True)],
    ids=["a permanent error", "a transient error when asked to stop"],
)
def test_raised_at_once(code: int, stop: bool) -> None:
    consumer = ScriptedConsumer(_error(code), (0, 1))
    with pytest.raises(KafkaException) as raised:
        query_watermarks(consumer, TopicPartition("t", 0), timeout=30, wait=lambda _: stop)  # type: ignore[arg-type]
    assert raised.value.args[0].code() == code
    assert consumer.calls == 1


def test_a_transient_error_is_raised_at_the_deadline() -> None:
    consumer = ScriptedConsumer(*[_error(KafkaError._TIMED_OUT)] * 50)
    with pytest.raises(KafkaException):
        query_watermarks(consumer, TopicPartition("t", 0), timeout=0.01, wait=lambda _: None)  # type: ignore[arg-type]
    assert consumer.calls == 1  # the next pause would pass the deadline
