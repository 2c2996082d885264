"""The lake's contracts: constants, errors, Avro -> Arrow schemas and the hive layout and file names.

See :mod:`quotewatch.core.lake` for the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import msgspec
import pyarrow as pa

from quotewatch.core.errors import PoisonRecordError, QuoteWatchError
from quotewatch.core.records import Record
from quotewatch.core.schemas import SchemaStore, default_store
from quotewatch.core.topics import (
    BOOK_TOP3,
    FEATURES,
    LABELS,
    MD_EVENTS,
    MD_RAW,
    PREDICTIONS,
    TopicSpec,
    split_topic,
)

if TYPE_CHECKING:  # pandas is imported by pyarrow's to_pandas() only when read_dataset is called
    pass

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)

LAKE_TOPICS: tuple[TopicSpec, ...] = (MD_RAW, MD_EVENTS, BOOK_TOP3, FEATURES, LABELS, PREDICTIONS)
"""The topics the lake sink writes, in catalog order."""

META_COLUMNS: tuple[str, ...] = ("_topic", "_partition", "_offset", "_key", "_timestamp_ms")
"""Columns after the record's own: where the row came from in Kafka."""

CHUNK_METADATA_KEY = b"quotewatch.lake.chunk"
"""Parquet footer key of a file's chunk description (JSON)."""

FILE_SUFFIX = ".parquet"
ROW_GROUP_ROWS = 128 * 1024
"""Largest row group; files are bounded by LAKE_FLUSH_BYTES, so most hold one or a few."""
COMPRESSION = "zstd"
HOUR_NS = 3_600 * 10**9
_OFFSET_DIGITS = 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


class LakeError(QuoteWatchError):
    """The lake cannot be read or written as asked (bad URI, unsupported schema, I/O failure)."""


class LakeRecordError(PoisonRecordError):
    """A record cannot be placed in the lake (e.g. it has no partition value): dead-letter it."""


# -- Avro -> Arrow ---------------------------------------------------------------------------------

_PRIMITIVES: Mapping[str, pa.DataType] = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}


def avro_to_arrow(schema: Any, named: AvroSchemas | None = None) -> tuple[pa.DataType, bool]:
    """The Arrow type of a (fastavro-parsed or JSON) Avro schema, and whether it is nullable.

    Named types may be referenced by name after their first definition (``named`` collects them).

    Raises:
        LakeError: a union of several non-null branches, or an unknown type (no Arrow mapping).
    """
    named = {} if named is None else named
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema], schema == "null"
        if schema in named:
            return avro_to_arrow(named[schema], named)
        raise LakeError(f"unknown Avro type {schema!r}")
    if isinstance(schema, list):
        branches = [branch for branch in schema if branch != "null"]
        if len(branches) > 1:
            raise LakeError(f"the union {schema!r} has several non-null branches: no Arrow column type for it")
        if not branches:
            return pa.null(), True
        arrow_type, _ = avro_to_arrow(branches[0], named)
        return arrow_type, len(branches) < len(schema)
    if not isinstance(schema, dict):
        raise LakeError(f"not an Avro schema: {schema!r}")
    kind = schema["type"]
    if kind == "record":
        named[schema["name"]] = schema
        fields = []
        for avro_field in schema["fields"]:
            arrow_type, nullable = avro_to_arrow(avro_field["type"], named)
            fields.append(pa.field(avro_field["name"], arrow_type, nullable=nullable))
        return pa.struct(fields), False
    if kind == "enum":
        named[schema["name"]] = schema
        return pa.string(), False
    if kind == "fixed":
        named[schema["name"]] = schema
        return pa.binary(int(schema["size"])), False
    if kind == "array":
        item_type, item_nullable = avro_to_arrow(schema["items"], named)
        return pa.list_(pa.field("item", item_type, nullable=item_nullable)), False
    if kind == "map":
        value_type, value_nullable = avro_to_arrow(schema["values"], named)
        return pa.map_(pa.string(), pa.field("value", value_type, nullable=value_nullable)), False
    # A primitive written as {"type": "long", "logicalType": ...}: stored as its underlying type.
    return avro_to_arrow(kind, named)


def _meta_fields() -> list[pa.Field]:
    return [
        pa.field("_topic", pa.string(), nullable=False),
        pa.field("_partition", pa.int32(), nullable=False),
        pa.field("_offset", pa.int64(), nullable=False),
        pa.field("_key", pa.string(), nullable=True),
        pa.field("_timestamp_ms", pa.int64(), nullable=False),
    ]


def arrow_schema_for(topic: str, store: SchemaStore | None = None) -> pa.Schema:
    """The logical row schema of a topic's dataset: the value schema's fields + :data:`META_COLUMNS`.

    ``topic`` is a full topic name (any prefix) or a bare catalog suffix (``features``). This is
    what :func:`read_table` returns (before the ``date``/``hour`` partition columns); the files
    themselves omit the partition column (see :func:`file_schema_for`).
    """
    spec = _spec(topic)
    return _logical_schema(spec.value_schema, store)


def file_schema_for(topic: str, store: SchemaStore | None = None) -> pa.Schema:
    """The schema of the Parquet files of a topic: :func:`arrow_schema_for` without the partition column."""
    spec = _spec(topic)
    schema = _logical_schema(spec.value_schema, store)
    return schema.remove(schema.get_field_index(partition_column(spec)))


@lru_cache(maxsize=64)
def _cached_logical_schema(value_schema: str, store: SchemaStore) -> pa.Schema:
    avro = store.current(value_schema)
    record_type, _ = avro_to_arrow(avro.schema)
    fields = [record_type.field(i) for i in range(record_type.num_fields)]
    metadata = {
        b"quotewatch.value_schema": avro.name.encode(),
        b"quotewatch.fingerprint": f"{avro.fingerprint:016x}".encode(),
    }
    return pa.schema(fields + _meta_fields(), metadata=metadata)


