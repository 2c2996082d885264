"""The Parquet lake: layout, Avro -> Arrow schemas, chunk files, the reading API and ``lake info``.

Shared by the lake sink (writes), the trainer and the backtest (read) and ``quotewatch lake info``.

Layout
------
One dataset per topic, named by the **full** topic name (so a replay namespace never mixes with
the live one), hive-partitioned by the record's symbol and the UTC hour of its ``ts_event``::

    <LAKE_URI>/qw.features/symbol=BTC-USD/date=2026-08-09/hour=21/qw.features+0+00000000000000001200+00000000000000002399.parquet

``qw.md.raw`` is partitioned by ``feed=`` instead of ``symbol=``: a raw frame belongs to a
connection (its ``symbols`` array lists what the connection subscribed, not what the frame is
about), and a replay needs every frame of a feed in order, so one directory per feed and hour
keeps the raw log whole. ``read_dataset(..., symbols=[...])`` on ``md.raw`` keeps the frames
whose ``symbols`` array names one of them.

Partition values are percent-encoded (``BTC/USD`` -> ``symbol=BTC%2FUSD``), which DuckDB, polars
and pyarrow decode. As in Hive and Spark, the partition columns (``symbol`` or ``feed``, ``date``,
``hour``) live in the path only, not in the files, so ``pandas.read_parquet(<dataset dir>)``,
DuckDB ``read_parquet('<dataset>/**/*.parquet', hive_partitioning=1)`` and polars
``scan_parquet('<dataset>/**/*.parquet', hive_partitioning=True)`` all read a dataset directly.
``hour`` is not zero-padded so every reader infers an integer.

Columns
-------
:func:`arrow_schema_for` maps the topic's current Avro value schema: records -> structs, arrays ->
lists, maps -> maps, enums -> strings (dictionary-encoded in the files), ``["null", X]`` -> a
nullable X, every other field non-nullable; logical types are stored as their underlying type
(the catalog uses none). Five columns follow the record's: ``_topic``, ``_partition``,
``_offset``, ``_key`` (the UTF-8 record key) and ``_timestamp_ms`` (the Kafka record timestamp),
so a row can always be traced back to (and replayed as) its Kafka record.

Chunks and files
----------------
The sink cuts the records of one Kafka partition into **chunks**: consecutive offset ranges
``[first, last]``; each chunk starts right after the previous one (``first`` = the committed
offset), so the ranges tile the partition's offsets, including the offsets of transaction
markers, aborted records and dead-lettered records. A chunk is written as one file per hive
directory its rows fall in, every file named ``<topic>+<partition>+<first>+<last>.parquet``
(offsets zero-padded to 20 digits); each file's footer holds the chunk's description (key
``quotewatch.lake.chunk``: topic, partition, first, last and the list of the chunk's files), so
a reader can tell a complete chunk from one cut short by a crash. The file holding the chunk's
first row is always written first (the sink's crash recovery relies on it; see
``quotewatch.services.lake_sink``). Files are zstd-compressed with row groups of at most
:data:`ROW_GROUP_ROWS` rows, rows in offset order, with statistics (``ts_event`` min/max prune
time ranges).

A file is published atomically: on a local disk it is written to a hidden temporary name,
fsynced, renamed and its directory fsynced; on an object store (S3, GCS, Azure) it is uploaded
straight to its final key, and the object becomes visible only when the upload completes (a
PutObject, or pyarrow's multipart upload, whose completion is atomic too), so no temporary
object and no rename are needed. Publishing the same chunk again writes the same bytes under the
same name.

Coverage and holes
------------------
Because chunk ranges tile the offsets the sink consumed, an offset that belongs to no chunk
between a partition's first and last chunk is **missing data**, never a transaction marker: a
marker's offset lies inside the range of the chunk after it. :func:`lake_info` reports such
holes, ranges covered twice by chunks with different names (overlaps) and chunks whose files
are not all present (incomplete).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from quotewatch.core.bounded import field_int, field_str, parse_json_object
from quotewatch.core.errors import PoisonRecordError, QuoteWatchError, UntrustedInputError
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
    import pandas as pd

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


# -- the filesystem --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LakeLocation:
    """Where the lake is: a pyarrow filesystem and the lake's root path in it.

    Build it with :func:`lake_location` from ``LAKE_URI``, or directly from any
    :class:`pyarrow.fs.FileSystem` (tests and tools that hold credentials in code).
    """

    filesystem: pafs.FileSystem
    root: str
    """Path of the lake root inside ``filesystem`` (no trailing slash)."""
    uri: str = ""
    """The LAKE_URI it was built from, for messages."""

    def dataset_path(self, topic: str) -> str:
        """Path of ``topic``'s dataset inside :attr:`filesystem`."""
        return f"{self.root}/{topic}" if self.root else topic

    def describe(self) -> str:
        return self.uri or f"{self.filesystem.type_name}:{self.root}"


