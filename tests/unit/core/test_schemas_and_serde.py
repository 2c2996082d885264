"""Round trips of every schema in both framings, evolution, and typed errors on bad bytes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotewatch.core.errors import DecodeError, PoisonRecordError, SchemaRegistryUnavailableError, UnknownSchemaError
from quotewatch.core.records import RECORD_TYPES, TOPIC_RECORDS, Record
from quotewatch.core.schemas import SchemaStore, crc64_avro, default_store
from quotewatch.core.serde import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, AvroSerde, registry_client
from quotewatch.core.topics import CATALOG

STORE = default_store()
TOPIC_SCHEMAS = sorted({spec.value_schema for spec in CATALOG.values()})


def sample_record(schema: Any, named: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A deterministic, fully populated record for any parsed schema (non-null union branches)."""
    named = {} if named is None else named
    if isinstance(schema, str):
        primitives = {
            "long": 1_700_000_000_123_456_789,
            "int": 7,
            "double": 0.25,
            "float": 0.5,
            "string": "BTC-USD",
            "bytes": b"\x00\xffraw",
            "boolean": True,
            "null": None,
        }
        if schema in primitives:
            return primitives[schema]
        return sample_record(named[schema], named, depth)
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        return sample_record(branches[0], named, depth) if branches else None
    kind = schema["type"]
    if kind == "record":
        named[schema["name"]] = schema
        return {f["name"]: sample_record(f["type"], named, depth + 1) for f in schema["fields"]}
    if kind == "enum":
        named[schema["name"]] = schema
        return schema["symbols"][-1]
    if kind == "array":
        return [sample_record(schema["items"], named, depth + 1) for _ in range(2)]
    if kind == "map":
        return {"k": sample_record(schema["values"], named, depth + 1)}
    return sample_record(kind, named, depth)


def typed_sample(name: str) -> Record:
    """:func:`sample_record` of the current topic value schema ``name`` as its generated record class."""
    cls = TOPIC_CLASSES[name]
    record: Record = msgspec.convert(sample_record(STORE.current(name).schema), cls)
    return record


TOPIC_CLASSES: dict[str, type[Record]] = {f"quotewatch.{cls.__name__}": cls for cls in TOPIC_RECORDS.values()}
"""Topic value schema name -> its generated record class."""


def _lists(value: Any) -> Any:
    """``value`` with tuples as lists (what a record's arrays are as a plain Avro datum)."""
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def registry() -> Any:
    return registry_client("mock://quotewatch-tests")


@pytest.fixture(scope="module")
def registry_serde(registry: Any) -> AvroSerde:
    return AvroSerde(registry=registry)


def test_crc64_avro_matches_the_specification_and_fastavro() -> None:
    # The Avro specification's example: the fingerprint of the schema "int".
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F
    for name in STORE.names():
        current = STORE.current(name)
        assert fastavro.schema.fingerprint(current.canonical, "CRC-64-AVRO") == current.fingerprint_le.hex()


@pytest.mark.parametrize("spec", list(CATALOG.values()), ids=lambda spec: spec.suffix)
def test_round_trip_single_object_encoding(spec: Any) -> None:
    serde = AvroSerde()
    topic = spec.name("qw")
    record = typed_sample(spec.value_schema)
    data = serde.encode(topic, record)
    assert data[:2] == SINGLE_OBJECT_MAGIC
    assert data[2:10] == STORE.current(spec.value_schema).fingerprint_le
    assert serde.decode(data, topic) == record


@pytest.mark.parametrize("spec", list(CATALOG.values()), ids=lambda spec: spec.suffix)
def test_round_trip_confluent_wire_format(spec: Any, registry_serde: AvroSerde, registry: Any) -> None:
    topic = spec.name("qw")
    record = typed_sample(spec.value_schema)
    data = registry_serde.encode(topic, record)
    assert data[0] == CONFLUENT_MAGIC
    assert registry_serde.decode(data, topic) == record
    # A reader that never wrote the schema finds it in the registry by id.
    assert AvroSerde(registry=registry).decode(data, topic) == record


def test_confluent_schemas_are_registered_under_topic_value_subjects(registry_serde: AvroSerde, registry: Any) -> None:
    record = typed_sample("quotewatch.Label")
    registry_serde.encode("replay7.labels", record)
    assert "replay7.labels-value" in registry.get_subjects()
    latest = registry.get_latest_version("replay7.labels-value")
    assert json.loads(latest.schema.schema_str)["name"].endswith("Label")


@pytest.mark.parametrize("name", TOPIC_SCHEMAS)
def test_every_committed_version_reads_with_the_current_schema(name: str) -> None:
    versions = STORE.versions(name)
    assert versions, f"{name} has no committed version under schemas/history"
    serde = AvroSerde()
    current = STORE.current(name)
    for version in versions:
        old_record = sample_record(version.schema)
        data = serde.encode_with(version, old_record)
        decoded = _lists(msgspec.to_builtins(serde.decode(data), builtin_types=(bytes,)))
        assert type(serde.decode(data)) is RECORD_TYPES[name]
        assert set(decoded) == {field["name"] for field in current.schema["fields"]}
        for key, value in old_record.items():
            if key in decoded:
                assert agrees(decoded[key], value), f"{name} v{version.version} field {key}"


def agrees(decoded: Any, old: Any) -> bool:
    """Does ``decoded`` carry every value of ``old``? Nested records may have gained fields (with defaults)."""
    if isinstance(old, dict):
        return isinstance(decoded, dict) and all(key in decoded and agrees(decoded[key], v) for key, v in old.items())
    if isinstance(old, list):
        return (
            isinstance(decoded, list)
            and len(decoded) == len(old)
            and all(agrees(d, o) for d, o in zip(decoded, old, strict=True))
        )
    return bool(decoded == old)


