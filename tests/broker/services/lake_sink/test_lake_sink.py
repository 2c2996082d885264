"""The lake sink on a real broker: every offset once with identical content, dead letters, crash repair."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from msgspec.structs import replace
from prometheus_client import REGISTRY

from quotewatch.core import lake
from quotewatch.core.clock import SystemClock
from quotewatch.core.config import LakeSinkSettings
from quotewatch.core.errors import FatalError
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, make_admin
from quotewatch.core.lake import LakeLocation, publish_file
from quotewatch.core.records import FeatureVector, MarketEvent
from quotewatch.core.serde import SINGLE_OBJECT_MAGIC, AvroSerde, registry_client
from quotewatch.core.topics import TopicNames
from quotewatch.services.lake_sink.sink import LakeSink
from tests.helpers import RegistryOutage, read_topic, wait_for
from tests.records import checked, plain
from tests.unit.services.lake_sink.factories import (
    ProducedRecord,
    assert_lake_holds_exactly,
    capture_records,
    committed_everything,
    committed_offsets,
    lake_offsets,
    produce_records,
    rows_in_lake,
)

LAKE_SUFFIXES = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")


class SimulatedCrash(BaseException):
    """Raised by a publisher to stop the sink dead, like a kill: nothing after it runs (no commit)."""


@contextmanager
def running_sink(
    settings: LakeSinkSettings,
    *,
    publish: Callable[[LakeLocation, str, bytes], None] = publish_file,
    crash_expected: bool = False,
    fails_with: type[BaseException] = SimulatedCrash,
    liveness: Liveness | None = None,
    group_id: str | None = None,
    consumer_overrides: dict[str, Any] | None = None,
    serde: AvroSerde | None = None,
) -> Iterator[LakeSink]:
    shutdown = ShutdownSignal()
    sink = LakeSink(
        settings=settings,
        serde=serde or AvroSerde(),
        clock=SystemClock(),
        shutdown=shutdown,
        liveness=liveness or Liveness("lake-sink", SystemClock(), 30),
        publish=publish,
        group_id=group_id,
        consumer_overrides=consumer_overrides,
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        shutdown.set()
        thread.join(60)
        assert not thread.is_alive(), "sink did not stop"
        if crash_expected:
            assert len(errors) == 1, errors
            assert isinstance(errors[0], fails_with), errors
        else:
            assert not errors, errors


@pytest.fixture
def sink_settings(topics: Any, make_settings: Callable[..., Any], tmp_path: Path) -> LakeSinkSettings:
    settings: LakeSinkSettings = make_settings(
        LakeSinkSettings, lake_uri=str(tmp_path / "lake"), lake_flush_bytes=256 * 1024, lake_flush_seconds=0.5
    )
    return settings


def test_every_offset_lands_exactly_once_with_identical_content(sink_settings: LakeSinkSettings) -> None:
    records = capture_records(600)
    produced = produce_records(sink_settings, records, transaction_size=300)
    names = TopicNames(sink_settings.topic_prefix)
    topics = [f"{names.prefix}.{suffix}" for suffix in LAKE_SUFFIXES]
    root = Path(sink_settings.lake_uri)
    liveness = Liveness("lake-sink", SystemClock(), 30)
    rows_before = REGISTRY.get_sample_value(
        "quotewatch_lake_rows_written_total", {"service": "lake-sink", "topic": names.features}
    )
    labels = {"service": "lake-sink", "topic": names.features}
    consumed_before = REGISTRY.get_sample_value("quotewatch_records_in_total", labels) or 0
    with running_sink(sink_settings, liveness=liveness):
        wait_for(
            lambda: committed_everything(sink_settings, produced), timeout=90, interval=0.3, message="every record"
        )
    assert_lake_holds_exactly(root, produced)
    assert {r.topic for r in produced} == set(topics)
    # Committed offsets: after the last record of each partition (a transaction marker may follow it).
    for topic in topics:
        partitions = 1 if topic == names.md_raw else 3
        last = {r.partition: r.offset for r in produced if r.topic == topic}
        assert committed_offsets(sink_settings, topic, partitions) == [last[p] + 1 for p in range(partitions)]
    info = {i.topic: i for i in lake.lake_info(str(root))}
    assert sorted(info) == sorted(topics)
    for topic in topics:
        assert info[topic].healthy, lake.format_lake_info([info[topic]])
        assert info[topic].rows == sum(1 for r in produced if r.topic == topic)
        assert [(p.first_offset, p.holes) for p in info[topic].partitions] == [(0, [])] * len(info[topic].partitions)
    # The features partitions hold an aborted transaction and commit markers: none is a hole.
    assert sum(len(p.holes) for p in info[names.features].partitions + info[names.labels].partitions) == 0
    # The datasets open directly in DuckDB, pandas and polars.
    features = lake.dataset_uri(sink_settings.lake_uri, names.features)
    count = sum(1 for r in produced if r.topic == names.features)
    found = duckdb.execute(f"select count(*) from read_parquet('{features}/**/*.parquet', hive_partitioning=1)")
    assert found.fetchall() == [(count,)]
    assert len(pd.read_parquet(features)) == count
    assert (
        pl.scan_parquet(f"{features}/**/*.parquet", hive_partitioning=True).select(pl.len()).collect().item() == count
    )
    raw = lake.dataset_uri(sink_settings.lake_uri, names.md_raw)
    feeds = duckdb.execute(
        f"select distinct feed from read_parquet('{raw}/**/*.parquet', hive_partitioning=1) order by 1"
    )
    assert feeds.fetchall() == [("coinbase-advanced",), ("coinbase-exchange",)]
    events = lake.dataset_uri(sink_settings.lake_uri, names.md_events)
    hours = duckdb.execute(
        f"select distinct symbol, date, hour from read_parquet('{events}/**/*.parquet', hive_partitioning=1)"
    ).fetchall()
    expected_dirs = {lake.partition_dir(names.md_events, plain(value)) for _, value in records["md.events"]}
    assert {f"symbol={s}/date={d}/hour={h}" for s, d, h in hours} == expected_dirs
    assert len(expected_dirs) > len({checked(value, MarketEvent).symbol for _, value in records["md.events"]}), (
        "several hours"
    )
    # Health and metrics saw the progress.
    status = liveness.status()
    assert status.detail["records_processed"] >= len(produced)
    assert status.detail["positions"][f"{names.features}[0]"] == committed_offsets(sink_settings, names.features, 3)[0]
    rows_after = REGISTRY.get_sample_value(
        "quotewatch_lake_rows_written_total", {"service": "lake-sink", "topic": names.features}
    )
    assert (rows_after or 0) - (rows_before or 0) == count
    assert (REGISTRY.get_sample_value("quotewatch_records_in_total", labels) or 0) - consumed_before == count


def test_poison_records_go_to_the_dlq_with_coordinates_and_the_sink_carries_on(
    sink_settings: LakeSinkSettings,
) -> None:
    names = TopicNames(sink_settings.topic_prefix)
    serde = AvroSerde()
    features = [value for _, value in capture_records(600)["features"][:3]]
    values = [
        serde.encode(names.features, features[0]),
        b"not avro at all",
        SINGLE_OBJECT_MAGIC + (0xDEADBEEF).to_bytes(8, "little") + b"\x00",
        serde.encode(names.features, replace(features[1], symbol="")),
        serde.encode(names.labels, capture_records(600)["labels"][0][1]),  # another schema on this topic
        serde.encode(names.features, features[2]),
    ]
    producer = Producer({"bootstrap.servers": sink_settings.kafka_bootstrap_servers})
    for value in values:
        producer.produce(names.features, key=b"BTC-USD", value=value, partition=1)
    assert producer.flush(10) == 0
    root = Path(sink_settings.lake_uri)
    with running_sink(sink_settings):
        wait_for(lambda: len(lake_offsets(root, names.features)) >= 2, message="the two good records")
        dead = read_topic(sink_settings, names.dlq, expected=4)
    assert lake_offsets(root, names.features) == [(1, 0), (1, 5)]
    assert [(d["source_topic"], d["source_partition"], d["source_offset"]) for d in dead] == [
        (names.features, 1, 1),
        (names.features, 1, 2),
        (names.features, 1, 3),
        (names.features, 1, 4),
    ]
    assert [d["error_type"] for d in dead] == ["DecodeError", "UnknownSchemaError", "LakeRecordError", "DecodeError"]
    assert dead[0]["source_value"] == b"not avro at all"
    assert dead[3]["source_value"] == values[4]
    assert all(d["service"] == "lake-sink" for d in dead)
    # The dead-lettered offsets lie inside the chunk ranges: the coverage has no hole.
    (info,) = [i for i in lake.lake_info(str(root)) if i.topic == names.features]
    assert [(p.partition, p.first_offset, p.last_offset, p.holes) for p in info.partitions] == [(1, 0, 5, [])]
    assert committed_offsets(sink_settings, names.features, 3)[1] == 6


def set_topic_config(settings: LakeSinkSettings, topic: str, name: str, value: str | None) -> None:
    """Set (or, with None, remove) one topic config override, waiting for the broker's answer."""
    operation = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    entry = ConfigEntry(name, value or "", incremental_operation=operation)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin = make_admin(settings)  # held until the answer: a collected client cancels its futures
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def test_dead_letters_are_acknowledged_before_the_files_of_their_chunk_are_written(
    sink_settings: LakeSinkSettings,
) -> None:
    """A chunk's range holds the offsets it dead-lettered, and a restarted sink skips a chunk it finds
    complete. Had the files come first, a sink stopped by a dead letter that could not be delivered
    would leave the chunk, and after the restart the poison record would be in neither the lake nor
    the DLQ.
    """
    names = TopicNames(sink_settings.topic_prefix)
    serde = AvroSerde()
    good = [value for _, value in capture_records(600)["features"][:2]]
    values = [serde.encode(names.features, good[0]), b"not avro at all", serde.encode(names.features, good[1])]
    producer = Producer({"bootstrap.servers": sink_settings.kafka_bootstrap_servers})
    for value in values:
        producer.produce(names.features, key=b"BTC-USD", value=value, partition=1)
    assert producer.flush(10) == 0
    root = Path(sink_settings.lake_uri)
    # The DLQ refuses every record (larger than its max.message.bytes): the dead letter fails.
    set_topic_config(sink_settings, names.dlq, "max.message.bytes", "64")
    liveness = Liveness("lake-sink", SystemClock(), 30)
    with running_sink(sink_settings, crash_expected=True, fails_with=FatalError, liveness=liveness):
        wait_for(lambda: not liveness.status().healthy, message="the sink to stop on the undelivered dead letter")
    assert "not delivered" in liveness.status().reason
    assert lake_offsets(root, names.features) == [], "files written before their dead letter was acknowledged"
    assert committed_offsets(sink_settings, names.features, 3)[1] < 0

    set_topic_config(sink_settings, names.dlq, "max.message.bytes", None)
    with running_sink(sink_settings):
        wait_for(lambda: len(lake_offsets(root, names.features)) >= 2, message="the two good records")
        (dead,) = read_topic(sink_settings, names.dlq, expected=1)
    assert (dead["source_topic"], dead["source_partition"], dead["source_offset"]) == (names.features, 1, 1)
    assert lake_offsets(root, names.features) == [(1, 0), (1, 2)]