def lake_location(lake: str | LakeLocation) -> LakeLocation:
    """Resolve ``LAKE_URI``: a local path (relative to the working directory), ``file://…`` or ``s3://bucket/prefix``.

    Object-store options go in the URI's query string, as pyarrow reads them
    (``s3://lake/qw?endpoint_override=minio:9000&scheme=http``); credentials come from the
    standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``…).

    Raises:
        LakeError: pyarrow cannot build a filesystem for the URI.
    """
    if isinstance(lake, LakeLocation):
        return lake
    if "://" not in lake:
        return LakeLocation(pafs.LocalFileSystem(), os.path.abspath(lake).rstrip("/") or "/", lake)
    try:
        filesystem, path = pafs.FileSystem.from_uri(lake)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise LakeError(f"LAKE_URI={lake}: {exc}") from exc
    return LakeLocation(filesystem, path.rstrip("/"), lake)


def dataset_uri(lake_uri: str, topic: str) -> str:
    """The URI (or local path) of ``topic``'s dataset directory, for tools such as DuckDB or polars.

    Query-string options of an object-store URI are connection settings, not part of the
    location, and are left out. Append ``/**/*.parquet`` for a glob.
    """
    if "://" not in lake_uri:
        return os.path.join(os.path.abspath(lake_uri), topic)
    parts = urlsplit(lake_uri)
    path = parts.path.rstrip("/") + "/" + topic
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _local_os_path(filesystem: pafs.FileSystem, path: str) -> str | None:
    """The OS path of ``path`` when ``filesystem`` is the local disk (possibly under a SubTreeFileSystem)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    if isinstance(filesystem, pafs.SubTreeFileSystem) and isinstance(filesystem.base_fs, pafs.LocalFileSystem):
        return os.path.join(filesystem.base_path, path.lstrip("/"))
    return None


def publish_file(location: LakeLocation, path: str, data: bytes) -> None:
    """Make ``data`` visible at ``path`` (inside the lake's filesystem) atomically and durably.

    Local disk: write a hidden temporary file next to it, fsync, rename over ``path``, fsync the
    directory (and any directory created on the way). Object stores: one upload to the final
    key; the object appears only when the upload completes. Other filesystems: temporary name +
    move.
    Publishing the same bytes twice is harmless (same name, same content).

    Raises:
        OSError: the write failed (nothing is visible at ``path`` then, or the previous content).
    """
    directory, _, base = path.rpartition("/")
    temporary = f"{directory}/.{base}.tmp"
    local = _local_os_path(location.filesystem, path)
    if local is not None:
        _publish_local(local, data)
    elif location.filesystem.type_name in _OBJECT_STORES:
        with location.filesystem.open_output_stream(path) as out:
            out.write(data)
    else:
        location.filesystem.create_dir(directory, recursive=True)
        with location.filesystem.open_output_stream(temporary) as out:
            out.write(data)
        location.filesystem.move(temporary, path)


def _publish_local(path: str, data: bytes) -> None:
    directory, base = os.path.split(path)
    created = _make_dirs(directory)
    temporary = os.path.join(directory, f".{base}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)  # the bytes are on disk before the name points at them
    finally:
        os.close(fd)
    os.replace(temporary, path)  # atomic: readers see the old file, or the complete new one
    for synced in [directory, *created]:
        _fsync_dir(synced)  # the rename (and new directories) survive a power loss


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and its missing parents; return the parents whose entries changed."""
    missing = []
    current = directory
    while current and not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    os.makedirs(directory, exist_ok=True)
    return [os.path.dirname(path) for path in missing]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing chunks --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A chunk as described in its files' footers."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    files: tuple[str, ...]
    """Paths of all the chunk's files relative to the dataset directory, in write order."""


@dataclass(frozen=True, slots=True)
class WrittenFile:
    path: str
    """Relative to the dataset directory."""
    rows: int
    bytes: int


Publisher = Callable[[LakeLocation, str, bytes], None]


def encode_file(table: pa.Table, chunk: ChunkRecord) -> bytes:
    """One chunk file's bytes: ``table`` as zstd Parquet with the chunk description in the footer.

    Deterministic: the same rows and chunk give the same bytes.
    """
    description = json.dumps(
        {
            "version": 1,
            "topic": chunk.topic,
            "partition": chunk.partition,
            "first_offset": chunk.first_offset,
            "last_offset": chunk.last_offset,
            "files": list(chunk.files),
        },
        separators=(",", ":"),
    ).encode()
    metadata = dict(table.schema.metadata or {})
    metadata[CHUNK_METADATA_KEY] = description
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata(metadata),
        sink,
        compression=COMPRESSION,
        row_group_size=ROW_GROUP_ROWS,
        use_dictionary=True,
        write_statistics=True,
    )
    return bytes(sink.getvalue())