def test_current_schemas_are_committed() -> None:
    uncommitted = [s.name for s in STORE.uncommitted()]
    assert not uncommitted, f"run `quotewatch schemas commit` for {uncommitted}"


def test_evolution_resolves_an_added_field_with_its_default(tmp_path: Path) -> None:
    # Build a store whose current Label gained a field, with the real v1 in history.
    schema_dir = tmp_path / "schemas"
    (schema_dir / "history" / "Label").mkdir(parents=True)
    v1 = json.loads(STORE.versions("quotewatch.Label")[0].expanded_json)
    (schema_dir / "history" / "Label" / "v1.avsc").write_text(json.dumps(v1))
    v2 = json.loads(json.dumps(v1))
    v2["fields"].append({"name": "horizon_ticks", "type": "int", "default": 5})
    (schema_dir / "quotewatch.Label.avsc").write_text(json.dumps(v2))
    store = SchemaStore(schema_dir)
    serde = AvroSerde(store)
    old = sample_record(store.versions("quotewatch.Label")[0].schema)
    # The plain datum: the generated classes follow the installed schemas, not this test's store.
    decoded = serde.decode_datum(serde.encode_with(store.versions("quotewatch.Label")[0], old))
    assert decoded["horizon_ticks"] == 5
    assert decoded["label"] == old["label"]


def test_unknown_fingerprint_is_a_typed_error() -> None:
    data = SINGLE_OBJECT_MAGIC + (0x1234).to_bytes(8, "little") + b"\x02"
    with pytest.raises(UnknownSchemaError, match="0000000000001234"):
        AvroSerde().decode(data, "qw.labels")


def test_confluent_framing_without_a_registry_is_a_typed_error() -> None:
    with pytest.raises(UnknownSchemaError, match="SCHEMA_REGISTRY_URL"):
        AvroSerde().decode(bytes([CONFLUENT_MAGIC, 0, 0, 0, 9, 1, 2]), "qw.labels")


def test_a_registry_that_cannot_be_reached_is_not_the_records_fault(registry_serde: AvroSerde) -> None:
    """Unknown id (404) -> poison (dead-lettered); registry unreachable -> retriable, never poison."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    record = typed_sample("quotewatch.Label")
    data = registry_serde.encode("qw.labels", record)
    unknown_id = data[:1] + (2**31 - 1).to_bytes(4, "big") + data[5:]
    with pytest.raises(UnknownSchemaError, match="not found in the registry"):
        registry_serde.decode(unknown_id, "qw.labels")
    # A real client pointed at a closed port (no retries inside the client, so the test is quick).
    unreachable = SchemaRegistryClient({"url": "http://127.0.0.1:9", "max.retries": 0})
    with pytest.raises(SchemaRegistryUnavailableError, match="cannot fetch schema id") as caught:
        AvroSerde(registry=unreachable).decode(data, "qw.labels")
    assert not isinstance(caught.value, PoisonRecordError)
    with pytest.raises(SchemaRegistryUnavailableError, match="cannot register"):
        AvroSerde(registry=unreachable).encode("qw.labels", record)


@pytest.mark.parametrize(
    "schema_str",
    ["[" * 2000, '{"type": ' * 3000, '{"type": "record"}', "not json", '"x' + "y" * (2 * 1024 * 1024) + '"'],
    ids=["2000 brackets", "deep object", "no name", "not json", "2 MiB"],
)
def test_a_schema_from_the_registry_that_is_not_ours_makes_the_record_poison_not_a_crash(schema_str: str) -> None:
    """Whoever may register subjects writes the schema text: '[' x 2000 raised RecursionError before."""

    class Registry:
        def register_schema(self, subject_name: str, schema: Any, normalize_schemas: bool = False) -> int:
            raise AssertionError("not called")

        def get_schema(self, schema_id: int, subject_name: str | None = None, fmt: str | None = None) -> Any:
            return SimpleNamespace(schema_str=schema_str)

    with pytest.raises(UnknownSchemaError, match="schema id 7 from the registry is not a usable Avro schema"):
        AvroSerde(registry=Registry()).decode(bytes([CONFLUENT_MAGIC, 0, 0, 0, 7, 2, 4]), "qw.labels")


def test_truncated_and_trailing_bytes_are_decode_errors() -> None:
    serde = AvroSerde()
    data = serde.encode("qw.labels", typed_sample("quotewatch.Label"))
    with pytest.raises(DecodeError):
        serde.decode(data[:-3], "qw.labels")
    with pytest.raises(DecodeError, match="trailing"):
        serde.decode(data + b"\x00", "qw.labels")


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_a_serde_error(data: bytes) -> None:
    serde = AvroSerde()
    for candidate in (
        data,
        SINGLE_OBJECT_MAGIC + STORE.current("quotewatch.MarketEvent").fingerprint_le + data,
    ):
        with contextlib.suppress(DecodeError, UnknownSchemaError):
            serde.decode(candidate, "qw.md.events")


def test_encoding_a_bad_record_is_a_typed_error() -> None:
    from quotewatch.core.errors import EncodeError

    with pytest.raises(EncodeError, match="Label"):
        AvroSerde().encode("qw.labels", msgspec.structs.replace(typed_sample("quotewatch.Label"), ts_event="no"))
    with pytest.raises(EncodeError, match=r"a dict is not a quotewatch\.Label"):
        AvroSerde().encode("qw.labels", {"ts_event": 1})  # type: ignore[arg-type]  # not a record: what this test checks