def test_records_deleted_by_retention_while_assigned_show_as_a_hole(sink_settings: LakeSinkSettings) -> None:
    """A sink lagging behind retention: its position is deleted and the consumer jumps to the log start
    in the middle of a chunk. The lost range must stay a hole between two chunks, not be claimed by one.
    """
    names = TopicNames(sink_settings.topic_prefix)
    root = Path(sink_settings.lake_uri)
    produce_features(sink_settings, 5)
    liveness = Liveness("lake-sink", SystemClock(), 30)
    # Each fetch waits 5 s at the broker for 1 MB that never comes: the fetch after offsets 0-4 is
    # still waiting at offset 5 while 5-24 are produced and 5-19 deleted (as retention would).
    slow_fetch = {"fetch.min.bytes": 1_000_000, "fetch.wait.max.ms": 5000}
    settings = sink_settings.model_copy(update={"lake_flush_bytes": 10_000_000, "lake_flush_seconds": 3600})
    with running_sink(settings, liveness=liveness, consumer_overrides=slow_fetch):
        wait_for(lambda: liveness.status().detail["records_processed"] >= 5, message="offsets 0-4 consumed")
        produce_features(settings, 20, start=5)
        admin = make_admin(settings)
        for future in admin.delete_records([TopicPartition(names.features, 0, 20)]).values():
            future.result(30)
        wait_for(lambda: liveness.status().detail["records_processed"] >= 10, message="offsets 20-24 consumed")
    (info,) = [i for i in lake.lake_info(str(root)) if i.topic == names.features]
    (coverage,) = info.partitions
    assert (coverage.first_offset, coverage.last_offset, coverage.rows) == (0, 24, 10)
    assert coverage.holes == [(5, 19)], lake.format_lake_info([info])
    assert not info.healthy
    assert [offset for _, offset in lake_offsets(root, names.features)] == [0, 1, 2, 3, 4, 20, 21, 22, 23, 24]