def write_chunk(
    lake: str | LakeLocation,
    topic: str,
    partition: int,
    first_offset: int,
    last_offset: int,
    groups: Sequence[tuple[str, pa.Table]],
    *,
    publish: Publisher = publish_file,
) -> list[WrittenFile]:
    """Write one chunk: a file per ``(hive directory, rows)`` group, in the order given.

    Who calls this: the lake sink, when it cuts a partition's buffer; then it commits
    ``last_offset + 1``. The first group must hold the chunk's first row (crash recovery looks
    for the chunk there). Tables are in :func:`file_schema_for` form, rows in offset order.
    """
    if not groups:
        raise ValueError("a chunk has at least one file")
    location = lake_location(lake)
    name = file_name(topic, partition, first_offset, last_offset)
    chunk = ChunkRecord(topic, partition, first_offset, last_offset, tuple(f"{d}/{name}" for d, _ in groups))
    root = location.dataset_path(topic)
    written = []
    for relative, (_, table) in zip(chunk.files, groups, strict=True):
        data = encode_file(table, chunk)
        publish(location, f"{root}/{relative}", data)
        written.append(WrittenFile(relative, table.num_rows, len(data)))
    return written


# -- reading chunk descriptions (recovery and info) -------------------------------------------------


def _read_footer(location: LakeLocation, path: str) -> pq.FileMetaData:
    with location.filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata


CHUNK_DESCRIPTION_MAX_BYTES = 1024 * 1024
"""A footer's chunk description longer than this is not parsed (ours: ~100 bytes per file of the chunk)."""
CHUNK_DESCRIPTION_MAX_FILES = 10_000
"""More files than this in one chunk description is not ours (one file per hive directory of the chunk)."""
_PATH_MAX_CHARS = 1024
_TOPIC_MAX_CHARS = 249  # Kafka's limit
_PARTITION_MAX = 2**31 - 1


