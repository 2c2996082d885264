"""The ingest against Coinbase's real behaviour, over real sockets with the real broker.

Odd control frames (an acknowledgement with an empty ``timestamp``), the acknowledgement after a
snapshot that takes longer than the subscribe timeout to arrive, CDP API key JWTs checked by the
feed server, products spread over several connections, the jittered reconnect, and one bad event
in a multi-product frame.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import IngestSettings
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, ensure_topics, make_admin
from quotewatch.core.records import DeadLetter, Gap, MarketEvent, RawFrame
from quotewatch.core.runtime import StreamProcessor
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig
from quotewatch.services.feed_server.server import FaultPlan, FeedServer, SyntheticSource, serve_in_thread
from quotewatch.services.ingest.state_machine import FeedState
from quotewatch.services.ingest.topic_mode import NormaliseTask
from tests.broker.services.ingest.test_ingest_feed_server import (
    _values,
    gaps,
    ingest_settings,
    running_ingest,
    synthetic_server,
    transitions,
    values_to_end,
    wait_for_books_to_match,
)
from tests.helpers import wait_for
from tests.records import body

HAPPY = [("INIT", "CONNECTING"), ("CONNECTING", "SUBSCRIBED"), ("SUBSCRIBED", "STOPPED")]
KEY_NAME = "organizations/quotewatch-test/apiKeys/ingest"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_odd_subscriptions_ack_confirms_the_subscription_and_the_book_follows(
    make_settings: Callable[..., Any],
) -> None:
    """An ack with an empty timestamp and an unknown field, heartbeats with an unknown field: logged,
    counted, never dead-lettered, and the subscription is confirmed on the first connection."""
    before = metric(
        "quotewatch_control_frame_anomalies_total",
        service="ingest",
        feed="coinbase-advanced",
        message_type="subscriptions",
        anomaly="invalid_field",
    )
    with serve_in_thread(synthetic_server("advanced", FaultPlan(odd_control_frames=True, connections=0))) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        with running_ingest(settings) as service:
            events = wait_for_books_to_match(settings, running)
    assert transitions(service) == HAPPY
    assert service.stats.connections == 1
    assert gaps(events) == Counter({"RECONNECT": 2})
    assert values_to_end(settings, TopicNames(settings.topic_prefix).dlq, DeadLetter) == []
    after = metric(
        "quotewatch_control_frame_anomalies_total",
        service="ingest",
        feed="coinbase-advanced",
        message_type="subscriptions",
        anomaly="invalid_field",
    )
    assert after - before >= 1
    unknown = metric(
        "quotewatch_control_frame_anomalies_total",
        service="ingest",
        feed="coinbase-advanced",
        message_type="heartbeats",
        anomaly="unknown_field",
    )
    assert unknown >= 1


def test_a_snapshot_slower_than_the_subscribe_timeout_is_no_failure(make_settings: Callable[..., Any]) -> None:
    """The snapshots take seconds (fragments every 0.1 s), the silence allowed is 1 s: confirmed, no retry."""
    plan = FaultPlan(snapshot_fragment_ms=100, snapshot_fragment_bytes=1024, connections=0)
    with serve_in_thread(synthetic_server("advanced", plan)) as running:
        settings = ingest_settings(make_settings, running.url, "advanced", subscribe_timeout_seconds=1.0)
        with running_ingest(settings) as service:
            wait_for_books_to_match(settings, running, timeout=60)
        fragmented = running.call(lambda: running.server.connections[0].fragmented_snapshots)
    assert transitions(service) == HAPPY, service.machine.history
    assert fragmented == 2
    connecting, subscribed = service.machine.history[0], service.machine.history[1]
    assert (subscribed.at_ns - connecting.at_ns) / 1e9 > 4 * settings.subscribe_timeout_seconds
    assert service.stats.connections == 1


def test_the_subscribe_wait_has_a_hard_cap(make_settings: Callable[..., Any]) -> None:
    plan = FaultPlan(snapshot_fragment_ms=100, snapshot_fragment_bytes=1024, connections=0)
    with serve_in_thread(synthetic_server("advanced", plan)) as running:
        settings = ingest_settings(
            make_settings, running.url, "advanced", subscribe_timeout_seconds=0.5, subscribe_max_seconds=1.0
        )
        with running_ingest(settings) as service:
            wait_for(lambda: service.machine.state is FeedState.BACKOFF, timeout=20, message="a capped wait")
    failure = next(t for t in service.machine.history if t.state is FeedState.BACKOFF)
    assert failure.reason == "no subscription confirmed within 1.0s"


def _key_pair() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def test_a_cdp_key_is_accepted_by_a_verifying_server(make_settings: Callable[..., Any]) -> None:
    private, public = _key_pair()
    server = synthetic_server("advanced")
    server.cdp_public_key = public
    with serve_in_thread(server) as running:
        settings = ingest_settings(
            make_settings,
            running.url,
            "advanced",
            coinbase_cdp_key_name=KEY_NAME,
            coinbase_cdp_private_key=private.replace("\n", "\\n"),  # one-line environment form
        )
        with running_ingest(settings) as service:
            wait_for_books_to_match(settings, running)
        (stats,) = running.call(lambda: list(running.server.connections))
    assert transitions(service) == HAPPY
    assert (stats.authenticated, stats.auth_failures) == (3, [])  # a fresh JWT on each subscribe message


def test_a_wrong_cdp_key_is_refused_with_a_clear_log_and_metric(
    make_settings: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    private, _ = _key_pair()
    _, other_public = _key_pair()
    server = synthetic_server("advanced")
    server.cdp_public_key = other_public
    before = metric("quotewatch_feed_errors_total", service="ingest", feed="coinbase-advanced")
    with serve_in_thread(server) as running:
        settings = ingest_settings(
            make_settings,
            running.url,
            "advanced",
            coinbase_cdp_key_name=KEY_NAME,
            coinbase_cdp_private_key=private,
            subscribe_timeout_seconds=0.5,
        )
        with caplog.at_level("ERROR"), running_ingest(settings) as service:
            wait_for(lambda: service.machine.state is FeedState.BACKOFF, timeout=20, message="a refused subscribe")
            wait_for(lambda: service.stats.dead_letters >= 3, timeout=20, message="the errors in the DLQ")
        connections = running.call(lambda: list(running.server.connections))
    assert connections[0].authenticated == 0
    assert len(connections[0].auth_failures) == 3
    assert metric("quotewatch_feed_errors_total", service="ingest", feed="coinbase-advanced") - before >= 3
    refusals = [r.getMessage() for r in caplog.records if "the exchange sent an error" in r.getMessage()]
    assert refusals
    assert "authentication failed: invalid jwt: Signature verification failed" in refusals[0]
    assert ("CONNECTING", "SUBSCRIBED") not in transitions(service)


SYMBOLS4 = ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD")


def test_products_spread_over_connections_a_drop_gaps_and_resyncs_only_its_products(
    make_settings: Callable[..., Any], topic_prefix: str
) -> None:
    config = SyntheticConfig(symbols=SYMBOLS4, seed=5, rate=800.0)
    server = FeedServer(
        "advanced",
        SyntheticSource(config, max_updates=8000),
        faults=FaultPlan(drop_after=60, connections=1),
        heartbeat_interval=0.25,
    )
    with serve_in_thread(server) as running:
        settings = ingest_settings(
            make_settings, running.url, "advanced", symbols=",".join(SYMBOLS4), products_per_connection=2
        )
        with running_ingest(settings) as service:
            wait_for(lambda: running.call(lambda: any(c.dropped for c in server.connections)), timeout=30)
            events = _books_match(settings, running)
        connections = running.call(lambda: list(server.connections))
    assert [len(c.symbols) for c in service.connections] == [2, 2]
    (dropped,) = [c for c in connections if c.dropped]
    hit = set(dropped.subscriptions["level2"])
    assert len(hit) == 2
    spared = set(SYMBOLS4) - hit
    reasons = Counter((e.symbol, body(e, Gap).reason) for e in events if e.kind == "GAP")
    snapshots = Counter(e.symbol for e in events if e.kind == "SNAPSHOT")
    for symbol in hit:  # the start, the drop, the new connection
        assert reasons[(symbol, "RECONNECT")] == 3, reasons
        assert snapshots[symbol] == 2
    for symbol in spared:  # the start only
        assert reasons[(symbol, "RECONNECT")] == 1, reasons
        assert snapshots[symbol] == 1
    machines = {
        frozenset(c.symbols): [(t.previous.value, t.state.value) for t in c.machine.history]
        for c in service.connections
    }
    assert ("SUBSCRIBED", "RECONNECTING") in machines[frozenset(hit)]
    assert ("SUBSCRIBED", "RECONNECTING") not in machines[frozenset(spared)]
    # One raw log, the connections interleaved, each record carrying its own products.
    raw = values_to_end(settings, TopicNames(settings.topic_prefix).md_raw, RawFrame)
    assert Counter(r.kind for r in raw)["CONNECTED"] == 3
    assert {tuple(r.symbols) for r in raw} == {tuple(c.symbols) for c in service.connections}
    owners = [r.connection_id for r in raw if r.kind == "FRAME"]
    assert sum(1 for a, b in itertools.pairwise(owners) if a != b) > 10  # really interleaved
    _assert_topic_mode_renormalises_identically(settings, make_settings, topic_prefix)


def _books_match(settings: IngestSettings, running: Any) -> list[MarketEvent]:
    return wait_for_books_to_match(settings, running, timeout=60, symbols=SYMBOLS4)


def _assert_topic_mode_renormalises_identically(
    settings: IngestSettings, make_settings: Callable[..., Any], topic_prefix: str
) -> None:
    """``INGEST_SOURCE=topic`` over the interleaved raw log gives the live events byte for byte."""
    live = TopicNames(settings.topic_prefix)
    replay_settings = make_settings(IngestSettings, topic_prefix=f"{topic_prefix}r", ingest_source="topic")
    ensure_topics(make_admin(replay_settings), replay_settings.topic_prefix)
    replay = TopicNames(replay_settings.topic_prefix)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.idempotence": True})
    for key, value in _values(settings, live.md_raw)[0]:
        producer.produce(replay.md_raw, key=key, value=value, partition=0)
    assert producer.flush(30) == 0
    live_events = _values(settings, live.md_events)
    expected = sum(len(v) for v in live_events.values())
    shutdown = ShutdownSignal()
    clock = SystemClock()
    processor = StreamProcessor(
        settings=replay_settings,
        service="ingest",
        task=NormaliseTask(replay, clock),
        input_topics=[replay.md_raw],
        serde=AvroSerde(),
        clock=clock,
        shutdown=shutdown,
        liveness=Liveness("ingest", clock, 30),
    )
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: sum(len(v) for v in _values(replay_settings, replay.md_events).values()) >= expected,
            timeout=60,
            interval=0.5,
            message="the replayed events",
        )
    finally:
        shutdown.set()
        thread.join(60)
    assert _values(replay_settings, replay.md_events) == live_events


class FixedJitter(random.Random):
    """A random source whose ``uniform`` is always 75 % of the way (a deterministic jitter)."""

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * 0.75


def test_a_lost_connection_waits_its_jittered_delay_before_reconnecting(make_settings: Callable[..., Any]) -> None:
    with serve_in_thread(synthetic_server("advanced", FaultPlan(drop_after=100))) as running:
        settings = ingest_settings(make_settings, running.url, "advanced", reconnect_jitter_seconds=1.2)
        with running_ingest(settings, rng=FixedJitter()) as service:
            wait_for_books_to_match(settings, running)
    lost = next(t for t in service.machine.history if t.state is FeedState.RECONNECTING)
    assert lost.delay_seconds == pytest.approx(0.9)
    raw = values_to_end(settings, TopicNames(settings.topic_prefix).md_raw, RawFrame)
    disconnected = next(r for r in raw if r.kind == "DISCONNECTED")
    assert json.loads(disconnected.text)["delay_seconds"] == pytest.approx(0.9)
    reconnected = [r for r in raw if r.kind == "CONNECTED"][1]
    assert (reconnected.ts_init - disconnected.ts_init) / 1e9 >= 0.9


def test_one_bad_event_in_a_multi_product_frame_resyncs_only_its_product(make_settings: Callable[..., Any]) -> None:
    with serve_in_thread(synthetic_server("advanced", FaultPlan(bad_event_after=40))) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        with running_ingest(settings) as service:
            events = wait_for_books_to_match(settings, running)
        (stats,) = running.call(lambda: list(running.server.connections))
    bad = stats.bad_event_product
    assert bad is not None
    (good,) = set(SYMBOLS4[:2]) - {bad}
    reasons = Counter((e.symbol, body(e, Gap).reason) for e in events if e.kind == "GAP")
    assert reasons == Counter({(bad, "RECONNECT"): 1, (good, "RECONNECT"): 1, (bad, "PARSE_ERROR"): 1})
    snapshots = Counter(e.symbol for e in events if e.kind == "SNAPSHOT")
    assert snapshots == Counter({bad: 2, good: 1})  # the bad product resubscribed, on the same connection
    assert transitions(service) == HAPPY
    assert (service.stats.connections, service.stats.product_resyncs) == (1, 1)
    (letter,) = values_to_end(settings, TopicNames(settings.topic_prefix).dlq, DeadLetter)
    assert (letter.error_type, letter.symbol) == ("InvalidField", bad)
