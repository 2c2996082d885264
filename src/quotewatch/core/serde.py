"""Avro serde with two framings behind one interface, recognised by their first bytes.

- **Avro single-object encoding** (the default): ``C3 01`` + the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema's canonical form + the Avro binary body. It needs
  no service and makes replays independent of any registry.
- **Confluent wire format** (when ``SCHEMA_REGISTRY_URL`` is set): magic byte ``0`` + 4-byte
  big-endian schema id + body. Schemas are registered under the ``<topic>-value`` subject, so
  Redpanda Console decodes the topics.

Decoding finds the writer schema (by fingerprint or registry id) and resolves it to the reader's
current schema (schema evolution). Unknown schemas and undecodable bytes raise typed errors
(:class:`~quotewatch.core.errors.UnknownSchemaError`, :class:`~quotewatch.core.errors.DecodeError`),
which consumers turn into dead letters; so does a record beyond its schema's limits (array items,
string lengths: :mod:`quotewatch.core.limits`, :class:`~quotewatch.core.errors.RecordLimitError`).

**Typed records at the boundary.** :meth:`AvroSerde.encode` takes, and :meth:`AvroSerde.decode`
returns, the generated record classes of :mod:`quotewatch.core.records` (the class of the reader
schema). fastavro reads and writes plain dicts, so the serde converts right here, in C:
``msgspec.to_builtins`` before writing and ``msgspec.convert`` after reading (a few µs of the
record's encode + decode; docs/benchmarks.md, "Typed records"). The limits are checked on the
plain datum, before it becomes a record.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, TypeVar

import fastavro
import msgspec

from quotewatch.core.bounded import parse_json_object
from quotewatch.core.errors import DecodeError, EncodeError, SchemaRegistryUnavailableError, UnknownSchemaError
from quotewatch.core.limits import ArrayScan, StringCheck, limits_for
from quotewatch.core.records import RECORD_TYPES, TOPIC_RECORDS, AnyRecord, Record
from quotewatch.core.schemas import SchemaStore, SchemaVersion, _version_of, default_store, full_name
from quotewatch.core.topics import split_topic

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
_SINGLE_OBJECT_HEADER = len(SINGLE_OBJECT_MAGIC) + 8
_CONFLUENT_HEADER = 5

RecordT = TypeVar("RecordT", bound=AnyRecord)
AvroDatum = Mapping[str, Any]  # not a topic record: fastavro's side of the serde boundary (a plain Avro datum)
_KEEP_BYTES = (bytes,)
_TOPIC_CLASSES: dict[str, type[Record]] = {f"quotewatch.{cls.__name__}": cls for cls in TOPIC_RECORDS.values()}


class _Resolved(NamedTuple):
    """What decoding bytes of one writer schema (for one topic) needs, worked out once."""

    writer: SchemaVersion
    reader_schema: Any
    """The reader's schema, or None when it is the writer's."""
    offset: int
    items: ArrayScan
    strings: StringCheck
    cls: type[Record] | None
    """The record class of the reader schema; None when it is no topic's value schema."""


class RegistryClient(Protocol):
    """The part of confluent-kafka's ``SchemaRegistryClient`` (or its mock) the serde uses."""

    def register_schema(self, subject_name: str, schema: Any, normalize_schemas: bool = False) -> int: ...

    def get_schema(self, schema_id: int, subject_name: str | None = None, fmt: str | None = None) -> Any: ...


_NOT_FOUND = 404
REGISTRY_SCHEMA_MAX_BYTES = 1024 * 1024
"""A schema fetched from the registry larger than this is refused (ours are a few kB)."""