def chunk_description(metadata: pq.FileMetaData, name: ChunkName | None = None) -> ChunkRecord | None:
    """The chunk described in a file's footer, or None for a file without a valid one.

    The footer is not trusted (anyone who can write to the lake writes it): the description is
    parsed bounded (:data:`CHUNK_DESCRIPTION_MAX_BYTES`, depth 3); its offsets must be offsets, its
    files relative paths of this chunk's file name, and, when ``name`` (the coordinates in the
    file's own name) is given, it must describe that chunk. Anything else is logged and taken for
    no description: the sink then rewrites the chunk under the same names, ``lake info`` counts the
    file by its name. Never raises.

    Sample (one chunk of ``qw.md.events`` partition 0 in one hive directory)::

        {"version":1,"topic":"qw.md.events","partition":0,"first_offset":0,"last_offset":41,
         "files":["symbol=BTC-USD/date=2026-08-09/hour=21/qw.md.events+0+000…0+000…41.parquet"]}
    """
    raw = (metadata.metadata or {}).get(CHUNK_METADATA_KEY)
    if raw is None:
        return None
    what = "chunk description in a Parquet footer"
    try:
        data = parse_json_object(raw, what=what, max_bytes=CHUNK_DESCRIPTION_MAX_BYTES, max_depth=3)
        topic = field_str(data, "topic", what=what, max_length=_TOPIC_MAX_CHARS)
        partition = field_int(data, "partition", what=what, maximum=_PARTITION_MAX)
        first_offset = field_int(data, "first_offset", what=what)
        last_offset = field_int(data, "last_offset", what=what, minimum=first_offset)
        files = data.get("files")
        if not isinstance(files, list) or not 0 < len(files) <= CHUNK_DESCRIPTION_MAX_FILES:
            raise UntrustedInputError(f"{what}: 'files' is not a list of 1 to {CHUNK_DESCRIPTION_MAX_FILES} paths")
        chunk = ChunkRecord(topic, partition, first_offset, last_offset, tuple(files))
        if name is not None and ChunkName(topic, partition, first_offset, last_offset) != name:
            raise UntrustedInputError(
                f"{what}: describes {topic}[{partition}] {first_offset}..{last_offset}, not {name}"
            )
        base = file_name(topic, partition, first_offset, last_offset)
        for path in files:
            if not isinstance(path, str) or len(path) > _PATH_MAX_CHARS or not _is_chunk_path(path, base):
                raise UntrustedInputError(f"{what}: {str(path)[:100]!r} is not a relative path of a file {base}")
    except UntrustedInputError as exc:
        logger.warning("ignoring a chunk description that is not valid: %s", exc)
        return None
    return chunk


def _is_chunk_path(path: str, base: str) -> bool:
    """``path`` is ``[dir/...]base``, relative, without ``.`` or ``..`` segments."""
    parts = path.split("/")
    return parts[-1] == base and all(part not in ("", ".", "..") for part in parts)


def find_chunk(
    lake: str | LakeLocation, topic: str, partition: int, first_offset: int, directory: str
) -> ChunkRecord | None:
    """The chunk of ``topic[partition]`` starting at ``first_offset`` with a file in hive ``directory``.

    Who calls this: the lake sink after a (re)start, with the directory of the first row it read
    from its committed offset: a chunk written before a crash (but not committed) has its first
    file there. One directory listing, whatever the size of the lake.
    """
    location = lake_location(lake)
    path = f"{location.dataset_path(topic)}/{directory}"
    prefix = f"{topic}+{partition}+{first_offset:0{_OFFSET_DIGITS}d}+"
    try:
        infos = location.filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise LakeError(f"cannot list {path}: {exc}") from exc
    candidates = sorted(info.base_name for info in infos if info.is_file and info.base_name.startswith(prefix))
    for base in reversed(candidates):
        description = chunk_description(_read_footer(location, f"{path}/{base}"), parse_file_name(base))
        if description is not None:
            return description
    return None


def missing_files(lake: str | LakeLocation, chunk: ChunkRecord) -> list[str]:
    """The files of ``chunk`` (relative paths) that are not in the lake."""
    location = lake_location(lake)
    root = location.dataset_path(chunk.topic)
    infos = location.filesystem.get_file_info([f"{root}/{relative}" for relative in chunk.files])
    return [relative for relative, info in zip(chunk.files, infos, strict=True) if not info.is_file]


def last_chunk(lake: str | LakeLocation, topic: str, partition: int) -> ChunkRecord | None:
    """The chunk of ``topic[partition]`` with the highest first offset (lists the whole dataset).

    Who calls this: the lake sink when its consumer group has no committed offset for a
    partition, so that it resumes after what the lake already holds instead of writing it twice.
    """
    location = lake_location(lake)
    best: tuple[ChunkName, str] | None = None
    for info in _list_files(location, location.dataset_path(topic)):
        name = parse_file_name(info.base_name)
        if name is None or name.topic != topic or name.partition != partition:
            continue
        if best is None or (name.first_offset, name.last_offset) > (best[0].first_offset, best[0].last_offset):
            best = (name, info.path)
    if best is None:
        return None
    return chunk_description(_read_footer(location, best[1]), best[0])


def _list_files(location: LakeLocation, path: str) -> list[pafs.FileInfo]:
    try:
        infos = location.filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise LakeError(f"cannot list {path}: {exc}") from exc
    return [info for info in infos if info.is_file]


