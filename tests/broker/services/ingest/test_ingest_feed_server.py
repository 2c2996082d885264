"""The ingest against the local feed server over real sockets, with the real broker.

A normal session per protocol, each injected fault (the right state transitions, a GAP, a
resubscription, and a book rebuilt from ``md.events`` equal to the server's book afterwards),
backpressure (a stalled writer -> OVERFLOW + GAP, nothing silently dropped), and the topic-mode
re-normalisation of ``md.raw`` reproducing ``md.events`` byte for byte.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from quotewatch.core.clock import Clock, SystemClock
from quotewatch.core.config import IngestSettings
from quotewatch.core.errors import FatalError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, consumer_config, ensure_topics, make_admin, make_producer
from quotewatch.core.records import DeadLetter, FeedStatus, Gap, MarketEvent, RawFrame
from quotewatch.core.runtime import StreamProcessor
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.services.feed_server.server import (
    CaptureSource,
    FaultPlan,
    FeedServer,
    RunningFeedServer,
    SyntheticSource,
    serve_in_thread,
)
from quotewatch.services.ingest.service import IngestService
from quotewatch.services.ingest.state_machine import FeedState
from quotewatch.services.ingest.topic_mode import NormaliseTask
from quotewatch.services.replay.sources import TopicReader, find_raw_start
from tests.helpers import Consumed, R, shared_data_dir, wait_for
from tests.records import body
from tests.unit.domain.venue.test_normaliser_golden import EventBook, books_from_events, reference_books

SYMBOLS = ("BTC-USD", "ETH-USD")


def read_to_end(settings: Any, topic: str, cls: type[R], *, timeout: float = 30.0) -> list[Consumed[R]]:
    """Every committed record of ``topic`` up to the end offsets at the time of the call, decoded as
    ``cls`` records, in (partition, offset) order.

    ``tests.helpers.read_topic`` stops when the topic has been idle for a while, which a live
    ingest (CLOCK events every TICK_MS) never is; this reads up to a fixed end instead.
    """
    serde = AvroSerde()
    return [
        Consumed(serde.decode_as(message.value() or b"", topic, cls), partition, offset, key)
        for partition, offset, key, message in _messages_to_end(settings, topic, timeout)
    ]


def values_to_end(settings: Any, topic: str, cls: type[R], *, timeout: float = 30.0) -> list[R]:
    """:func:`read_to_end` without the coordinates."""
    return [record.value for record in read_to_end(settings, topic, cls, timeout=timeout)]


def _messages_to_end(settings: Any, topic: str, timeout: float) -> list[tuple[int, int, str | None, Message]]:
    """``(partition, offset, key, message)`` of every committed record of ``topic`` up to its end offsets now."""
    consumer = Consumer(consumer_config(settings, f"end-{uuid.uuid4().hex[:8]}", "test-reader"))
    messages: list[tuple[int, int, str | None, Message]] = []
    try:
        partitions = sorted(make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: _high_watermark(consumer, topic, p) for p in partitions}
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                # Transaction markers are never delivered: a position at the end counts as done.
                for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                    if tp.offset >= ends[tp.partition] - 1:
                        pending.discard(tp.partition)
                continue
            if message.error():
                continue
            partition, offset = message.partition() or 0, message.offset() or 0
            if offset < ends[partition]:
                key = message.key()
                messages.append((partition, offset, key.decode() if key else None, message))
            if offset + 1 >= ends[partition]:
                pending.discard(partition)
        assert not pending, f"did not reach the end of {topic} partitions {pending}"
    finally:
        consumer.close()
    return sorted(messages, key=lambda m: (m[0], m[1]))


_LEADERSHIP_ERRORS = frozenset(
    {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError._TRANSPORT}
)


def _high_watermark(consumer: Consumer, topic: str, partition: int) -> int:
    """The partition's high watermark; a leadership change under load (NOT_LEADER_FOR_PARTITION) is retried."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
        except KafkaException as exc:
            error = exc.args[0]
            if (error.code() not in _LEADERSHIP_ERRORS and not error.retriable()) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def ingest_settings(make_settings: Callable[..., Any], url: str, protocol: str, **overrides: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "coinbase_ws_url": url,
        "feed": f"coinbase-{protocol}",
        "symbols": ",".join(SYMBOLS),
        "heartbeat_timeout_seconds": 1.5,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1.0,
        "reconnect_jitter_seconds": 0.1,
    }
    values.update(overrides)
    settings: IngestSettings = make_settings(IngestSettings, **values)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    return settings


