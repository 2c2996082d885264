"""``quotewatch schemas codegen``: the typed record classes of ``core/records.py``, generated from ``schemas/``.

One frozen class per Avro record schema (every ``.avsc`` in ``schemas/`` and the records they
define inline), in one module, in dependency order. The mapping from Avro to Python:

=============================  =====================================================
Avro                           Python annotation
=============================  =====================================================
``long``, ``int``              ``int``
``double``, ``float``          ``float``
``string`` / ``bytes``         ``str`` / ``bytes``
``boolean``                    ``bool``
``enum``                       ``Literal["A", "B", ...]`` under the enum's name
``array``                      ``tuple[X, ...]`` (immutable, like the record)
``map``                        ``dict[str, X]``
``["null", X]``                ``X | None`` (default ``None`` when the schema says so)
record                         the generated class of that record
=============================  =====================================================

**Enums are ``Literal`` string types, not ``enum.Enum``**: fastavro reads and writes enum symbols
as ``str``, so a ``Literal`` costs nothing at the serde boundary (an ``Enum`` would need a
conversion each way, on the hot path, and ``.value`` at every comparison), existing comparisons
(``event.kind == "UPDATE"``, the compiled book's ``side == "BID"``) keep working, and mypy still
rejects a symbol the schema does not list.

Every class is keyword-only (``kw_only=True``): a renamed or reordered field can never be filled
positionally by mistake. The class kind is chosen by the benchmark in
``tests/benchmarks/bench_records.py`` (docs/benchmarks.md, "Typed records"): msgspec ``Struct``
(``frozen=True``); ``kind="dataclass"`` generates the ``@dataclass(frozen=True, slots=True)``
peer of that benchmark from the same schemas.

Who calls this: a developer after changing a schema (``quotewatch schemas codegen`` rewrites
``src/quotewatch/core/records.py``); ``tests/unit/core/test_records.py`` fails when the committed
module differs from a fresh generation.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ClassKind = Literal["msgspec", "dataclass"]

_PRIMITIVES = {
    "null": "None",
    "boolean": "bool",
    "int": "int",
    "long": "int",
    "float": "float",
    "double": "float",
    "bytes": "bytes",
    "string": "str",
}
_WIDTH = 120


@dataclass
class _Field:
    name: str
    annotation: str
    doc: str
    default: str | None
    """The default as Python source, or None when the field has none."""


@dataclass
class _Record:
    name: str
    doc: str
    fields: list[_Field]
    depends: set[str] = field(default_factory=set)


@dataclass
class _Enum:
    name: str
    doc: str
    symbols: list[str]


class _Collector:
    """Walks the schemas and collects every named record and enum (defined once, anywhere)."""

    def __init__(self) -> None:
        self.records: dict[str, _Record] = {}
        self.enums: dict[str, _Enum] = {}

    def named(self, schema: dict[str, Any]) -> str:  # not a topic record: Avro schema JSON
        name = _short(schema["name"])
        if schema["type"] == "enum":
            if name not in self.enums:
                self.enums[name] = _Enum(name, schema.get("doc", ""), list(schema["symbols"]))
            return name
        if name in self.records:
            return name
        record = self.records[name] = _Record(name, schema.get("doc", ""), [])
        for avro_field in schema["fields"]:
            annotation = self.annotation(avro_field["type"], record)
            default = None
            if "default" in avro_field:
                default = _default_source(avro_field["default"], annotation)
            record.fields.append(_Field(avro_field["name"], annotation, avro_field.get("doc", ""), default))
        return name

    def annotation(self, schema: Any, record: _Record | None = None) -> str:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _PRIMITIVES[schema]
            name = _short(schema)
            if record is not None and name not in self.enums:
                record.depends.add(name)
            return name
        if isinstance(schema, list):
            branches = [self.annotation(branch, record) for branch in schema]
            non_null = [b for b in branches if b != "None"]
            return " | ".join(non_null + (["None"] if len(non_null) < len(branches) else []))
        kind = schema["type"]
        if kind in ("record", "enum"):
            name = self.named(schema)
            if record is not None and kind == "record":
                record.depends.add(name)
            return name
        if kind == "array":
            return f"tuple[{self.annotation(schema['items'], record)}, ...]"
        if kind == "map":
            return f"dict[str, {self.annotation(schema['values'], record)}]"
        if kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        raise ValueError(f"unsupported Avro type {schema!r}")


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _default_source(value: Any, annotation: str) -> str:
    if value is None:
        return "None"
    if isinstance(value, list):
        if value:
            raise ValueError(f"only empty array defaults are supported, got {value!r}")
        return "()"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool | int | float):
        return repr(value)
    raise ValueError(f"unsupported default {value!r} for {annotation}")


def _load(schema_dir: Path) -> _Collector:
    collector = _Collector()
    files = sorted(schema_dir.glob("*.avsc"))
    # A reference by name needs no lookup here: the annotation is the referenced type's name.
    raw = [json.loads(path.read_text()) for path in files]
    for schema in raw:
        collector.named(schema)
    # A reference by name to an enum defined elsewhere was taken for a record dependency: drop it.
    for record in collector.records.values():
        record.depends -= set(collector.enums)
    return collector


def _ordered(records: dict[str, _Record]) -> list[_Record]:
    done: list[_Record] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dependency in sorted(records[name].depends):
            visit(dependency)
        done.append(records[name])

    for name in sorted(records):
        visit(name)
    return done


def _docstring(text: str, indent: str) -> list[str]:
    text = " ".join(text.split()).replace("\\", "\\\\").replace('"""', '\\"""')
    if not text:
        return []
    one = f'{indent}"""{text}"""'
    if len(one) <= _WIDTH:
        return [one]
    wrapped = textwrap.wrap(text, _WIDTH - len(indent) - 3)
    return [f'{indent}"""{wrapped[0]}', *(f"{indent}{line}" for line in wrapped[1:]), f'{indent}"""']


def _alias(name: str, members: list[str]) -> list[str]:
    one = f"{name}: TypeAlias = " + " | ".join(members)
    if len(one) <= _WIDTH:
        return [one]
    return [f"{name}: TypeAlias = (", f"    {members[0]}", *(f"    | {member}" for member in members[1:]), ")"]


def generate(schema_dir: Path, kind: ClassKind = "msgspec", topic_values: dict[str, str] | None = None) -> str:
    """The source of the records module for the schemas in ``schema_dir``.

    ``topic_values`` maps a topic suffix to its value schema name (default: the catalog's), for the
    ``TOPIC_RECORDS`` table.
    """
    if topic_values is None:
        from quotewatch.core.topics import CATALOG

        topic_values = {suffix: spec.value_schema for suffix, spec in CATALOG.items()}
    collector = _load(schema_dir)
    lines = [
        '"""The typed records of every Avro schema in ``schemas/``: one frozen class per record.',
        "",
        "Generated by `quotewatch schemas codegen`; do not edit. Change the ``.avsc`` and regenerate",
        "(the mapping from Avro to Python is documented in :mod:`quotewatch.core.codegen`).",
        '"""',
        "",
    ]
    if kind == "msgspec":
        lines += ["from typing import Final, Literal, TypeAlias", "", "import msgspec", ""]
    else:
        lines += ["from dataclasses import dataclass", "from typing import Final, Literal, TypeAlias", ""]
    for enum in sorted(collector.enums.values(), key=lambda e: e.name):
        symbols = ", ".join(f'"{symbol}"' for symbol in enum.symbols)
        one = f"{enum.name}: TypeAlias = Literal[{symbols}]"
        if len(one) <= _WIDTH:
            lines.append(one)
        else:
            lines += [f"{enum.name}: TypeAlias = Literal[", f"    {symbols}", "]"]
        lines += _docstring(enum.doc or f"The symbols of the Avro enum ``{enum.name}``.", "")
        lines.append("")
    lines.append("")
    records = _ordered(collector.records)
    for record in records:
        if kind == "msgspec":
            lines.append(f"class {record.name}(msgspec.Struct, frozen=True, kw_only=True):")
        else:
            lines += ["@dataclass(frozen=True, slots=True, kw_only=True)", f"class {record.name}:"]
        lines += _docstring(record.doc or f"The Avro record ``{record.name}``.", "    ")
        for avro_field in record.fields:
            lines.append("")
            default = f" = {avro_field.default}" if avro_field.default is not None else ""
            lines.append(f"    {avro_field.name}: {avro_field.annotation}{default}")
            lines += _docstring(avro_field.doc, "    ")
        lines += ["", ""]
    names = [record.name for record in records]
    topic_names = sorted({_short(name) for name in topic_values.values()})
    lines += _alias("AnyRecord", names)
    lines.append('"""Any generated record class."""')
    lines.append("")
    lines += _alias("Record", topic_names)
    lines.append('"""The value of a catalog topic (``TOPIC_RECORDS``)."""')
    lines.append("")
    lines.append("RECORD_TYPES: Final[dict[str, type[AnyRecord]]] = {")
    lines += [f'    "quotewatch.{name}": {name},' for name in names]
    lines.append("}")
    lines.append('"""Full Avro name -> generated class."""')
    lines.append("")
    lines.append("TOPIC_RECORDS: Final[dict[str, type[Record]]] = {")
    lines += [f'    "{suffix}": {_short(name)},' for suffix, name in sorted(topic_values.items())]
    lines.append("}")
    lines.append('"""Topic suffix (``md.events``, ...) -> the class of its values."""')
    return "\n".join(lines) + "\n"


def records_module_path() -> Path:
    """``src/quotewatch/core/records.py`` of this checkout."""
    return Path(__file__).resolve().with_name("records.py")


def write(path: Path | None = None, schema_dir: Path | None = None, kind: ClassKind = "msgspec") -> bool:
    """Regenerate the records module from ``schema_dir`` (default: the installed schemas); True when it changed."""
    from quotewatch.core.schemas import SCHEMA_PACKAGE

    path = path or records_module_path()
    if schema_dir is None:
        from importlib import resources

        schema_dir = Path(str(resources.files(SCHEMA_PACKAGE)))
    source = generate(schema_dir, kind)
    if path.exists() and path.read_text() == source:
        return False
    path.write_text(source)
    return True