def test_a_schema_registry_outage_is_waited_out_not_dead_lettered(sink_settings: LakeSinkSettings) -> None:
    names = TopicNames(sink_settings.topic_prefix)
    registry = registry_client(f"mock://{sink_settings.topic_prefix}")
    writer = AvroSerde(registry=registry)
    features = [value for _, value in capture_records(600)["features"][:3]]
    producer = Producer({"bootstrap.servers": sink_settings.kafka_bootstrap_servers})
    for value in features:
        producer.produce(names.features, key=b"BTC-USD", value=writer.encode(names.features, value), partition=2)
    assert producer.flush(10) == 0
    root = Path(sink_settings.lake_uri)
    outage = RegistryOutage(registry, failures=2)
    with running_sink(sink_settings, serde=AvroSerde(registry=outage)):
        wait_for(lambda: len(lake_offsets(root, names.features)) >= 3, message="the three records in the lake")
    assert lake_offsets(root, names.features) == [(2, 0), (2, 1), (2, 2)]
    assert outage.lookups == 3, "two failed lookups, then the schema was found and cached"
    assert read_topic(sink_settings, names.dlq, timeout=2) == [], "a registry outage is not the record's fault"


def produce_features(settings: LakeSinkSettings, count: int, start: int = 0) -> list[ProducedRecord]:
    """``count`` feature vectors of several symbols, all on partition 0 (several hive directories per chunk)."""
    names = TopicNames(settings.topic_prefix)
    serde = AvroSerde()
    # The 2021 capture's ten symbols tick together, so consecutive vectors alternate symbols.
    values = [
        value
        for _, value in capture_records()["features"]
        if isinstance(value, FeatureVector) and value.symbol not in ("BTC-USD", "ETH-USD")
    ]
    values = values[start : start + count]
    assert len(values) == count
    assert len({v.symbol for v in values[:40]}) >= 3
    delivered: list[Any] = []
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "on_delivery": lambda e, m: delivered.append(m)}
    )
    for value in values:
        encoded = serde.encode(names.features, value)
        producer.produce(names.features, key=value.symbol.encode(), value=encoded, partition=0)
    assert producer.flush(10) == 0
    return [ProducedRecord(m.topic(), m.partition(), m.offset(), m.key().decode(), m.value()) for m in delivered]


