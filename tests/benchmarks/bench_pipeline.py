"""The stream pipeline end to end through the broker, next to the broker's own limit on this machine.

Input: the synthetic market (BTC-USD and ETH-USD at 300 level updates/s each) normalised into
MarketEvent records (snapshots, updates, trades, heartbeats, clock ticks), ``MINUTES`` of it.

- **pipeline**: ``quotewatch run book``, ``labeler`` and ``inference`` (fallback model) run as
  processes on a fresh namespace and are up (``/health`` answers) before anything is published;
  then the md.events backlog is produced as fast as the producer goes (like a replay at
  ``--speed max``) and the clock runs until the last feature tick has its served prediction and
  the last label is committed (read_committed). Rate: md.events records per second, end to end
  (3 exactly-once stages, each a transaction per batch).
- **peers (the local limit)**: the same number of records of the same mean size (random bytes,
  so compression cannot flatter them) produced with the services' producer settings (idempotent,
  acks=all, lz4) to a 3-partition topic until flushed, then read back by a plain read_committed
  consumer: what the broker and the client do on this machine with nothing else in the way.

The replay suite (``bench_replay``) measures the replay publisher and the ingest's topic mode in
front of the same services; this one isolates the three exactly-once stages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config, ensure_topics, make_admin, producer_config
from quotewatch.core.records import MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.local.kafka import free_port
from quotewatch.services.replay.engine import BacktestEngine
from tests.benchmarks.harness import Context, Result, consume_exactly, produce_when_room

SUITE = "pipeline"
QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
SERVICES = ("book", "labeler", "inference")


def market_events(minutes: float) -> list[MarketEvent]:
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=29, rate=300.0)
    events, _ = Normaliser().process_all(synthetic_raw_frames(FEED_ADVANCED, config, int(minutes * 60e9)))
    return events


def _produce(producer: Producer, topic: str, values: list[tuple[bytes, bytes]]) -> float:
    started = time.perf_counter()
    for key, value in values:
        try:
            producer.produce(topic, value, key)
        except BufferError:
            produce_when_room(producer, topic, value, key, pause=0.05)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"{topic}: records still undelivered after 120 s")
    return time.perf_counter() - started


def _consume_count(settings: CommonSettings, topic: str, expected: int, timeout: float = 600) -> float:
    """Seconds for a plain read_committed consumer to read ``expected`` records of ``topic`` from the start."""
    consumer = Consumer(consumer_config(settings, f"bench-{uuid.uuid4().hex[:8]}", "bench-plain"))
    try:
        partitions = make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        started = time.perf_counter()
        consume_exactly(consumer, expected, timeout, topic)
        return time.perf_counter() - started
    finally:
        consumer.close()


def _committed(settings: CommonSettings, topic: str, expected: int, deadline: float) -> None:
    _consume_count(settings, topic, expected, timeout=max(1.0, deadline - time.monotonic()))


def _peers(settings: CommonSettings, count: int, size: int) -> tuple[float, float]:
    """(produce seconds, consume seconds) of ``count`` random records of ``size`` bytes."""
    topic = f"{settings.topic_prefix}.plain"
    admin = make_admin(settings)
    admin.create_topics([NewTopic(topic, num_partitions=3)])[topic].result(30)
    keys = (b"BTC-USD", b"ETH-USD")
    values = [(keys[i % 2], os.urandom(size)) for i in range(count)]
    producer = Producer(producer_config(settings, "bench-plain"))
    produce_seconds = _produce(producer, topic, values)
    return produce_seconds, _consume_count(settings, topic, count)


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def run(ctx: Context) -> list[Result]:
    minutes = 2.0 if ctx.quick else 8.0
    settings = CommonSettings(kafka_bootstrap_servers=ctx.broker(), topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    names = TopicNames(settings.topic_prefix)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    events = market_events(minutes)
    engine = BacktestEngine(100, 500).run_events(events)
    ticks, labels = engine.counts.feature_vectors, engine.counts.labels
    serde = AvroSerde()
    values = [(e.symbol.encode(), serde.encode(names.md_events, e)) for e in events]
    mean_size = round(sum(len(v) for _, v in values) / len(values))

    logs = ctx.scratch / f"pipeline-{settings.topic_prefix}"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_", "TOPIC_PREFIX"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        TOPIC_PREFIX=settings.topic_prefix,
        SYMBOLS="BTC-USD,ETH-USD",
        LOG_LEVEL="WARNING",
        MODEL_URI=f"models:/absent-{uuid.uuid4().hex[:6]}@champion",
    )
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SERVICES:
            port = free_port()
            with (logs / f"{name}.log").open("wb") as out:
                processes[name] = subprocess.Popen(
                    [QUOTEWATCH, "run", name], env={**env, "METRICS_PORT": str(port)}, stdout=out, stderr=out
                )
            deadline = time.monotonic() + 120
            while not _healthy(port):
                if time.monotonic() > deadline or processes[name].poll() is not None:
                    raise RuntimeError(f"{name} did not come up; see {logs / (name + '.log')}")
                time.sleep(0.2)
        producer = Producer(producer_config(settings, "bench-replay-events"))
        started = time.perf_counter()
        publish_seconds = _produce(producer, names.md_events, values)
        deadline = time.monotonic() + 900
        _committed(settings, names.predictions, ticks, deadline)
        _committed(settings, names.labels, labels, deadline)
        end_to_end = time.perf_counter() - started
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    produce_seconds, consume_seconds = _peers(settings, len(values), mean_size)
    rate = len(values) / end_to_end
    shape = (
        f"{len(values):,} md.events records (mean {mean_size} B Avro; {minutes:g} min of 2 symbols at 300 updates/s) "
        f"-> {ticks:,} ticks with features and served predictions, {labels:,} labels; "
        f"publishing the backlog took {publish_seconds:.1f} s of the {end_to_end:.1f} s"
    )
    return [
        Result(
            SUITE,
            "md.events -> book -> labeler -> inference (processes, exactly-once), end to end",
            rate,
            "records/s",
            peer="plain produce of equal-sized records (idempotent, acks=all)",
            peer_value=len(values) / produce_seconds,
            notes=shape,
        ),
        Result(
            SUITE,
            "same pipeline vs a plain consumer of equal-sized records",
            rate,
            "records/s",
            peer="plain read_committed consume",
            peer_value=len(values) / consume_seconds,
            notes=f"feature ticks end to end: {ticks / end_to_end:,.0f}/s",
        ),
    ]