@contextmanager
def running_ingest(
    settings: IngestSettings,
    producer: Producer | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> Iterator[IngestService]:
    clock = clock or SystemClock()
    service = IngestService(
        settings, serde=AvroSerde(), clock=clock, liveness=Liveness("ingest", clock, 30), producer=producer, rng=rng
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(service.run())
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name="ingest-under-test", daemon=True)
    thread.start()
    wait_for(lambda: service.running or errors, timeout=10, message="ingest started")
    try:
        yield service
    finally:
        service.stop()
        thread.join(60)
        assert not thread.is_alive(), "ingest did not stop"
        assert not errors, errors


def synthetic_server(protocol: str, faults: FaultPlan | None = None, **market: Any) -> FeedServer:
    config = SyntheticConfig(symbols=SYMBOLS, seed=7, rate=market.pop("rate", 1500.0))
    return FeedServer(
        protocol,  # type: ignore[arg-type]  # advanced|exchange
        SyntheticSource(config, max_updates=market.pop("max_updates", 6000)),
        faults=faults,
        heartbeat_interval=0.25,
    )


def market_exhausted(running: RunningFeedServer) -> bool:
    source = running.server.source
    return bool(running.call(lambda: isinstance(source, SyntheticSource) and source.exhausted))


def wait_for_books_to_match(
    settings: IngestSettings, running: RunningFeedServer, timeout: float = 40, symbols: tuple[str, ...] = SYMBOLS
) -> list[MarketEvent]:
    """Wait until the market stopped and the book rebuilt from md.events equals the server's book; the
    events (in partition order)."""
    wait_for(lambda: market_exhausted(running), timeout=timeout, message="the synthetic market to finish")
    market = running.server.market
    assert market is not None
    expected = {s: running.call(partial(market.book, s)) for s in symbols}
    topic = TopicNames(settings.topic_prefix).md_events
    events: list[MarketEvent] = []
    books: dict[str, EventBook] = {}

    def books_match() -> bool:
        events[:] = values_to_end(settings, topic, MarketEvent)
        books.clear()
        books.update(books_from_events(events))
        return all(s in books and books[s].synced and books[s].as_dict() == expected[s] for s in symbols)

    try:
        wait_for(books_match, timeout=timeout, interval=0.5, message="the events book to equal the server's book")
    except AssertionError:
        for s in symbols:
            if s in books:
                got = books[s].as_dict()
                diff = {side: len(set(got[side].items()) ^ set(expected[s][side].items())) for side in ("BID", "ASK")}
                print(s, "synced", books[s].synced, "differences", diff)
        raise
    return events


def transitions(service: IngestService) -> list[tuple[str, str]]:
    return [(t.previous.value, t.state.value) for t in service.machine.history]


def gaps(events: list[MarketEvent]) -> Counter[str]:
    return Counter(body(e, Gap).reason for e in events if e.kind == "GAP")


@pytest.mark.parametrize("protocol", ["advanced", "exchange"])
def test_a_normal_session_fills_raw_and_events_and_the_book_matches(
    make_settings: Callable[..., Any], protocol: str
) -> None:
    with serve_in_thread(synthetic_server(protocol)) as running:
        settings = ingest_settings(make_settings, running.url, protocol)
        with running_ingest(settings) as service:
            events = wait_for_books_to_match(settings, running)
        connections = running.call(lambda: list(running.server.connections))
    names = TopicNames(settings.topic_prefix)
    raw = values_to_end(settings, names.md_raw, RawFrame)
    kinds = Counter(r.kind for r in raw)
    assert kinds["CONNECTED"] == 1, (kinds, raw[:3], len(raw))
    assert kinds["FRAME"] == service.stats.frames == connections[0].frames_sent
    assert kinds["CLOCK"] > 0
    assert kinds["DISCONNECTED"] == 1  # the stop
    assert [r.frame_index for r in raw if r.kind == "FRAME"] == list(range(kinds["FRAME"]))
    assert all(a.ts_init < b.ts_init for a, b in itertools.pairwise(raw))
    event_kinds = Counter((e.symbol, e.kind) for e in values_to_end(settings, names.md_events, MarketEvent))
    for symbol in SYMBOLS:
        assert event_kinds[(symbol, "SNAPSHOT")] == 1
        assert event_kinds[(symbol, "UPDATE")] > 10
        assert event_kinds[(symbol, "TRADE")] > 0
        assert event_kinds[(symbol, "HEARTBEAT")] > 0
        assert event_kinds[(symbol, "CLOCK")] == kinds["CLOCK"]
    assert gaps(events) == Counter({"RECONNECT": 2})  # the connection start, for each symbol
    assert transitions(service) == [("INIT", "CONNECTING"), ("CONNECTING", "SUBSCRIBED"), ("SUBSCRIBED", "STOPPED")]
    assert values_to_end(settings, names.dlq, DeadLetter) == []
    # Event keys are symbols; every record of a symbol lands on one partition.
    stored = read_to_end(settings, names.md_events, MarketEvent)
    assert {e.key for e in stored} == set(SYMBOLS)
    assert all(e.key == e.value.symbol for e in stored)


FAULTS = {
    "drop": ("advanced", FaultPlan(drop_after=40), "RECONNECT", "connection closed"),
    "silent": ("exchange", FaultPlan(silent_after=40), "RECONNECT", "silent for more than"),
    "skip-sequence": ("advanced", FaultPlan(skip_sequence_after=40), "SEQUENCE_JUMP", "resync: sequence_num jumped"),
    "malformed": ("exchange", FaultPlan(malformed_after=40), "PARSE_ERROR", "resync: frame"),
    "long-delay": ("advanced", FaultPlan(delay_after=40, delay_ms=2500), "RECONNECT", "silent for more than"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_a_gap_a_resubscription_and_the_book_recovers(
    make_settings: Callable[..., Any], fault: str
) -> None:
    protocol, plan, gap_reason, close_reason = FAULTS[fault]
    with serve_in_thread(synthetic_server(protocol, plan)) as running:
        settings = ingest_settings(make_settings, running.url, protocol)
        with running_ingest(settings) as service:
            events = wait_for_books_to_match(settings, running)
        connections = running.call(lambda: list(running.server.connections))
    assert transitions(service) == [
        ("INIT", "CONNECTING"),
        ("CONNECTING", "SUBSCRIBED"),
        ("SUBSCRIBED", "RECONNECTING"),
        ("RECONNECTING", "SUBSCRIBED"),
        ("SUBSCRIBED", "STOPPED"),
    ]
    assert close_reason in service.machine.history[2].reason
    # Resubscription: a second connection subscribed to the same channels and products.
    assert len(connections) == 2
    assert connections[0].faulted
    assert not connections[1].faulted
    assert connections[1].subscriptions == connections[0].subscriptions
    assert set(connections[1].subscriptions.get("level2", connections[1].subscriptions.get("level2_batch", []))) == set(
        SYMBOLS
    )
    found = gaps(events)
    assert found[gap_reason] >= 1, found
    statuses = [body(e, FeedStatus).state for e in events if e.kind == "STATUS" and e.symbol == "BTC-USD"]
    assert statuses[:2] == ["CONNECTING", "SUBSCRIBED"]
    assert "RECONNECTING" in statuses
    assert statuses[-1] == "SUBSCRIBED"
    per_symbol_snapshots = Counter(e.symbol for e in events if e.kind == "SNAPSHOT")
    assert per_symbol_snapshots == {s: 2 for s in SYMBOLS}
    if fault == "malformed":
        (letter,) = values_to_end(settings, TopicNames(settings.topic_prefix).dlq, DeadLetter)
        assert letter.error_type == "MalformedFrame"
        assert letter.source_topic == TopicNames(settings.topic_prefix).md_raw
        connection_id, frame_index = letter.source_ref.rsplit(":", 1)
        raw = values_to_end(settings, TopicNames(settings.topic_prefix).md_raw, RawFrame)
        (frame,) = [r for r in raw if r.connection_id == connection_id and r.frame_index == int(frame_index)]
        assert frame.text.encode() == letter.source_value


def test_a_short_delay_is_no_gap_and_the_book_matches(make_settings: Callable[..., Any]) -> None:
    plan = FaultPlan(delay_after=20, delay_ms=300, delay_frames=3)
    with serve_in_thread(synthetic_server("exchange", plan)) as running:
        settings = ingest_settings(make_settings, running.url, "exchange")
        with running_ingest(settings) as service:
            events = wait_for_books_to_match(settings, running)
        delayed = running.call(lambda: running.server.connections[0].delayed)
    assert delayed == 3
    assert gaps(events) == Counter({"RECONNECT": 2})
    assert service.stats.connections == 1


class StallingProducer:
    """A real producer whose ``produce`` waits while ``stalled`` is set (a broker that cannot keep up)."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.stalled = threading.Event()
        self.resume = threading.Event()

    def produce(self, *args: Any, **kwargs: Any) -> None:
        if self.stalled.is_set():
            self.resume.wait(60)
        self._producer.produce(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


@pytest.mark.parametrize(
    "limit",
    [{"ingest_queue_max": 30}, {"ingest_queue_max_bytes": 12_000}],
    ids=["30 records", "12 kB of frames"],
)
def test_backpressure_overflow_is_recorded_as_a_gap_and_resynced(
    make_settings: Callable[..., Any], limit: dict[str, int]
) -> None:
    with serve_in_thread(synthetic_server("advanced", max_updates=20_000, rate=3000.0)) as running:
        # Ticks once a second, so that frames (not a clock tick) find the queue full first. The
        # queue is full at 30 records, or (the other limit at its default) at 12 kB of frame text.
        settings = ingest_settings(make_settings, running.url, "advanced", tick_ms=1000, delta_ms=1000, **limit)
        service_producer = StallingProducer(make_producer(settings, "ingest-test"))
        with running_ingest(settings, producer=service_producer) as service:  # type: ignore[arg-type]
            wait_for(lambda: service.machine.state is FeedState.SUBSCRIBED, message="subscribed")
            # Clock ticks fall on whole seconds. Stall early in a second: the frames (3000/s) fill the
            # 30-record queue within milliseconds, long before the next tick could find it full first
            # (an overflow started by a tick drops no frame, which once failed this test in CI).
            wait_for(lambda: 0.05 <= time.time() % 1.0 <= 0.4, interval=0.01, message="early in a second")
            service_producer.stalled.set()  # the writer blocks on its next record; the reader keeps reading
            wait_for(lambda: service.stats.overflows >= 1, timeout=20, message="an overflow")
            service_producer.stalled.clear()
            service_producer.resume.set()
            events = wait_for_books_to_match(settings, running)
            wait_for(lambda: service.stats.raw_written > 0)
    raw = values_to_end(settings, TopicNames(settings.topic_prefix).md_raw, RawFrame)
    overflows = [r for r in raw if r.kind == "OVERFLOW"]
    assert overflows, "the overflow is in the raw log"
    # Nothing silently dropped: every frame received is either in the log or named by an OVERFLOW record.
    logged = [r for r in raw if r.kind == "FRAME"]
    named = 0
    for record in overflows:
        match = re.search(r"(\d+) frames not logged(?: \(frame_index (\d+)\.\.(\d+)\))?", record.text)
        assert match, record.text
        named += int(match.group(1))
        indexes = sorted(r.frame_index for r in logged if r.connection_id == record.connection_id)
        assert indexes == list(range(len(indexes)))  # the log of the connection has no hole...
        if match.group(2):
            assert int(match.group(2)) == len(indexes)  # ...and the loss starts right after it
    assert len(logged) + named == service.stats.frames
    assert named == service.stats.dropped_frames > 0
    assert gaps(events)["BUFFER_OVERFLOW"] >= 1
    assert (FeedState.SUBSCRIBED.value, FeedState.RECONNECTING.value) in transitions(service)


class RawKindRecorder:
    """A real producer that also records the kind and connection of every ``md.raw`` record it is given."""

    def __init__(self, producer: Producer, raw_topic: str) -> None:
        self._producer = producer
        self._raw_topic = raw_topic
        self._serde = AvroSerde()
        self.raw: list[tuple[str, str]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **kwargs: Any) -> None:
        self._producer.produce(topic, value=value, key=key, **kwargs)
        if topic == self._raw_topic:
            record = self._serde.decode_as(value or b"", topic, RawFrame)
            self.raw.append((record.kind, record.connection_id))

    def clocks(self) -> int:
        return sum(1 for kind, _ in self.raw if kind == "CLOCK")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def test_clock_ticks_during_a_reconnect_belong_to_the_previous_connection_and_windows_start_in_either(
    make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect handshake takes several ticks (a TLS handshake to Coinbase takes ~250 ms; loopback
    ~1 ms, so the second connect here waits until three CLOCK records were written first). Those
    ticks carry the previous connection's id, never the id of a connection that has not connected
    yet, and a replay window starting inside the new connection or inside the handshake finds its
    CONNECTED record."""
    import quotewatch.services.ingest.connection as ingest_module

    real_connect = ingest_module.connect
    recorder: list[RawKindRecorder] = []
    connects: list[int] = []

    async def slow_reconnect(*args: Any, **kwargs: Any) -> Any:
        connects.append(1)
        if len(connects) > 1:
            wanted = recorder[0].clocks() + 3
            async with asyncio.timeout(20):
                while recorder[0].clocks() < wanted:
                    await asyncio.sleep(0.01)
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "connect", slow_reconnect)
    with serve_in_thread(synthetic_server("advanced", FaultPlan(drop_after=150))) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        names = TopicNames(settings.topic_prefix)
        recorder.append(RawKindRecorder(make_producer(settings, "ingest-test"), names.md_raw))
        with running_ingest(settings, producer=recorder[0]) as service:  # type: ignore[arg-type]
            wait_for_books_to_match(settings, running)
    assert service.stats.connections == 2
    logged = read_to_end(settings, names.md_raw, RawFrame)
    raw = [record.value for record in logged]
    connected = [i for i, r in enumerate(raw) if r.kind == "CONNECTED"]
    assert len(connected) == 2
    first, second = raw[connected[0]].connection_id, raw[connected[1]].connection_id
    # Every CLOCK carries the connection of the latest CONNECTED record before it.
    latest = ""
    for record in raw:
        if record.kind == "CONNECTED":
            latest = record.connection_id
        elif record.kind == "CLOCK":
            assert record.connection_id == latest, (record.ts_init, record.connection_id, latest)
    disconnected = next(i for i, r in enumerate(raw) if r.kind == "DISCONNECTED")
    handshake = raw[disconnected + 1 : connected[1]]
    assert len(handshake) >= 3
    assert {(r.kind, r.connection_id) for r in handshake} == {("CLOCK", first)}

    with TopicReader(settings, names.md_raw, AvroSerde()) as reader:
        inside_second = find_raw_start(reader, raw[connected[1] + 20].ts_init)
        inside_handshake = find_raw_start(reader, handshake[1].ts_init)
    assert (inside_second.offset, inside_second.connection_id) == (logged[connected[1]].offset, second)
    assert (inside_handshake.offset, inside_handshake.connection_id) == (logged[connected[0]].offset, first)


def test_topic_mode_renormalises_the_raw_log_byte_for_byte(
    make_settings: Callable[..., Any], topic_prefix: str
) -> None:
    plan = FaultPlan(skip_sequence_after=40)
    with serve_in_thread(synthetic_server("advanced", plan)) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        with running_ingest(settings):
            wait_for_books_to_match(settings, running)
    live = TopicNames(settings.topic_prefix)
    replay_settings = make_settings(IngestSettings, topic_prefix=f"{topic_prefix}r", ingest_source="topic")
    ensure_topics(make_admin(replay_settings), replay_settings.topic_prefix)
    replay = TopicNames(replay_settings.topic_prefix)
    raw_values = _values(settings, live.md_raw)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.idempotence": True})
    for key, value in raw_values[0]:
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
    replayed = _values(replay_settings, replay.md_events)
    assert expected > 100
    assert replayed == live_events  # per partition, in order, key and value bytes identical


def _values(settings: Any, topic: str) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
    """Raw (key, value) bytes of every committed record of ``topic``, per partition, in order."""
    out: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    for partition, _, _, message in _messages_to_end(settings, topic, 30.0):
        out.setdefault(partition, []).append((message.key(), message.value()))
    return out


def test_a_capture_replayed_through_the_server_gives_the_reference_book(make_settings: Callable[..., Any]) -> None:
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("exchange_level2_ticker_matches"))
    capture = read_capture(path)
    server = FeedServer("exchange", CaptureSource(capture, speed=None), heartbeat_interval=0.25)
    with serve_in_thread(server) as running:
        settings = ingest_settings(make_settings, running.url, "exchange", symbols=",".join(capture.symbols))
        reference = reference_books(capture.lines)
        topic = TopicNames(settings.topic_prefix).md_events
        with running_ingest(settings) as service:
            wait_for(lambda: running.call(lambda: any(c.replay_finished for c in server.connections)), timeout=60)

            def rebuilt() -> bool:
                books = books_from_events(values_to_end(settings, topic, MarketEvent))
                return all(s in books and books[s].as_dict() == reference[s] for s in capture.symbols)

            wait_for(rebuilt, timeout=90, interval=1.0, message="the capture's book from md.events")
    assert service.stats.connections == 1
    assert service.stats.dead_letters == 0


def _refuses_large_records(settings: IngestSettings, topic: str) -> bool:
    """Produce one 3000-byte random (incompressible) probe to every partition of ``topic``; True if all are refused."""
    overrides: dict[str, Any] = {"enable.idempotence": False, "retries": 0}
    producer = make_producer(settings, "size-probe", **overrides)
    refused: list[bool] = []

    def report(err: Any, _msg: Any) -> None:
        refused.append(err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE)

    partitions = producer.list_topics(topic, timeout=10).topics[topic].partitions
    for partition in partitions:
        producer.produce(topic, value=os.urandom(3000), partition=partition, on_delivery=report)
    producer.flush(10)
    return len(refused) == len(partitions) and all(refused)


def test_a_delivery_failure_is_fatal_not_silent(make_settings: Callable[..., Any]) -> None:
    """The broker refuses the events (too large for the topic): the ingest stops with an error."""
    with serve_in_thread(synthetic_server("advanced")) as running:
        settings = ingest_settings(make_settings, running.url, "advanced")
        admin = make_admin(settings)
        topic = TopicNames(settings.topic_prefix).md_events
        resource = ConfigResource(
            ConfigResource.Type.TOPIC,
            topic,
            incremental_configs=[ConfigEntry("max.message.bytes", "2000", incremental_operation=AlterConfigOpType.SET)],
        )
        for future in admin.incremental_alter_configs([resource]).values():
            future.result()
        # The controller has accepted the change; the partition leaders apply it a moment later.
        # Wait until the broker actually refuses a large record (else the first, large snapshot
        # events may still be accepted and the small updates after them never fail).
        wait_for(
            partial(_refuses_large_records, settings, topic),
            timeout=30,
            interval=0.2,
            message=f"{topic} refusing records over 2000 bytes",
        )
        clock = SystemClock()
        service = IngestService(settings, serde=AvroSerde(), clock=clock, liveness=Liveness("ingest", clock, 30))
        with pytest.raises(FatalError, match="not delivered"):
            asyncio.run(asyncio.wait_for(service.run(), 60))
    assert service.machine.state is FeedState.STOPPED