def _logical_schema(value_schema: str, store: SchemaStore | None) -> pa.Schema:
    return _cached_logical_schema(value_schema, store or default_store())


def _spec(topic: str) -> TopicSpec:
    for spec in LAKE_TOPICS:
        if topic == spec.suffix:
            return spec
    try:
        _, spec = split_topic(topic)
    except KeyError as exc:
        raise LakeError(str(exc)) from None
    if spec not in LAKE_TOPICS:
        raise LakeError(
            f"{topic!r} is not written to the lake (lake topics: {', '.join(s.suffix for s in LAKE_TOPICS)})"
        )
    return spec


# -- layout ----------------------------------------------------------------------------------------


def partition_column(spec_or_topic: TopicSpec | str) -> str:
    """The first hive level of a topic's dataset: ``feed`` for ``md.raw``, else ``symbol``."""
    spec = spec_or_topic if isinstance(spec_or_topic, TopicSpec) else _spec(spec_or_topic)
    return "feed" if spec.suffix == MD_RAW.suffix else "symbol"


def hour_partition(ts_event_ns: int) -> str:
    """``date=YYYY-MM-DD/hour=H`` of a ``ts_event`` (UTC; ns since the epoch, negative allowed)."""
    return _hour_dir(ts_event_ns // HOUR_NS)


@lru_cache(maxsize=4096)
def _hour_dir(hours_since_epoch: int) -> str:
    moment = _EPOCH + timedelta(hours=hours_since_epoch)
    return f"date={moment:%Y-%m-%d}/hour={moment.hour}"


MAX_PARTITION_VALUE_CHARS = 200
"""Longest percent-encoded ``symbol``/``feed`` a directory is made of (``symbol=`` + it stays well
under the 255-byte name limit of common filesystems; real product ids are ~10 characters)."""


@lru_cache(maxsize=1024)
def encode_partition_value(value: str) -> str:
    """Percent-encode a hive partition value (everything but ``A-Z a-z 0-9 - _ . ~``).

    Raises:
        LakeRecordError: the value is empty (readers would turn it into null).
    """
    if not value:
        raise LakeRecordError("empty partition value: the record has no symbol/feed to be filed under")
    encoded = quote(value, safe="")
    if len(encoded) > MAX_PARTITION_VALUE_CHARS:
        # The directory name would pass the filesystem's 255-byte limit (ENAMETOOLONG on every write).
        raise LakeRecordError(
            f"partition value of {len(value)} characters ({len(encoded)} percent-encoded, at most "
            f"{MAX_PARTITION_VALUE_CHARS}): {value[:40]!r}..."
        )
    return encoded


AvroSchemas = dict[str, Any]  # not a topic record: named Avro schemas by name
LakeRow = dict[str, Any]  # not a topic record: one Parquet row (the record's columns + the _ coordinates)


def lake_row(record: Record, topic: str, partition: int, offset: int, key: str | None, timestamp_ms: int) -> LakeRow:
    """The Parquet row of a typed record: its Avro fields as columns (nested records as structs,
    enums as strings, bytes as bytes, exactly what the Avro decoder gave before the typed records)
    plus ``_topic``, ``_partition``, ``_offset``, ``_key`` and ``_timestamp_ms``."""
    row: LakeRow = msgspec.to_builtins(record, builtin_types=(bytes,))
    row["_topic"] = topic
    row["_partition"] = partition
    row["_offset"] = offset
    row["_key"] = key
    row["_timestamp_ms"] = timestamp_ms
    return row


def partition_dir(topic: str, row: LakeRow) -> str:
    """The hive directory of a row in its topic's dataset, e.g. ``symbol=BTC-USD/date=2026-08-09/hour=21``.

    Raises:
        LakeRecordError: the row has no usable partition value or ``ts_event``.
    """
    return record_dir(partition_column(topic), row)


def record_dir(column: str, row: LakeRow) -> str:
    """:func:`partition_dir` with the topic's :func:`partition_column` already looked up (the sink's hot path)."""
    value = row.get(column)
    ts_event = row.get("ts_event")
    if not isinstance(value, str) or not isinstance(ts_event, int):
        raise LakeRecordError(f"record has no string {column!r} or integer 'ts_event' to be filed under")
    return f"{column}={encode_partition_value(value)}/{_hour_dir(ts_event // HOUR_NS)}"


def file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """``<topic>+<partition>+<first>+<last>.parquet`` with offsets zero-padded to 20 digits."""
    if partition < 0 or first_offset < 0 or last_offset < first_offset:
        raise ValueError(f"invalid chunk coordinates {topic}[{partition}] {first_offset}..{last_offset}")
    return f"{topic}+{partition}+{first_offset:0{_OFFSET_DIGITS}d}+{last_offset:0{_OFFSET_DIGITS}d}{FILE_SUFFIX}"


@dataclass(frozen=True, slots=True, order=True)
class ChunkName:
    """The coordinates a chunk file's name carries."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int


def parse_file_name(name: str) -> ChunkName | None:
    """The coordinates in a chunk file's base name, or None when it is not one (``+`` never occurs in topic names)."""
    if not name.endswith(FILE_SUFFIX):
        return None
    parts = name[: -len(FILE_SUFFIX)].split("+")
    if len(parts) != 4 or not all(part.isascii() and part.isdigit() for part in parts[1:]):
        return None
    topic, partition, first, last = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    if not topic or last < first:
        return None
    return ChunkName(topic, partition, first, last)
