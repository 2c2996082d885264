"""The Avro schema store: current schemas from ``schemas/`` and every committed version from
``schemas/history/``, indexed by name and by CRC-64-AVRO fingerprint.

``schemas/quotewatch.<Name>.avsc`` is the current version of a record type (references between
files are resolved by fastavro). ``schemas/history/<Name>/v<N>.avsc`` holds each committed
version of a topic value schema, fully expanded, so old data stays readable: a reader decodes
with the writer's version (found by fingerprint) and resolves it to the current one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

SCHEMA_PACKAGE = "quotewatch.schemas"

_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fingerprint = i
        for _ in range(8):
            fingerprint = (fingerprint >> 1) ^ (_CRC64_EMPTY & -(fingerprint & 1))
        table.append(fingerprint)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The CRC-64-AVRO (Rabin) fingerprint of ``data``, as specified by the Avro specification."""
    fingerprint = _CRC64_EMPTY
    for byte in data:
        fingerprint = (fingerprint >> 8) ^ _CRC64_TABLE[(fingerprint ^ byte) & 0xFF]
    return fingerprint


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One version of one record schema."""

    name: str
    """Full name, e.g. ``quotewatch.MarketEvent``."""
    version: int
    """1-based committed version; ``0`` marks a current schema not yet committed to history."""
    schema: Any
    """The fastavro-parsed schema."""
    expanded_json: str
    """The fully expanded schema as JSON (what a schema registry stores)."""
    canonical: str
    """Avro Parsing Canonical Form."""
    fingerprint: int
    """CRC-64-AVRO of the canonical form."""
    has_bytes: bool = False
    """Whether a ``bytes`` value occurs anywhere in the schema (the serde keeps those as bytes)."""

    @property
    def fingerprint_le(self) -> bytes:
        """The fingerprint as the 8 little-endian bytes of the single-object encoding header."""
        return self.fingerprint.to_bytes(8, "little")


def _schema_dir() -> Path:
    return Path(str(resources.files(SCHEMA_PACKAGE)))


def full_name(schema: Any) -> str:
    """The full name (``namespace.Name``) of a record schema given as JSON."""
    name = str(schema["name"])
    return name if "." in name else f"{schema.get('namespace', '')}.{name}".lstrip(".")


def _version_of(name: str, version: int, expanded: Any) -> SchemaVersion:
    parsed = fastavro.parse_schema(expanded, named_schemas={})
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    return SchemaVersion(
        name=name,
        version=version,
        schema=parsed,
        expanded_json=json.dumps(expanded, separators=(",", ":")),
        canonical=canonical,
        fingerprint=crc64_avro(canonical.encode()),
        has_bytes='"bytes"' in canonical,
    )


class SchemaStore:
    """Every schema QuoteWatch can write or read. Build it once per process (:func:`default_store`)."""

    def __init__(self, schema_dir: Path | None = None) -> None:
        self._dir = schema_dir or _schema_dir()
        self._current: dict[str, SchemaVersion] = {}
        self._history: dict[str, list[SchemaVersion]] = {}
        self._by_fingerprint: dict[int, SchemaVersion] = {}
        self._load()

    def _load(self) -> None:
        for path in sorted(self._dir.glob("history/*/v*.avsc")):
            expanded = json.loads(path.read_text())
            name = full_name(expanded)
            version = int(path.stem.removeprefix("v"))
            entry = _version_of(name, version, expanded)
            self._history.setdefault(name, []).append(entry)
            self._by_fingerprint[entry.fingerprint] = entry
        for versions in self._history.values():
            versions.sort(key=lambda v: v.version)
        for path in sorted(self._dir.glob("*.avsc")):
            name = path.name.removesuffix(".avsc")
            # Named types from other files are inlined at their first use and referenced by
            # name after that: a self-contained, spec-valid schema a registry can store.
            expanded = fastavro.schema.load_schema(str(path), _write_hint=False)
            candidate = _version_of(name, 0, expanded)
            committed = next((v for v in self._history.get(name, []) if v.fingerprint == candidate.fingerprint), None)
            current = committed or candidate
            self._current[name] = current
            self._by_fingerprint.setdefault(current.fingerprint, current)

    def current(self, name: str) -> SchemaVersion:
        """The current version of ``name`` (``quotewatch.X``).

        Raises:
            KeyError: no such schema.
        """
        try:
            return self._current[name]
        except KeyError:
            raise KeyError(f"no schema named {name!r} in {self._dir}") from None

    def by_fingerprint(self, fingerprint: int) -> SchemaVersion | None:
        """The schema version with this CRC-64-AVRO fingerprint, if any is known."""
        return self._by_fingerprint.get(fingerprint)

    def versions(self, name: str) -> list[SchemaVersion]:
        """Every committed version of ``name``, oldest first."""
        return list(self._history.get(name, []))

    def names(self) -> list[str]:
        """Every current schema name."""
        return sorted(self._current)

    def topic_value_names(self) -> list[str]:
        """The schemas that are the value of a catalog topic (the ones versioned in history)."""
        from quotewatch.core.topics import CATALOG

        return sorted({spec.value_schema for spec in CATALOG.values()})

    def uncommitted(self) -> list[SchemaVersion]:
        """Topic value schemas whose current form is not a committed history version."""
        return [self._current[name] for name in self.topic_value_names() if self._current[name].version == 0]

    def commit(self) -> list[Path]:
        """Write each uncommitted topic value schema as the next ``history/<Name>/v<N>.avsc``.

        Who calls this: a developer (``quotewatch schemas commit``) after changing a schema, so
        that data written with the old version stays readable and tested.
        """
        written = []
        for current in self.uncommitted():
            short = current.name.rsplit(".", 1)[-1]
            folder = self._dir / "history" / short
            folder.mkdir(parents=True, exist_ok=True)
            version = len(self._history.get(current.name, [])) + 1
            path = folder / f"v{version}.avsc"
            path.write_text(json.dumps(json.loads(current.expanded_json), indent=2) + "\n")
            written.append(path)
        if written:
            self._current.clear()
            self._history.clear()
            self._by_fingerprint.clear()
            self._load()
        return written


@cache
def default_store() -> SchemaStore:
    """The process-wide store of the installed schemas."""
    return SchemaStore()
