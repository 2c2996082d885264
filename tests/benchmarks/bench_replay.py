"""Replay through the broker with the services running: raw level updates per second.

A synthetic raw log (BTC-USD and ETH-USD at 200 level updates/s each) is written to ``S.md.raw``.
In the same run, side by side:

- **peer**: a plain confluent-kafka consumer reading ``S.md.raw`` from the first to the last
  offset (no decoding): the broker's read rate for this topic on this machine. It reads the window
  in ~0.15 s, so the median of several reads;
- **replay**: :func:`quotewatch.services.replay.publisher.replay` of the whole window of ``S`` into a fresh
  namespace ``T`` at ``--speed max`` (read, forward, produce, every delivery checked), while
  ``quotewatch run ingest`` (INGEST_SOURCE=topic), ``book``, ``labeler`` and ``inference``
  (fallback model) run on ``T`` as processes and consume it. The rate is over the forwarding
  (``ReplaySummary.seconds``); the one-off setup (fresh-namespace check, topic creation, window
  search) is in the notes, and the whole call is on its own row;
- **replay, no service running**: the same into other namespaces that nothing consumes, median of
  several (what the tool does with the machine to itself; with the services, four CPU-bound
  processes share the 2 cores);
- **end to end**: from the replay's start until ``T.features`` holds every feature tick (the
  services re-normalised, booked and featured the replayed log).

Rates are level updates carried by the frames (counted by the normaliser) per second.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config, ensure_topics, make_admin, producer_config
from quotewatch.core.records import RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.replay.engine import BacktestEngine
from quotewatch.services.replay.publisher import replay
from quotewatch.services.replay.sources import SourceSpec, Window
from tests.benchmarks.harness import Context, Result, consume_exactly, produce_when_room

SUITE = "replay"
QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
SERVICES = ("ingest", "book", "labeler", "inference")
PEER_RUNS = 5
ALONE_RUNS = 3


def raw_log(minutes: float) -> list[RawFrame]:
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=17, rate=200.0)
    return list(synthetic_raw_frames(FEED_ADVANCED, config, int(minutes * 60 * 10**9)))


def level_updates(log: list[RawFrame]) -> int:
    events, _ = Normaliser().process_all(log)
    return sum(len(e.update.changes) for e in events if e.update is not None)


def produce(settings: CommonSettings, topic: str, log: list[RawFrame]) -> None:
    serde = AvroSerde()
    producer = Producer(producer_config(settings, "bench-replay"))
    for record in log:
        produce_when_room(producer, topic, serde.encode(topic, record), record.feed.encode())
        producer.poll(0)
    assert producer.flush(60) == 0


def plain_consume_seconds(settings: CommonSettings, topic: str, count: int) -> float:
    """A plain consumer from offset 0 to the last record of partition 0, values untouched."""
    consumer = Consumer(
        consumer_config(settings, f"bench-plain-{uuid.uuid4().hex[:6]}", "bench-plain", **{"fetch.wait.max.ms": 10})
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        started = time.perf_counter()
        consume_exactly(consumer, count, 300, topic)
        return time.perf_counter() - started
    finally:
        consumer.close()


def plain_copy_seconds(settings: CommonSettings, source: str, target: str, count: int) -> float:
    """A plain consume -> produce loop over the same records, with the replay's producer settings.

    What any client-side copy costs here: no window search, no checks but the final flush.
    """
    consumer = Consumer(consumer_config(settings, f"bench-copy-{uuid.uuid4().hex[:6]}", "bench-copy"))
    config = producer_config(settings, "bench-copy")
    config["delivery.report.only.error"] = True
    producer = Producer(config)
    try:
        consumer.assign([TopicPartition(source, 0, 0)])
        started = time.perf_counter()
        seen = 0
        while seen < count:
            for message in consumer.consume(min(1000, count - seen), 0.2):
                if message.error() is None:
                    seen += 1
                    try:
                        producer.produce(target, message.value(), message.key())
                    except BufferError:
                        produce_when_room(producer, target, message.value(), message.key())
            producer.poll(0)
        if producer.flush(60):
            raise RuntimeError(f"{target}: records still undelivered after 60 s")
        return time.perf_counter() - started
    finally:
        consumer.close()


def committed_count(settings: CommonSettings, topic: str, expected: int, timeout: float) -> None:
    """Read ``topic`` (read_committed) until ``expected`` records arrived."""
    consumer = Consumer(consumer_config(settings, f"bench-count-{uuid.uuid4().hex[:6]}", "bench-count"))
    try:
        partitions = make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        consume_exactly(consumer, expected, timeout, topic)
    finally:
        consumer.close()


def run(ctx: Context) -> list[Result]:
    minutes = 2.0 if ctx.quick else 30.0
    base = f"bench{uuid.uuid4().hex[:6]}"
    source = CommonSettings(kafka_bootstrap_servers=ctx.broker(), topic_prefix=base)
    target = TopicNames(f"{base}-t")
    ensure_topics(make_admin(source), source.topic_prefix)
    log = raw_log(minutes)
    updates = level_updates(log)
    features = BacktestEngine(100, 500).run_raw(log).counts.feature_vectors
    produce(source, TopicNames(base).md_raw, log)

    # The peer reads the whole topic in ~0.15 s on this machine: the median of several reads.
    plains = sorted(plain_consume_seconds(source, TopicNames(base).md_raw, len(log)) for _ in range(PEER_RUNS))
    plain = statistics.median(plains)
    # The same replay with nothing consuming the target: what the tool does with the CPUs to itself.
    alones = sorted(
        replay(source, SourceSpec("topic", base), Window(), f"{base}-alone{i}", progress=False).seconds
        for i in range(ALONE_RUNS)
    )
    alone = statistics.median(alones)
    copies = []
    for i in range(ALONE_RUNS):
        copy_target = TopicNames(f"{base}-copy{i}")
        ensure_topics(make_admin(source), copy_target.prefix)
        copies.append(plain_copy_seconds(source, TopicNames(base).md_raw, copy_target.md_raw, len(log)))
    copies.sort()
    copy = statistics.median(copies)

    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": source.kafka_bootstrap_servers,
        "TOPIC_PREFIX": target.prefix,
        "INGEST_SOURCE": "topic",
        "METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = ctx.scratch / f"replay-{base}"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for name in SERVICES:
            with (logs / f"{name}.log").open("wb") as out:
                processes.append(subprocess.Popen([QUOTEWATCH, "run", name], env=env, stdout=out, stderr=out))
        # The services are up when they have created their namespace's topics (service_context does first).
        deadline = time.monotonic() + 120
        while target.features not in make_admin(source).list_topics(timeout=10).topics:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"services did not start; see {logs}")
            time.sleep(0.2)
        started = time.perf_counter()
        summary = replay(source, SourceSpec("topic", base), Window(), target.prefix, progress=False)
        replay_seconds = time.perf_counter() - started
        committed_count(source, target.features, features, timeout=600)
        end_to_end = time.perf_counter() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert summary.records == len(log)
    notes = f"{len(log):,} raw records carrying {updates:,} level updates ({minutes:g} min, 2 symbols)"
    setup = replay_seconds - summary.seconds
    return [
        Result(
            SUITE,
            "replay topic -> fresh namespace (services consuming it)",
            updates / summary.seconds,
            "updates/s",
            peer="plain confluent-kafka consume of the source",
            peer_value=updates / plain,
            goal=">= 0.5x peer",
            met=plain / summary.seconds >= 0.5,
            notes=(
                f"{notes}; forwarding {summary.seconds:.2f} s + setup {setup:.2f} s (checks, topics, window); "
                f"peer: median of {PEER_RUNS} reads, {plains[0]:.2f}-{plains[-1]:.2f} s"
            ),
        ),
        Result(
            SUITE,
            "replay topic -> fresh namespace, no service running",
            updates / alone,
            "updates/s",
            peer="plain confluent-kafka consume of the source",
            peer_value=updates / plain,
            notes=(
                f"the same window, median of {ALONE_RUNS} ({alones[0]:.2f}-{alones[-1]:.2f} s); "
                "the services above compete for the 2 cores"
            ),
        ),
        Result(
            SUITE,
            "plain confluent-kafka copy (consume -> produce), no service running",
            updates / copy,
            "updates/s",
            peer="plain confluent-kafka consume of the source",
            peer_value=updates / plain,
            notes=(
                f"median of {ALONE_RUNS} ({copies[0]:.2f}-{copies[-1]:.2f} s): what a client-side copy costs "
                "on this broker, the replay's own floor"
            ),
        ),
        Result(
            SUITE,
            "replay call including its setup",
            updates / replay_seconds,
            "updates/s",
            peer="plain confluent-kafka consume of the source",
            peer_value=updates / plain,
        ),
        Result(
            SUITE,
            "replay end to end: until the services wrote every feature tick",
            updates / end_to_end,
            "updates/s",
            peer="plain confluent-kafka consume of the source",
            peer_value=updates / plain,
            notes=f"{features:,} feature ticks; ingest (topic mode) -> book -> labeler, inference on the fallback",
        ),
    ]
