"""Reading a topic as decoded JSON lines (``quotewatch topics tail``)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import orjson
from confluent_kafka import KafkaException, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import BrokerError, SerdeError
from quotewatch.core.kafka import make_consumer, query_watermarks
from quotewatch.core.serde import serde_from_settings


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    raise TypeError(type(value).__name__)


def tail_topic(
    settings: CommonSettings,
    topic: str,
    *,
    from_beginning: bool = False,
    count: int | None = None,
    follow: bool = False,
    timeout: float = 10.0,
) -> Iterator[str]:
    """Yield decoded records of ``topic`` as JSON lines, with their coordinates under ``_kafka``.

    Without ``from_beginning`` it starts ``count`` (default 10) records before the end of each
    partition. It stops after ``count`` records, or when every partition is caught up (unless
    ``follow``). Records that do not decode are shown with their error instead of stopping.
    """
    registry_auth = (
        settings.schema_registry_basic_auth_user_info.get_secret_value()
        if settings.schema_registry_basic_auth_user_info
        else None
    )
    serde = serde_from_settings(settings.schema_registry_url, registry_auth)
    consumer = make_consumer(settings, group_id=f"quotewatch-tail-{time.time_ns()}", client_id="tail")
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise BrokerError(f"cannot reach the broker at {settings.kafka_bootstrap_servers}: {exc}") from exc
        topic_metadata = metadata.topics.get(topic)
        if topic_metadata is None or topic_metadata.error is not None or not topic_metadata.partitions:
            raise BrokerError(f"topic {topic!r} does not exist")
        assignment, ends = [], {}
        back = 10 if count is None else count
        for partition in sorted(topic_metadata.partitions):
            low, high = query_watermarks(consumer, TopicPartition(topic, partition), timeout=timeout)
            start = low if from_beginning else max(low, high - back)
            assignment.append(TopicPartition(topic, partition, start))
            if start < high:
                ends[partition] = high
        consumer.assign(assignment)
        emitted = 0
        while follow or ends:
            if count is not None and emitted >= count:
                return
            message = consumer.poll(0.5)
            if message is None:
                if not follow:
                    # Under read_committed the last offsets may be transaction markers, never delivered.
                    positions = consumer.position([TopicPartition(topic, p) for p in list(ends)])
                    for tp in positions:
                        if tp.offset >= 0 and tp.offset >= ends[tp.partition] - 1:
                            ends.pop(tp.partition, None)
                continue
            if message.error():
                continue
            partition, offset = message.partition() or 0, message.offset() or 0
            # The printed JSON object (the record's fields + _kafka), not a topic record itself.
            printed: dict[str, Any]  # not a topic record: the JSON line printed for one
            try:
                printed = msgspec.to_builtins(serde.decode(message.value() or b"", topic), builtin_types=(bytes,))
            except SerdeError as exc:
                printed = {"_error": f"{type(exc).__name__}: {exc}"}
            printed["_kafka"] = {
                "topic": topic,
                "partition": partition,
                "offset": offset,
                "key": (message.key() or b"").decode("utf-8", "replace"),
            }
            yield orjson.dumps(printed, default=_jsonable).decode()
            emitted += 1
            if partition in ends and offset + 1 >= ends[partition]:
                ends.pop(partition)
    finally:
        consumer.close()
