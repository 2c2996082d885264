"""Serde: encode + decode per record for each topic's schema, in both framings (µs per record)."""

from __future__ import annotations

import msgspec

from quotewatch.core.records import TOPIC_RECORDS, Record
from quotewatch.core.serde import AvroSerde, registry_client
from quotewatch.core.topics import CATALOG
from tests.benchmarks.harness import Context, Result, best_of
from tests.unit.core.test_schemas_and_serde import sample_record


def run(ctx: Context) -> list[Result]:
    single = AvroSerde()
    confluent = AvroSerde(registry=registry_client("mock://bench"))
    number = 500 if ctx.quick else 5000
    results = []
    for spec in CATALOG.values():
        topic = spec.name("qw")
        record = msgspec.convert(
            sample_record(single.store.current(spec.value_schema).schema), TOPIC_RECORDS[spec.suffix]
        )
        timings = {}
        for label, serde in (("single-object", single), ("confluent", confluent)):
            serde.decode(serde.encode(topic, record), topic)

            def round_trip(serde: AvroSerde = serde, topic: str = topic, record: Record = record) -> None:
                serde.decode(serde.encode(topic, record), topic)

            timings[label] = best_of(round_trip, repeat=5, number=number) * 1e6
        results.append(
            Result(
                suite="serde",
                name=f"{spec.value_schema.split('.')[-1]} encode+decode",
                value=timings["single-object"],
                unit="µs/record",
                peer="confluent framing",
                peer_value=timings["confluent"],
                notes="" if spec.suffix != "md.raw" else "Sample records carry 2 items per array; fastavro C codec.",
            )
        )
    return results
