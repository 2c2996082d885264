"""await_topics_visible: created topics are waited for until the metadata shows them with leaders.

The admin client here is a scripted stand-in for its one metadata call (the broker tier creates
topics and lists them at once through the CLI against the real broker).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import PartitionMetadata, TopicMetadata

from quotewatch.core.errors import BrokerError
from quotewatch.core.kafka import await_topics_visible


def topic(name: str, leaders: list[int], error: KafkaError | None = None) -> TopicMetadata:
    metadata = TopicMetadata()
    metadata.topic = name
    metadata.error = error
    for number, leader in enumerate(leaders):
        partition = PartitionMetadata()
        partition.id = number
        partition.leader = leader
        metadata.partitions[number] = partition
    return metadata


class ScriptedAdmin:
    """Answers list_topics from a script of topic lists (the last one repeats)."""

    def __init__(self, *answers: list[TopicMetadata]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def list_topics(self, timeout: float) -> Any:
        assert timeout > 0
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return SimpleNamespace(topics={t.topic: t for t in answer})


def test_missing_then_leaderless_topics_are_waited_for() -> None:
    pauses: list[float] = []
    admin = ScriptedAdmin(
        [topic("a", [1])],  # "b" not in the metadata yet
        [topic("a", [1]), topic("b", [1, -1], KafkaError(KafkaError.LEADER_NOT_AVAILABLE))],
        [topic("a", [1]), topic("b", [1, -1])],  # no error, but partition 1 has no leader
        [topic("a", [1]), topic("b", [1, 1])],
    )
    await_topics_visible(admin, ["a", "b"], timeout=30, wait=pauses.append)  # type: ignore[arg-type]
    assert admin.calls == 4
    assert pauses == [0.02, 0.04, 0.08]  # growing pauses between attempts


def test_visible_topics_need_one_call() -> None:
    admin = ScriptedAdmin([topic("a", [1, 1, 1])])
    await_topics_visible(admin, ["a"], timeout=30, wait=pytest.fail)  # type: ignore[arg-type]
    assert admin.calls == 1


def test_a_topic_that_never_shows_is_a_clear_error() -> None:
    waited: list[float] = []
    admin = ScriptedAdmin([topic("a", [1])])
    with pytest.raises(BrokerError, match=r"not visible in the broker's metadata after 1 s: \['b'\]"):
        await_topics_visible(admin, ["a", "b"], timeout=1, wait=waited.append)  # type: ignore[arg-type]
    assert waited, "asked again before giving up"