def files_of(root: Path, topic: str) -> dict[str, int]:
    """Relative path -> inode of every chunk file of a dataset."""
    dataset = root / topic
    return {str(p.relative_to(dataset)): p.stat().st_ino for p in dataset.rglob("*.parquet")}


def sink_committed_range(settings: LakeSinkSettings, count: int) -> list[ProducedRecord]:
    """A first stretch of features written and committed by a sink that stopped cleanly."""
    names = TopicNames(settings.topic_prefix)
    produced = produce_features(settings, count)
    with running_sink(settings):
        wait_for(lambda: committed_everything(settings, produced), interval=0.2, message="the first stretch")
    assert committed_offsets(settings, names.features, 3)[0] == produced[-1].offset + 1
    return produced


def test_a_crash_in_the_middle_of_a_chunk_is_repaired_under_the_same_file_names(
    sink_settings: LakeSinkSettings,
) -> None:
    names = TopicNames(sink_settings.topic_prefix)
    root = Path(sink_settings.lake_uri)
    produced = sink_committed_range(sink_settings, 50)
    committed = produced[-1].offset + 1
    before = files_of(root, names.features)
    produced += produce_features(sink_settings, 400, start=50)
    published: list[str] = []

    def crash_on_second_file(location: LakeLocation, path: str, data: bytes) -> None:
        if len(published) == 1:
            raise SimulatedCrash(path)
        publish_file(location, path, data)
        published.append(path)

    # A size cut after ~40 KB: the chunk spans several symbols; the crash leaves one file of it.
    crashing = sink_settings.model_copy(update={"lake_flush_bytes": 40_000, "lake_flush_seconds": 3600})
    with running_sink(crashing, publish=crash_on_second_file, crash_expected=True):
        wait_for(lambda: len(published) == 1, message="the first file of the next chunk")
    (partial,) = set(files_of(root, names.features)) - set(before)
    chunk = lake.chunk_description(pq.read_metadata(root / names.features / partial))
    assert chunk is not None
    assert chunk.first_offset == committed
    assert len(chunk.files) >= 3
    assert committed_offsets(sink_settings, names.features, 3)[0] == committed, "the crashed run committed nothing"
    # Restarted with other flush settings: the incomplete chunk is still rewritten with its own boundaries.
    restarted = sink_settings.model_copy(update={"lake_flush_bytes": 10_000_000, "lake_flush_seconds": 0.3})
    with running_sink(restarted):
        wait_for(lambda: committed_everything(sink_settings, produced), interval=0.2, message="all features")
    assert_lake_holds_exactly(root, produced)
    assert set(chunk.files) <= set(files_of(root, names.features))
    (info,) = [i for i in lake.lake_info(str(root)) if i.topic == names.features]
    assert info.healthy, lake.format_lake_info([info])
    parsed = [lake.parse_file_name(Path(p).name) for p in files_of(root, names.features)]
    chunks = sorted({c for c in parsed if c is not None})
    assert [(c.first_offset, c.last_offset) for c in chunks][-2:] == [
        (committed, chunk.last_offset),
        (chunk.last_offset + 1, produced[-1].offset),
    ], "the rewritten chunk, then one chunk for the rest"