def registry_client(url: str, basic_auth_user_info: str | None = None) -> RegistryClient:
    """A schema registry client for ``url``; ``mock://...`` gives confluent-kafka's in-memory mock."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf: dict[str, Any] = {"url": url}  # not a topic record: registry client config
    if basic_auth_user_info:
        conf["basic.auth.user.info"] = basic_auth_user_info
    client: RegistryClient = SchemaRegistryClient.new_client(conf)
    return client


class AvroSerde:
    """Encodes and decodes the records of catalog topics. Thread-safe; build one per process.

    Args:
        store: the schema store (default: the installed schemas).
        registry: when given, :meth:`encode` writes the Confluent wire format; decoding accepts
            both framings either way (Confluent framing needs a registry to decode).
    """

    def __init__(self, store: SchemaStore | None = None, registry: RegistryClient | None = None) -> None:
        self._store = store or default_store()
        self._registry = registry
        self._lock = threading.Lock()
        self._registered: dict[tuple[str, int], int] = {}
        self._by_registry_id: dict[int, SchemaVersion] = {}
        self._topic_schema: dict[str, tuple[SchemaVersion, type[AnyRecord]]] = {}
        self._resolved: dict[tuple[int, int, str | None], _Resolved] = {}

    @property
    def store(self) -> SchemaStore:
        return self._store

    @property
    def framing(self) -> str:
        """``confluent`` when a registry is configured, else ``single-object``."""
        return "confluent" if self._registry is not None else "single-object"

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, topic: str, record: Record) -> bytes:
        """Encode ``record`` (the generated class of the topic's schema) for ``topic`` (any prefix).

        Raises:
            KeyError: ``topic`` is not a catalog topic.
            EncodeError: the record does not match the schema (e.g. a record of another topic).
        """
        known = self._topic_schema.get(topic)
        if known is None:
            _, spec = split_topic(topic)
            schema = self._store.current(spec.value_schema)
            known = self._topic_schema[topic] = (schema, RECORD_TYPES[schema.name])
        schema, cls = known
        if type(record) is not cls:
            raise EncodeError(f"a {type(record).__name__} is not a {schema.name} record (topic {topic})")
        # bytes fields (DeadLetter) stay bytes; the rest is plain ints, floats, strings, lists, dicts.
        if schema.has_bytes:
            datum = msgspec.to_builtins(record, builtin_types=_KEEP_BYTES)
        else:
            datum = msgspec.to_builtins(record)
        return self.encode_with(schema, datum, subject=f"{topic}-value")

    def encode_with(self, schema: SchemaVersion, datum: AvroDatum, subject: str | None = None) -> bytes:
        """Encode a plain Avro datum with an explicit schema version (tests write old versions this way)."""
        out = io.BytesIO()
        if self._registry is not None and subject is not None:
            out.write(struct.pack(">bI", CONFLUENT_MAGIC, self._registry_id(subject, schema)))
        else:
            out.write(SINGLE_OBJECT_MAGIC)
            out.write(schema.fingerprint_le)
        hinted = _union_hints(schema)
        if hinted:
            # Name the branch of ["null", Record] unions so fastavro does not validate the whole
            # record against each branch first (that doubled the cost of a large snapshot).
            datum = {
                **datum,
                **{field: (name, datum[field]) for field, name in hinted if isinstance(datum.get(field), dict)},
            }
        try:
            fastavro.schemaless_writer(out, schema.schema, datum)
        except Exception as exc:
            raise EncodeError(f"record does not match {schema.name} v{schema.version}: {exc!r}") from exc
        return out.getvalue()

    def _registry_id(self, subject: str, schema: SchemaVersion) -> int:
        key = (subject, schema.fingerprint)
        schema_id = self._registered.get(key)
        if schema_id is None:
            from confluent_kafka.schema_registry import Schema

            assert self._registry is not None
            with self._lock:
                try:
                    schema_id = self._registry.register_schema(subject, Schema(schema.expanded_json, "AVRO"))
                except Exception as exc:
                    # Unreachable, or refusing the schema (e.g. incompatible): the record is not at fault.
                    raise SchemaRegistryUnavailableError(
                        f"cannot register {schema.name} v{schema.version} under {subject!r}: {exc!r}"
                    ) from exc
                self._registered[key] = schema_id
                self._by_registry_id[schema_id] = schema
        return schema_id

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, data: bytes, topic: str | None = None) -> Record:
        """Decode ``data`` written in either framing into the record class of the current reader schema.

        The reader schema is the current value schema of ``topic`` when given, else the current
        schema of the writer's name.

        Raises:
            DecodeError: not a record in a known framing, or the body does not decode.
            UnknownSchemaError: the writer schema is not known here, or is no topic's value schema.
        """
        datum, writer, cls = self._read(data, topic)
        if cls is None:
            raise UnknownSchemaError(f"{writer.name} is not the value schema of a QuoteWatch topic")
        try:
            record: Record = msgspec.convert(datum, cls)
        except (msgspec.ValidationError, TypeError) as exc:
            raise DecodeError(f"{writer.name} v{writer.version} body is not a {cls.__name__}: {exc}") from exc
        return record

    def decode_datum(self, data: bytes, topic: str | None = None) -> AvroDatum:
        """:meth:`decode` up to the plain Avro datum, before it becomes a record class (schema
        evolution tests; tools that print whatever a topic holds)."""
        return self._read(data, topic)[0]

    def _read(self, data: bytes, topic: str | None) -> tuple[AvroDatum, SchemaVersion, type[Record] | None]:
        # Hot path: (writer id, topic) -> (writer, reader schema or None, offset, class) is resolved once and cached.
        if data[:2] == SINGLE_OBJECT_MAGIC and len(data) >= _SINGLE_OBJECT_HEADER:
            key: tuple[int, int, str | None] = (0, int.from_bytes(data[2:_SINGLE_OBJECT_HEADER], "little"), topic)
        elif data[:1] == b"\x00" and len(data) >= _CONFLUENT_HEADER:
            key = (1, int.from_bytes(data[1:_CONFLUENT_HEADER], "big"), topic)
        else:
            key = (-1, 0, topic)
        resolved = self._resolved.get(key)
        if resolved is None:
            writer, offset = self.writer_of(data)
            reader = self._reader_for(writer, topic)
            limits = limits_for(reader.name)
            resolved = _Resolved(
                writer,
                None if reader is writer else reader.schema,
                offset,
                ArrayScan(writer.schema, limits, writer.name),
                StringCheck(reader.schema, limits, reader.name),
                _TOPIC_CLASSES.get(reader.name),
            )
            with self._lock:
                self._resolved[key] = resolved
        writer, reader_schema, offset, items, strings, cls = resolved
        # Before anything is built: a body that could hold more array items than the schema's
        # limit is scanned (cheap, no allocation); most records are too small to need it.
        items.check(data, offset)
        buffer = io.BytesIO(data)
        buffer.seek(offset)
        try:
            decoded = fastavro.schemaless_reader(buffer, writer.schema, reader_schema)
        except Exception as exc:
            raise DecodeError(f"cannot decode {writer.name} v{writer.version} body: {exc!r}") from exc
        if buffer.tell() != len(data):
            raise DecodeError(f"{len(data) - buffer.tell()} trailing bytes after a {writer.name} record")
        if not isinstance(decoded, dict):
            raise DecodeError(f"{writer.name} is not a record schema")
        strings.check(decoded, len(data))
        return decoded, writer, cls

    def decode_as(self, data: bytes, topic: str | None, cls: type[RecordT]) -> RecordT:
        """:meth:`decode`, checked to give a ``cls`` (e.g. ``decode_as(data, topic, MarketEvent)``).

        Raises:
            DecodeError: as :meth:`decode`, or the record is not a ``cls``.
        """
        record = self.decode(data, topic)
        if not isinstance(record, cls):
            raise DecodeError(f"expected a {cls.__name__}, got a {type(record).__name__}")
        return record

    def writer_of(self, data: bytes) -> tuple[SchemaVersion, int]:
        """The writer schema of ``data`` and where its body starts.

        Raises:
            DecodeError: ``data`` starts with neither framing's magic bytes.
            UnknownSchemaError: the fingerprint or registry id is not known.
            SchemaRegistryUnavailableError: the registry could not be asked (not the record's fault).
        """
        if data[:2] == SINGLE_OBJECT_MAGIC and len(data) >= _SINGLE_OBJECT_HEADER:
            fingerprint = int.from_bytes(data[2:_SINGLE_OBJECT_HEADER], "little")
            writer = self._store.by_fingerprint(fingerprint)
            if writer is None:
                raise UnknownSchemaError(f"unknown writer schema fingerprint {fingerprint:016x}")
            return writer, _SINGLE_OBJECT_HEADER
        if data[:1] == bytes([CONFLUENT_MAGIC]) and len(data) >= _CONFLUENT_HEADER:
            (schema_id,) = struct.unpack(">I", data[1:_CONFLUENT_HEADER])
            return self._schema_for_registry_id(schema_id), _CONFLUENT_HEADER
        raise DecodeError(f"not an Avro record in a known framing (first bytes {data[:4].hex() or 'empty'})")

    def _schema_for_registry_id(self, schema_id: int) -> SchemaVersion:
        known = self._by_registry_id.get(schema_id)
        if known is not None:
            return known
        if self._registry is None:
            raise UnknownSchemaError(f"Confluent-framed record (schema id {schema_id}) but no SCHEMA_REGISTRY_URL")
        try:
            registered = self._registry.get_schema(schema_id)
        except Exception as exc:
            if getattr(exc, "http_status_code", None) == _NOT_FOUND:
                raise UnknownSchemaError(f"schema id {schema_id} not found in the registry: {exc}") from exc
            # Anything else (refused, timed out, 5xx, auth) says nothing about the record.
            raise SchemaRegistryUnavailableError(
                f"cannot fetch schema id {schema_id} from the schema registry: {exc!r}"
            ) from exc
        # The registry's text is not ours (whoever may register subjects writes it): bounded, and a
        # schema that does not parse makes the record's schema unknown, never a crash.
        try:
            expanded = parse_json_object(
                registered.schema_str, what=f"schema id {schema_id}", max_bytes=REGISTRY_SCHEMA_MAX_BYTES, max_depth=64
            )
            version = _version_of(full_name(expanded), 0, expanded)
        except Exception as exc:  # UntrustedInputError, a missing name, fastavro's parse errors
            raise UnknownSchemaError(
                f"schema id {schema_id} from the registry is not a usable Avro schema: {exc}"
            ) from exc
        known_version = self._store.by_fingerprint(version.fingerprint)
        resolved = known_version or version
        with self._lock:
            self._by_registry_id[schema_id] = resolved
        return resolved

    def _reader_for(self, writer: SchemaVersion, topic: str | None) -> SchemaVersion:
        name = writer.name
        if topic is not None:
            try:
                name = split_topic(topic)[1].value_schema
            except KeyError:
                name = writer.name
        try:
            reader = self._store.current(name)
        except KeyError:
            return writer
        return writer if reader.fingerprint == writer.fingerprint else reader


_UNION_HINTS: dict[int, tuple[tuple[str, str], ...]] = {}


def _union_hints(schema: SchemaVersion) -> tuple[tuple[str, str], ...]:
    """Top-level fields typed ``["null", <record>]`` and the record's full name, cached per schema."""
    hints = _UNION_HINTS.get(schema.fingerprint)
    if hints is None:
        found = []
        for field in schema.schema.get("fields", []):
            branches = field["type"] if isinstance(field["type"], list) else []
            records = [b for b in branches if isinstance(b, dict) and b.get("type") == "record"]
            named = [
                b
                for b in branches
                if isinstance(b, str)
                and b not in ("null", "string", "long", "int", "double", "float", "boolean", "bytes")
            ]
            if len(branches) == 2 and "null" in branches and len(records) + len(named) == 1:
                target = records[0]["name"] if records else named[0]
                if records or _is_record(schema.schema, target):
                    found.append((field["name"], target))
        hints = _UNION_HINTS[schema.fingerprint] = tuple(found)
    return hints


def _is_record(root: dict[str, Any], name: str) -> bool:  # not a topic record: a parsed Avro schema
    named = root.get("__named_schemas", {})
    return isinstance(named.get(name), dict) and named[name].get("type") == "record"


def serde_from_settings(schema_registry_url: str | None, basic_auth_user_info: str | None = None) -> AvroSerde:
    """The serde a service uses: Confluent framing when a registry URL is configured."""
    registry = registry_client(schema_registry_url, basic_auth_user_info) if schema_registry_url else None
    return AvroSerde(registry=registry)
