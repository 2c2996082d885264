"""The dashboard's snapshot consumer and per-process state on a real broker (no browser)."""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.config import CommonSettings, DashboardSettings
from quotewatch.core.kafka import ensure_topics, make_admin, make_producer
from quotewatch.core.records import Snapshot
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.dashboard.app import DashboardApp, create_app
from quotewatch.services.dashboard.runtime import DashboardRuntime
from tests.helpers import dashboard_process, get_health, wait_for
from tests.unit.services.dashboard.factories import T0_NS, make_snapshot, produce_snapshots


@pytest.fixture
def dashboard_settings(make_settings: Callable[..., Any], topics: Any) -> DashboardSettings:
    settings: DashboardSettings = make_settings(DashboardSettings)
    return settings


def publish(settings: DashboardSettings, *records: Snapshot, raw: bytes | None = None) -> None:
    topic = TopicNames(settings.topic_prefix).snapshot
    producer = make_producer(settings, "test-snapshot-producer")
    if raw is not None:
        producer.produce(topic, key=b"BTC-USD", value=raw)
    produce_snapshots(producer, AvroSerde(), topic, records)


def test_reads_the_compacted_topic_from_the_beginning_latest_per_symbol(dashboard_settings: DashboardSettings) -> None:
    publish(
        dashboard_settings,
        make_snapshot("BTC-USD", ts_event=T0_NS, p_change=0.1),
        make_snapshot("ETH-USD", ts_event=T0_NS, p_change=0.2),
        make_snapshot("BTC-USD", ts_event=T0_NS + 100_000_000, p_change=0.3),
    )
    runtime = DashboardRuntime.build(dashboard_settings).start()
    try:
        wait_for(lambda: runtime.store.counts()[0] == 3, timeout=20, message="the backlog read")
        btc, eth = runtime.store.latest("BTC-USD"), runtime.store.latest("ETH-USD")
        assert btc is not None
        assert eth is not None
        assert (btc.snapshot.p_change, btc.received, eth.snapshot.p_change) == (0.3, 2, 0.2)
        history = runtime.store.history("BTC-USD")
        assert history is not None
        assert list(history.p_change) == [0.1, 0.3]
        wait_for(runtime.consumer.caught_up, timeout=10, message="caught up")
        health = runtime.health()
        assert health.healthy, health
        assert health.detail["positions"] == {f"{runtime.consumer.topic}[0]": 3}
        assert health.detail["symbols"] == ["BTC-USD", "ETH-USD"]

        publish(dashboard_settings, make_snapshot("ETH-USD", ts_event=T0_NS + 10**9, p_change=0.9))
        wait_for(
            lambda: (latest := runtime.store.latest("ETH-USD")) is not None and latest.snapshot.p_change == 0.9,
            timeout=10,
            message="a live snapshot",
        )
    finally:
        runtime.stop()
    health = runtime.health()
    assert not health.healthy
    assert health.reason.startswith("processing loop stopped")


def test_a_record_that_does_not_decode_is_counted_and_skipped(dashboard_settings: DashboardSettings) -> None:
    publish(dashboard_settings, make_snapshot("BTC-USD", p_change=0.42), raw=b"not an avro record")
    runtime = DashboardRuntime.build(dashboard_settings).start()
    try:
        wait_for(lambda: runtime.store.counts() == (2, 1), timeout=20, message="both records read")
        latest = runtime.store.latest("BTC-USD")
        assert latest is not None
        assert latest.snapshot.p_change == 0.42
        assert runtime.health().healthy
        assert runtime.feed().rejected == 1
    finally:
        runtime.stop()


def _health_in_child(app: DashboardApp, queue: Any) -> None:
    """Runs in a forked process: ask /health (which builds this process's state) until BTC-USD shows."""
    client = app.server.test_client()
    try:
        body = wait_for(
            lambda: (reply := json.loads(client.get("/health").get_data()))["symbols"] and reply,
            timeout=20,
            message="the child's state",
        )
        queue.put(body)
    finally:
        app.runtime.stop()