def test_files_written_but_not_committed_before_a_crash_are_kept_not_written_again(
    sink_settings: LakeSinkSettings,
) -> None:
    names = TopicNames(sink_settings.topic_prefix)
    root = Path(sink_settings.lake_uri)
    produced = sink_committed_range(sink_settings, 50)
    committed = produced[-1].offset + 1
    first_stretch = set(files_of(root, names.features))
    produced += produce_features(sink_settings, 400, start=50)
    chunk_files: list[str] = []

    def crash_after_a_complete_chunk(location: LakeLocation, path: str, data: bytes) -> None:
        publish_file(location, path, data)
        new = set(files_of(root, names.features)) - first_stretch
        description = lake.chunk_description(pq.read_metadata(root / names.features / min(new)))
        assert description is not None
        if set(description.files) <= new:
            chunk_files.extend(description.files)
            raise SimulatedCrash("after the last file of the chunk, before the commit")

    crashing = sink_settings.model_copy(update={"lake_flush_bytes": 40_000, "lake_flush_seconds": 3600})
    with running_sink(crashing, publish=crash_after_a_complete_chunk, crash_expected=True):
        wait_for(lambda: chunk_files, message="a complete chunk")
    before = {path: inode for path, inode in files_of(root, names.features).items() if path not in first_stretch}
    assert set(before) == set(chunk_files)
    assert committed_offsets(sink_settings, names.features, 3)[0] == committed, "the crashed run committed nothing"
    with running_sink(sink_settings):
        wait_for(lambda: committed_everything(sink_settings, produced), interval=0.2, message="all features")
    assert_lake_holds_exactly(root, produced)
    after = files_of(root, names.features)
    assert {path: after[path] for path in before} == before, "the crashed run's files were kept, not rewritten"
    assert committed_offsets(sink_settings, names.features, 3)[0] == produced[-1].offset + 1


