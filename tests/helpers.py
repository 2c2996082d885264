"""Small test utilities shared by the tiers: waiting on conditions, reading topics, child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import requests
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config, make_admin, query_watermarks
from quotewatch.core.records import Record
from quotewatch.core.serde import AvroSerde
from quotewatch.local.kafka import free_port
from tests.records import plain

T = TypeVar("T")
R = TypeVar("R", bound=Record)


@dataclass(frozen=True, slots=True)
class Consumed(Generic[R]):
    """A typed record read back from a topic, with its coordinates."""

    value: R
    partition: int
    offset: int
    key: str | None = None


def wait_for(
    condition: Callable[[], T | bool | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def read_topic(
    settings: CommonSettings,
    topic: str,
    *,
    expected: int | None = None,
    timeout: float = 30.0,
    isolation: str = "read_committed",
    decode: bool = True,
) -> list[dict[str, Any]]:
    """Every record of ``topic`` from the beginning, decoded, with ``_partition``/``_offset``/``_key``.

    Each is decoded into its typed record (so it is checked to be one) and returned as that record's
    plain Avro datum (:func:`tests.records.plain`) with the coordinates added: a row of the topic.

    Reads until the committed end of every partition (or until ``expected`` records arrived).
    """
    serde = AvroSerde()
    consumer = Consumer(
        consumer_config(settings, f"read-{uuid.uuid4().hex[:8]}", "test-reader", **{"isolation.level": isolation})
    )
    records: list[dict[str, Any]] = []
    try:
        metadata = make_admin(settings).list_topics(topic, timeout=10).topics[topic]
        partitions = sorted(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        deadline = time.monotonic() + timeout
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                if expected is None and _caught_up(consumer, topic, partitions) and time.monotonic() - idle_since > 0.5:
                    break
                if expected is not None and len(records) >= expected:
                    break
                continue
            if message.error():
                continue
            idle_since = time.monotonic()
            value: dict[str, Any] = (
                plain(serde.decode(message.value() or b"", topic)) if decode else {"_raw": message.value()}
            )
            value["_partition"], value["_offset"] = message.partition(), message.offset()
            key = message.key()
            value["_key"] = key.decode() if key else None
            records.append(value)
            if expected is not None and len(records) >= expected:
                break
    finally:
        consumer.close()
    return records


def _caught_up(consumer: Consumer, topic: str, partitions: list[int]) -> bool:
    for partition in partitions:
        _, high = query_watermarks(consumer, TopicPartition(topic, partition), timeout=5)
        position = consumer.position([TopicPartition(topic, partition)])[0].offset
        if high > 0 and (position < 0 or position < high - 1):
            return False
    return True


def shared_data_dir() -> Path:
    """``../shared/data/coinbase`` next to the repository (or ``QUOTEWATCH_SHARED_DIR``/data/coinbase).

    The recorded captures are never copied into the repository; a missing directory fails the
    test with a clear message instead of skipping it.
    """
    root = Path(os.environ.get("QUOTEWATCH_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
    path = root / "data" / "coinbase"
    if not path.is_dir():
        raise AssertionError(
            f"recorded captures not found at {path}: clone next to ../shared or set QUOTEWATCH_SHARED_DIR"
        )
    return path


def committed_past(settings: CommonSettings, group: str, lasts: Mapping[tuple[str, int], int]) -> bool:
    """Has consumer group ``group`` committed beyond the last offset of each (topic, partition)?

    A coordinator that is not ready yet (on a broker just started or restarted, ``__consumer_offsets``
    is still being created or loaded) answers "not yet", like an offset not reached.
    """
    wanted = {key: last for key, last in lasts.items() if last >= 0}
    if not wanted:
        return True
    consumer = Consumer(consumer_config(settings, group, "committed-check"))
    try:
        found = consumer.committed([TopicPartition(topic, partition) for topic, partition in wanted], timeout=10)
    except KafkaException as exc:
        if exc.args[0].code() in _COORDINATOR_NOT_READY:
            return False
        raise
    finally:
        consumer.close()
    return all(tp.offset > wanted[(tp.topic, tp.partition)] for tp in found)


_COORDINATOR_NOT_READY = frozenset(
    {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE}
)


class RegistryOutage:
    """confluent-kafka's mock schema registry, unreachable for the first ``failures`` lookups."""

    def __init__(self, registry: Any, failures: int) -> None:
        self.registry = registry
        self.failures = failures
        self.lookups = 0

    def register_schema(self, subject_name: str, schema: Any, normalize_schemas: bool = False) -> int:
        return int(self.registry.register_schema(subject_name, schema, normalize_schemas))

    def get_schema(self, schema_id: int, subject_name: str | None = None, fmt: str | None = None) -> Any:
        self.lookups += 1
        if self.lookups <= self.failures:
            raise ConnectionError("registry unreachable (simulated outage)")
        return self.registry.get_schema(schema_id, subject_name, fmt)


def get_health(url: str) -> requests.Response | None:
    """``GET url/health``, or None while nothing answers there."""
    try:
        return requests.get(f"{url}/health", timeout=2)
    except requests.RequestException:
        return None


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: a child process of a test never outlives it."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@contextmanager
def dashboard_process(
    bootstrap_servers: str, topic_prefix: str, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``quotewatch run dashboard`` as a real process on a free 127.0.0.1 port: yields (url, process).

    Its output goes to ``log_path``; it is stopped on exit.
    """
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key != "QUOTEWATCH_CONFIG_FILE"},
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "TOPIC_PREFIX": topic_prefix,
        "DASH_HOST": "127.0.0.1",
        "DASH_PORT": str(port),
        "DASH_DEBUG": "false",
        "METRICS_PORT": "0",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotewatch.cli", "run", "dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_process(process)