def test_each_forked_worker_builds_its_own_state(dashboard_settings: DashboardSettings) -> None:
    publish(dashboard_settings, make_snapshot("BTC-USD", p_change=0.5))
    app = create_app(dashboard_settings)
    try:
        client = app.server.test_client()
        parent = wait_for(
            lambda: (body := json.loads(client.get("/health").get_data()))["symbols"] and body,
            timeout=20,
            message="the parent's state",
        )
        assert parent["pid"] == os.getpid()

        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_health_in_child, args=(app, queue))
        child.start()
        body = queue.get(timeout=30)
        child.join(30)
        assert child.exitcode == 0
        assert body["pid"] == child.pid != os.getpid()
        assert body["symbols"] == ["BTC-USD"]
        assert body["snapshots_read"] == 1
        assert body["healthy"] is True
        # The parent's consumer carried on untouched.
        assert app.runtime.get().consumer.alive
        assert app.runtime.get().pid == os.getpid()
    finally:
        app.runtime.stop()


def test_a_topic_ending_in_an_aborted_transaction_reads_as_caught_up(dashboard_settings: DashboardSettings) -> None:
    """Inference killed mid-transaction: its open transaction is aborted and no snapshot follows."""
    topic = TopicNames(dashboard_settings.topic_prefix).snapshot
    serde = AvroSerde()
    producer = make_producer(dashboard_settings, "test-inference", transactional_id=f"test-{uuid.uuid4().hex[:8]}")
    producer.init_transactions(30)
    producer.begin_transaction()
    for index in range(3):
        record = make_snapshot("BTC-USD", ts_event=T0_NS + index * 100_000_000, p_change=0.1 * index)
        producer.produce(topic, key=b"BTC-USD", value=serde.encode(topic, record))
    producer.commit_transaction(30)
    producer.begin_transaction()
    for _ in range(5):
        producer.produce(topic, key=b"BTC-USD", value=serde.encode(topic, make_snapshot("BTC-USD", p_change=0.99)))
    producer.flush(10)
    producer.abort_transaction(30)  # the last offset of the topic is now an abort marker

    runtime = DashboardRuntime.build(dashboard_settings).start()
    try:
        wait_for(runtime.consumer.caught_up, timeout=20, message="caught up past the aborted transaction")
        assert runtime.consumer.lag() == 0
        assert runtime.store.counts() == (3, 0)
        latest = runtime.store.latest("BTC-USD")
        assert latest is not None
        assert latest.snapshot.p_change == pytest.approx(0.2)
        assert runtime.feed().caught_up
        health = runtime.health()
        assert health.healthy, health
        assert health.detail["lag"] == 0
    finally:
        runtime.stop()


def _topics_named(settings: CommonSettings) -> list[str]:
    metadata = make_admin(settings).list_topics(timeout=10)
    return sorted(name for name in metadata.topics if name.startswith(f"{settings.topic_prefix}."))


def _health(url: str) -> dict[str, Any] | None:
    reply = get_health(url)
    try:
        return None if reply is None else dict(reply.json())
    except ValueError:
        return None


def test_the_dashboard_process_creates_no_topic_and_reads_its_topic_once_it_exists(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings: DashboardSettings = make_settings(DashboardSettings)  # no `topics` fixture: nothing exists
    log_path = tmp_path / "dashboard.log"
    with dashboard_process(settings.kafka_bootstrap_servers, settings.topic_prefix, log_path) as (url, process):
        wait_for(lambda: process.poll() is None and _health(url), timeout=60, message=f"/health ({log_path})")
        # Its consumer has asked the broker for the topic (and been told it is missing) by now.
        wait_for(lambda: "does not exist yet" in log_path.read_text(), timeout=20, message="the missing-topic warning")
        assert _topics_named(settings) == [], "a read-only UI created topics"

        ensure_topics(make_admin(settings), settings.topic_prefix)  # what `quotewatch topics create` does
        publish(settings, make_snapshot("BTC-USD", p_change=0.77))
        body = wait_for(
            lambda: (reply := _health(url)) is not None and reply["snapshots_read"] == 1 and reply,
            timeout=30,
            message="the snapshot read once the topic exists",
        )
        assert body["symbols"] == ["BTC-USD"]
        assert process.poll() is None