def test_without_a_committed_offset_the_sink_resumes_after_the_lake(sink_settings: LakeSinkSettings) -> None:
    names = TopicNames(sink_settings.topic_prefix)
    produced = produce_features(sink_settings, 120)
    root = Path(sink_settings.lake_uri)
    with running_sink(sink_settings):
        wait_for(lambda: committed_everything(sink_settings, produced), interval=0.2, message="all features")
    more = produce_features(sink_settings, 60)
    # A group that never committed (offsets expired, or a redeployed sink) must not write the lake's range again.
    fresh_group = f"{sink_settings.topic_prefix}.lake-sink-redeployed"
    with running_sink(sink_settings, group_id=fresh_group):
        wait_for(
            lambda: len(lake_offsets(root, names.features)) >= len(produced) + len(more), message="the new features"
        )
    assert_lake_holds_exactly(root, produced + more)
    assert committed_offsets(sink_settings, names.features, 3, group=fresh_group)[0] == more[-1].offset + 1
    # With nothing new to read, a fresh group still commits what the lake already holds (no phantom lag).
    idle_group = f"{sink_settings.topic_prefix}.lake-sink-idle"
    with running_sink(sink_settings, group_id=idle_group):
        wait_for(lambda: committed_everything(sink_settings, produced + more, group=idle_group), message="commits")
    assert_lake_holds_exactly(root, produced + more)


def test_two_sinks_in_one_group_hand_partitions_over_without_losing_or_repeating_an_offset(
    sink_settings: LakeSinkSettings,
) -> None:
    names = TopicNames(sink_settings.topic_prefix)
    topics = [f"{names.prefix}.{suffix}" for suffix in LAKE_SUFFIXES]
    root = Path(sink_settings.lake_uri)
    records = capture_records(600)
    early = {suffix: values[: len(values) // 2] for suffix, values in records.items()}
    late = {suffix: values[len(values) // 2 :] for suffix, values in records.items()}
    produced = produce_records(sink_settings, early, transaction_size=200)
    with running_sink(sink_settings):
        wait_for(lambda: rows_in_lake(root, topics) > 0, interval=0.2, message="the first sink writing")
        # A second instance joins (a rebalance: the first hands its buffers over as files), then leaves.
        with running_sink(sink_settings.model_copy(update={"instance_id": "1"})):
            produced += produce_records(sink_settings, late, transaction_size=200)
            wait_for(
                lambda: committed_everything(sink_settings, produced), timeout=90, interval=0.3, message="every record"
            )
    assert_lake_holds_exactly(root, produced)
    assert all(info.healthy for info in lake.lake_info(str(root)))
