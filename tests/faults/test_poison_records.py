"""Poison records injected into each topic mid-stream: each lands in ``qw.dlq`` with its coordinates,
from every service that reads the topic, and every service keeps going.

The whole pipeline runs as real processes on the session broker. Into each of the six data topics
(between the live records of a live symbol's partition) go records that cannot be processed: bytes
that are no Avro at all, and a valid record of the topic's schema cut in half (right header and
schema fingerprint, truncated body); into ``md.events`` also a valid snapshot with more levels than
the decoded-record limit (``quotewatch.core.limits``), refused before it is decoded. Each must
come back as a DeadLetter naming the service, the source topic, partition and offset, and carrying
the original bytes; afterwards the pipeline must still give every other offset exactly once
downstream (the poison in no output and no lake file, its offset still covered by the lake's chunk
ranges).

``qw.snapshot`` is left out on purpose: its only reader, the dashboard, skips and counts an
undecodable snapshot instead of dead-lettering it (every dashboard process re-reads the compacted
topic from the start, so each would write the same dead letter again; see
``quotewatch.services.dashboard.consumer``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from msgspec.structs import replace

from quotewatch.core.limits import MAX_BOOK_LEVELS
from quotewatch.core.records import BookLevel, BookSnapshot, DeadLetter, MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import CATALOG, TopicNames
from tests.faults.conftest import FaultReport
from tests.faults.support import Pipeline, PipelineConfig, read_all, trials, verify_pipeline
from tests.records import checked
from tests.unit.core.test_schemas_and_serde import typed_sample

READERS = {
    "md.raw": ("lake-sink",),
    "md.events": ("book", "lake-sink"),
    "book.top3": ("labeler", "lake-sink"),
    "features": ("inference", "lake-sink"),
    "labels": ("inference", "lake-sink"),
    "predictions": ("lake-sink",),
}


def poison_values(topic: str, suffix: str) -> list[bytes]:
    """Not Avro at all, a valid record of the topic's schema with its body cut in half, and for
    ``md.events`` a valid snapshot beyond the decoded-record limits (its levels would decode into
    ~60 MiB; at the topic's size limit, GBs).
    """
    serde = AvroSerde()
    valid = serde.encode(topic, typed_sample(CATALOG[suffix].value_schema))
    values = [b"\x00\x01 this is not an Avro record", valid[: 10 + (len(valid) - 10) // 2]]
    if suffix == "md.events":
        values.append(serde.encode(topic, oversized_snapshot()))
    return values


def oversized_snapshot() -> MarketEvent:
    """A BTC-USD snapshot of MAX_BOOK_LEVELS + 1 empty levels (2 bytes each on the wire)."""
    levels = (BookLevel(price_e8=0, size_e8=0),) * (MAX_BOOK_LEVELS + 1)
    event = checked(typed_sample("quotewatch.MarketEvent"), MarketEvent)
    body = BookSnapshot(bids=levels[: len(levels) // 2], asks=levels[len(levels) // 2 :])
    return replace(event, symbol="BTC-USD", kind="SNAPSHOT", snapshot=body, update=None)


@pytest.mark.timeout(1800)
def test_poison_records_land_in_the_dlq_with_coordinates_and_the_services_keep_going(
    make_settings: Any, tmp_path: Path, fault_report: FaultReport
) -> None:
    rounds = trials(subset=1, full=5)
    settings = make_settings()
    names = TopicNames(settings.topic_prefix)
    pipeline = Pipeline(PipelineConfig(settings.kafka_bootstrap_servers, settings.topic_prefix, tmp_path))
    injected: list[tuple[str, int, int, bytes]] = []
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.idempotence": True})

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        injected.append((message.topic(), message.partition(), message.offset(), message.value()))

    try:
        pipeline.start()
        for _ in range(rounds):
            for name in ("book", "labeler", "inference", "lake-sink"):
                pipeline.wait_progress(name, 30)
            for suffix in READERS:
                topic = f"{settings.topic_prefix}.{suffix}"
                key = b"coinbase-advanced" if suffix == "md.raw" else b"BTC-USD"
                for value in poison_values(topic, suffix):
                    producer.produce(topic, key=key, value=value, on_delivery=delivered)
            assert producer.flush(30) == 0
        for name in ("book", "labeler", "inference", "lake-sink"):
            pipeline.wait_progress(name, 30)  # still processing after the last poison
        pipeline.finish()
        verdict = verify_pipeline(settings, pipeline.lake_dir, poison=[(t, p, o) for t, p, o, _ in injected])
        letters = read_all(settings, names.dlq)
    finally:
        pipeline.close()

    dead = [checked(r.value, DeadLetter) for r in letters]
    found = Counter(
        (letter.service, letter.source_topic, letter.source_partition, letter.source_offset, letter.source_value)
        for letter in dead
    )
    rows = []
    for suffix, readers in READERS.items():
        topic = f"{settings.topic_prefix}.{suffix}"
        mine = [(t, p, o, v) for t, p, o, v in injected if t == topic]
        expected = [(reader, t, p, o, v) for reader in readers for t, p, o, v in mine]
        missing = sum(1 for key in expected if found[key] == 0)
        twice = sum(found[key] - 1 for key in expected if found[key] > 1)
        rows.append((suffix, readers, len(mine), len(expected), missing, twice))
        fault_report.add(
            f"poison record in {suffix}",
            trials=len(mine),
            recovered=len(mine) - missing if verdict.ok else 0,
            lost=missing + (verdict.lost if suffix == "md.raw" else 0),
            duplicated=twice + (verdict.duplicated if suffix == "md.raw" else 0),
            notes=f"dead-lettered by {' and '.join(readers)} with topic/partition/offset and the original bytes"
            + ("; pipeline after the poison checked exactly once (totals on this row)" if suffix == "md.raw" else ""),
        )
    assert len(injected) == rounds * (len(READERS) * 2 + 1)
    assert verdict.ok, verdict.problems
    for suffix, readers, _, wanted, missing, _ in rows:
        assert missing == 0, f"{suffix}: {missing} of {wanted} dead letters from {readers} missing"
    unexpected = [key[:4] for key in found if key[1:4] not in {(t, p, o) for t, p, o, _ in injected}]
    assert unexpected == [], "dead letters for records that were not poison"
