"""Lake sink throughput through the real broker, next to a plain confluent-kafka consume of the same records.

The records are the three recorded Coinbase captures run through the real normaliser, book,
features and labeler (plus predictions), produced once to a fresh namespace: ``md.raw`` and
``md.events`` plainly, the derived topics in transactions. Then, in the same run:

- **peer**: a plain confluent-kafka consumer (read_committed, the sink's consumer config) reads
  every record of the six topics and touches its bytes;
- **lake sink**: :class:`~quotewatch.services.lake_sink.sink.LakeSink` (decode, Arrow, zstd Parquet,
  fsync + rename, commit) from the same records until every one is written and committed.

rows/s and MB/s count the Avro record bytes consumed; the Parquet bytes written are in the notes.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import LakeSinkSettings
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, consumer_config, ensure_topics, make_admin
from quotewatch.core.lake import LAKE_TOPICS, lake_info
from quotewatch.core.serde import AvroSerde
from quotewatch.services.lake_sink.sink import LakeSink
from tests.benchmarks.harness import Context, Result, consume_exactly
from tests.unit.services.lake_sink.factories import capture_records, produce_records


def _plain_consume(settings: LakeSinkSettings, topics: list[str], expected: int) -> tuple[float, int]:
    """Seconds to consume ``expected`` records of ``topics`` with a plain consumer, and their bytes."""
    consumer = Consumer(consumer_config(settings, f"bench-plain-{uuid.uuid4().hex[:8]}", "bench-plain"))
    metadata = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(t, p, 0) for t in topics for p in metadata[t].partitions])
    started = time.perf_counter()
    try:
        size = consume_exactly(consumer, expected, 300, "plain consumer")
    finally:
        consumer.close()
    return time.perf_counter() - started, size


def _sink(settings: LakeSinkSettings, expected: int) -> float:
    """Seconds for the lake sink to write and commit ``expected`` records (including its final flush).

    Timed from its first consumed batch: the consumer group join (the broker delays a new group's
    first rebalance by group.initial.rebalance.delay.ms) is not throughput.
    """
    liveness = Liveness("lake-sink-bench", SystemClock(), 300)
    shutdown = ShutdownSignal()
    sink = LakeSink(
        settings=settings,
        serde=AvroSerde(),
        clock=SystemClock(),
        shutdown=shutdown,
        liveness=liveness,
        service="lake-sink-bench",
        group_id=f"bench-sink-{uuid.uuid4().hex[:8]}",
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.perf_counter() + 600
    started: float | None = None
    while (processed := liveness.status().detail["records_processed"]) < expected and time.perf_counter() < deadline:
        if errors:
            raise errors[0]
        if started is None and processed:
            started = time.perf_counter()  # the group is joined and the first batch is in
        time.sleep(0.005)
    shutdown.set()  # cuts every buffer into files and commits
    thread.join(120)
    if errors:
        raise errors[0]
    if started is None:
        raise RuntimeError("the lake sink processed nothing")
    return time.perf_counter() - started


def run(ctx: Context) -> list[Result]:
    bootstrap = ctx.broker()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    lake_root = ctx.scratch / "lake"
    settings = LakeSinkSettings(
        kafka_bootstrap_servers=bootstrap, topic_prefix=prefix, lake_uri=str(lake_root), metrics_port=0
    )
    ensure_topics(make_admin(settings), prefix)
    records = capture_records(2000 if ctx.quick else None)
    produced = produce_records(settings, records, transaction_size=500)
    topics = [spec.name(prefix) for spec in LAKE_TOPICS]
    expected = len(produced)
    avro_mb = sum(len(r.value) for r in produced) / 1e6

    # The records made for producing stay alive in this process: freeze them so that the cyclic
    # GC does not walk them again and again while the sink (a separate process in production) runs.
    gc.collect()
    gc.freeze()
    plain_seconds = min(_plain_consume(settings, topics, expected)[0] for _ in range(2))
    sink_seconds = _sink(settings, expected)
    infos = lake_info(str(lake_root))
    rows = sum(info.rows for info in infos)
    files = sum(info.files for info in infos)
    parquet_mb = sum(info.bytes for info in infos) / 1e6
    if rows != expected or not all(info.healthy for info in infos):
        raise RuntimeError(f"the lake holds {rows} rows for {expected} records (or has holes)")
    notes = (
        f"{expected:,} records ({avro_mb:.1f} MB Avro) of the three captures over 6 topics (16 partitions); "
        f"default LAKE_FLUSH_BYTES/SECONDS, so files are cut at shutdown: {files} files, "
        f"{parquet_mb:.1f} MB zstd Parquet. Timed from the sink's first batch (group join excluded) to its last "
        "commit. Peer: plain confluent-kafka consume (read_committed, assign), best of 2. Most of the sink's "
        "time is Avro decoding (AvroSerde.decode, ~35 µs/record here) and dict -> Arrow conversion."
    )
    return [
        Result(
            suite="lake",
            name="lake sink rows/s (decode, Arrow, Parquet, fsync, commit)",
            value=expected / sink_seconds,
            unit="rows/s",
            peer="plain confluent-kafka consume",
            peer_value=expected / plain_seconds,
            notes=notes,
        ),
        Result(
            suite="lake",
            name="lake sink MB/s of Avro records",
            value=avro_mb / sink_seconds,
            unit="MB/s",
            peer="plain confluent-kafka consume",
            peer_value=avro_mb / plain_seconds,
        ),
    ]