# -- reading datasets ------------------------------------------------------------------------------


def _partitioning(column: str) -> ds.Partitioning:
    return ds.partitioning(
        pa.schema([(column, pa.string()), ("date", pa.date32()), ("hour", pa.int32())]), flavor="hive"
    )


def open_dataset(lake: str | LakeLocation, topic: str) -> ds.Dataset:
    """``topic``'s dataset as a :class:`pyarrow.dataset.Dataset` with its hive partition columns typed
    (``symbol``/``feed`` string, ``date`` date32, ``hour`` int32). Hidden files are ignored.

    Raises:
        LakeError: ``topic`` is not a lake topic.
    """
    location = lake_location(lake)
    spec = _spec(topic)
    column = partition_column(spec)
    schema = file_schema_for(topic)
    full = pa.schema(
        [*schema, pa.field(column, pa.string()), pa.field("date", pa.date32()), pa.field("hour", pa.int32())],
        metadata=schema.metadata,
    )
    path = location.dataset_path(topic)
    info = location.filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in full}, schema=full))
    return ds.dataset(
        path,
        filesystem=location.filesystem,
        format="parquet",
        partitioning=_partitioning(column),
        schema=full,
    )


def read_table(
    lake: str | LakeLocation,
    topic: str,
    *,
    symbols: Iterable[str] | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of ``topic`` from the lake as an Arrow table, each Kafka record once, in (partition, offset) order.

    Args:
        topic: full topic name, e.g. ``qw.features`` (its prefix picks the namespace).
        symbols: keep these symbols only (for ``md.raw``: frames whose ``symbols`` names one).
        start_ns, end_ns: keep ``start_ns <= ts_event < end_ns`` (hour partitions outside are not opened).
        columns: the columns to return (default: :func:`arrow_schema_for` + ``date``, ``hour``).

    Rows that two files both hold (overlapping chunks, e.g. after a manual copy) come back once.
    """
    spec = _spec(topic)
    column = partition_column(spec)
    dataset = open_dataset(lake, topic)
    wanted = list(columns) if columns is not None else [*arrow_schema_for(topic).names, "date", "hour"]
    unknown = [name for name in wanted if name not in dataset.schema.names]
    if unknown:
        raise LakeError(f"{topic} has no column(s) {unknown}; columns: {dataset.schema.names}")
    wanted_symbols = sorted(set(symbols)) if symbols is not None else None
    expression = _time_filter(start_ns, end_ns)
    raw_symbol_filter = spec.suffix == MD_RAW.suffix and wanted_symbols is not None
    if wanted_symbols is not None and not raw_symbol_filter:
        symbol_filter = ds.field(column).isin(wanted_symbols)
        expression = symbol_filter if expression is None else expression & symbol_filter
    needed = list(dict.fromkeys([*wanted, "_partition", "_offset", *(["symbols"] if raw_symbol_filter else [])]))
    table = dataset.to_table(columns=needed, filter=expression)
    if raw_symbol_filter and wanted_symbols is not None:
        table = _rows_naming(table, wanted_symbols)
    table = _deduplicate(table)
    return table.select(wanted)


def read_dataset(
    lake: str | LakeLocation,
    topic: str,
    *,
    symbols: Iterable[str] | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`read_table` as a pandas DataFrame (structs -> dicts, lists -> arrays), index 0..n-1."""
    return read_table(lake, topic, symbols=symbols, start_ns=start_ns, end_ns=end_ns, columns=columns).to_pandas()


def _time_filter(start_ns: int | None, end_ns: int | None) -> ds.Expression | None:
    expression: ds.Expression | None = None
    if start_ns is not None:
        day, hour = _day_and_hour(start_ns)
        after = (ds.field("date") > day) | ((ds.field("date") == day) & (ds.field("hour") >= hour))
        expression = after & (ds.field("ts_event") >= start_ns)
    if end_ns is not None:
        day, hour = _day_and_hour(end_ns)
        before = (ds.field("date") < day) | ((ds.field("date") == day) & (ds.field("hour") <= hour))
        upper = before & (ds.field("ts_event") < end_ns)
        expression = upper if expression is None else expression & upper
    return expression


def _day_and_hour(ts_ns: int) -> tuple[date, int]:
    moment = _EPOCH + timedelta(hours=ts_ns // HOUR_NS)
    return moment.date(), moment.hour


def _rows_naming(table: pa.Table, symbols: list[str]) -> pa.Table:
    lists = table["symbols"].combine_chunks()
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    hits = pc.filter(parents, pc.is_in(flat, value_set=pa.array(symbols, pa.string())))
    return table.take(pc.unique(hits))


def _deduplicate(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("_partition", "ascending"), ("_offset", "ascending")])
    table = table.take(order)
    partitions = table["_partition"].to_numpy()
    offsets = table["_offset"].to_numpy()
    keep = np.ones(table.num_rows, dtype=bool)
    keep[1:] = (partitions[1:] != partitions[:-1]) | (offsets[1:] != offsets[:-1])
    return table if keep.all() else table.filter(pa.array(keep))


# -- lake info -------------------------------------------------------------------------------------


@dataclass
class IncompleteChunk:
    partition: int
    first_offset: int
    last_offset: int
    missing: list[str]


@dataclass
class PartitionCoverage:
    """Which offsets of one Kafka partition the lake holds."""

    partition: int
    first_offset: int
    last_offset: int
    chunks: int
    rows: int
    holes: list[tuple[int, int]] = field(default_factory=list)
    """Inclusive offset ranges no chunk covers between the first and the last: missing data."""
    overlaps: list[tuple[int, int]] = field(default_factory=list)
    """Inclusive offset ranges covered by two chunks with different names."""
    incomplete_chunks: int = 0
    """Chunks of this partition with files missing (a crash mid-chunk; listed on the dataset)."""

    @property
    def complete(self) -> bool:
        return not self.holes and not self.overlaps and not self.incomplete_chunks


@dataclass
class DatasetInfo:
    """What ``quotewatch lake info`` prints for one dataset."""

    topic: str
    files: int = 0
    rows: int = 0
    bytes: int = 0
    ts_event_min: int | None = None
    ts_event_max: int | None = None
    partitions: list[PartitionCoverage] = field(default_factory=list)
    incomplete_chunks: list[IncompleteChunk] = field(default_factory=list)
    temporary_files: list[str] = field(default_factory=list)
    """Hidden ``.…tmp`` files a crash left behind (never read; safe to delete when no sink runs)."""
    foreign_files: list[str] = field(default_factory=list)
    """Files that are not chunk files (readers of ``**/*.parquet`` may pick them up)."""

    @property
    def healthy(self) -> bool:
        return not self.incomplete_chunks and not self.foreign_files and all(p.complete for p in self.partitions)


def lake_info(lake: str | LakeLocation) -> list[DatasetInfo]:
    """Describe every dataset under the lake root (reads file footers only, never the data).

    Raises:
        LakeError: the lake root cannot be listed.
    """
    location = lake_location(lake)
    try:
        entries = location.filesystem.get_file_info(pafs.FileSelector(location.root, allow_not_found=True))
    except OSError as exc:
        raise LakeError(f"cannot list the lake at {location.describe()}: {exc}") from exc
    return [
        dataset_info(location, entry.base_name)
        for entry in sorted(entries, key=lambda e: e.base_name)
        if entry.type == pafs.FileType.Directory and not entry.base_name.startswith((".", "_"))
    ]


def dataset_info(lake: str | LakeLocation, topic: str) -> DatasetInfo:
    """Describe one dataset: rows, files, bytes, ts_event range, offset coverage per partition."""
    location = lake_location(lake)
    root = location.dataset_path(topic)
    info = DatasetInfo(topic)
    chunks: dict[tuple[int, int, int], tuple[set[str], set[str], int]] = {}
    for entry in _list_files(location, root):
        relative = entry.path[len(root) + 1 :]
        if entry.base_name.startswith("."):
            info.temporary_files.append(relative)
            continue
        name = parse_file_name(entry.base_name)
        if name is None or name.topic != topic:
            info.foreign_files.append(relative)
            continue
        metadata = _read_footer(location, entry.path)
        description = chunk_description(metadata, name)
        info.files += 1
        info.rows += metadata.num_rows
        info.bytes += entry.size or 0
        low, high = _ts_event_range(metadata)
        if low is not None:
            info.ts_event_min = low if info.ts_event_min is None else min(info.ts_event_min, low)
        if high is not None:
            info.ts_event_max = high if info.ts_event_max is None else max(info.ts_event_max, high)
        key = (name.partition, name.first_offset, name.last_offset)
        present, expected, rows = chunks.get(key, (set(), set(), 0))
        present.add(relative)
        if description is not None:
            expected.update(description.files)
        chunks[key] = (present, expected, rows + metadata.num_rows)
    by_partition: dict[int, list[tuple[int, int, int]]] = {}
    for (partition, first, last), (present, expected, rows) in chunks.items():
        by_partition.setdefault(partition, []).append((first, last, rows))
        missing = sorted(expected - present)
        if missing:
            info.incomplete_chunks.append(IncompleteChunk(partition, first, last, missing))
    for partition in sorted(by_partition):
        coverage = _coverage(partition, sorted(by_partition[partition]))
        coverage.incomplete_chunks = sum(1 for c in info.incomplete_chunks if c.partition == partition)
        info.partitions.append(coverage)
    info.incomplete_chunks.sort(key=lambda c: (c.partition, c.first_offset))
    return info


def _coverage(partition: int, chunks: list[tuple[int, int, int]]) -> PartitionCoverage:
    coverage = PartitionCoverage(partition, chunks[0][0], max(last for _, last, _ in chunks), len(chunks), 0)
    next_expected = chunks[0][0]
    for first, last, rows in chunks:
        coverage.rows += rows
        if first > next_expected:
            coverage.holes.append((next_expected, first - 1))
        elif first < next_expected:
            coverage.overlaps.append((first, min(last, next_expected - 1)))
        next_expected = max(next_expected, last + 1)
    return coverage


def _ts_event_range(metadata: pq.FileMetaData) -> tuple[int | None, int | None]:
    low: int | None = None
    high: int | None = None
    if metadata.num_row_groups == 0:
        return low, high
    first = metadata.row_group(0)
    index = next((i for i in range(first.num_columns) if first.column(i).path_in_schema == "ts_event"), None)
    if index is None:
        return low, high
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_min_max:
            continue
        low = statistics.min if low is None else min(low, statistics.min)
        high = statistics.max if high is None else max(high, statistics.max)
    return low, high


def format_ns(ts_ns: int | None) -> str:
    """``2026-08-09T21:05:48.229000000Z`` (UTC, ns) or ``-``."""
    if ts_ns is None:
        return "-"
    seconds, nanos = divmod(ts_ns, 10**9)
    return f"{_EPOCH + timedelta(seconds=seconds):%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def format_lake_info(infos: Sequence[DatasetInfo], location: str = "") -> str:
    """The human-readable report of ``quotewatch lake info``."""
    if not infos:
        return f"no datasets in the lake{' at ' + location if location else ''}"
    lines = []
    for info in infos:
        lines.append(
            f"{info.topic}: {info.rows:,} rows in {info.files:,} files ({info.bytes / 1e6:,.1f} MB), "
            f"ts_event {format_ns(info.ts_event_min)} .. {format_ns(info.ts_event_max)}"
        )
        for part in info.partitions:
            status = "complete" if part.complete else "INCOMPLETE"
            lines.append(
                f"  partition {part.partition}: offsets {part.first_offset}..{part.last_offset} "
                f"in {part.chunks} chunks, {part.rows:,} rows, {status}"
            )
            lines.extend(f"    hole: offsets {a}..{b} missing ({b - a + 1} offsets)" for a, b in part.holes)
            lines.extend(f"    overlap: offsets {a}..{b} in two chunks with different names" for a, b in part.overlaps)
        lines.extend(
            f"  incomplete chunk: partition {chunk.partition} offsets {chunk.first_offset}..{chunk.last_offset}, "
            f"missing {len(chunk.missing)} file(s): {', '.join(chunk.missing[:3])}"
            for chunk in info.incomplete_chunks
        )
        if info.temporary_files:
            lines.append(f"  {len(info.temporary_files)} temporary file(s) left by a crash (ignored by readers)")
        if info.foreign_files:
            lines.append(f"  {len(info.foreign_files)} foreign file(s): {', '.join(info.foreign_files[:3])}")
    return "\n".join(lines)
