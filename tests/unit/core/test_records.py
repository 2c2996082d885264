"""The typed records: generated from the schemas (never stale), round-tripped by the serde for every
topic, and the only way a topic record crosses a signature in the package."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from quotewatch.core import codegen, records
from quotewatch.core.errors import DecodeError, EncodeError
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import CATALOG
from tests.unit.core.test_schemas_and_serde import sample_record

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "src" / "quotewatch"
SCHEMAS = REPO / "schemas"


def test_the_committed_records_module_is_a_fresh_generation() -> None:
    fresh = codegen.generate(SCHEMAS)
    committed = codegen.records_module_path().read_text()
    assert committed == fresh, "src/quotewatch/core/records.py is stale: run `quotewatch schemas codegen`"


def test_the_codegen_command_rewrites_a_stale_module(tmp_path: Path) -> None:
    target = tmp_path / "records.py"
    target.write_text("# stale\n")
    assert codegen.write(target, SCHEMAS) is True
    assert target.read_text() == codegen.generate(SCHEMAS)
    assert codegen.write(target, SCHEMAS) is False  # current: left alone
    check = subprocess.run(
        [sys.executable, "-m", "quotewatch.cli", "schemas", "codegen", "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_a_schema_change_changes_the_generated_class(tmp_path: Path) -> None:
    for path in SCHEMAS.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    label = json.loads((tmp_path / "quotewatch.Label.avsc").read_text())
    label["fields"][7]["name"] = "changed"  # "label" -> "changed"
    (tmp_path / "quotewatch.Label.avsc").write_text(json.dumps(label))
    source = codegen.generate(tmp_path)
    body = source[source.index("class Label(") : source.index("class ", source.index("class Label(") + 1)]
    assert "    changed: int\n" in body
    assert "    label: int\n" not in body


def test_every_schema_has_one_frozen_class_with_its_docs_and_defaults() -> None:
    names = {json.loads(path.read_text())["name"] for path in SCHEMAS.glob("*.avsc")}
    classes = {name for name in names if name != "ModelRole"}  # an enum: a Literal type
    assert classes <= {cls.__name__ for cls in records.RECORD_TYPES.values()}
    top = records.BookTop(ts_event=1, ts_init=2, exchange="x", symbol="S", tick_ms=100, epoch=0, bids=(), asks=())
    with pytest.raises(AttributeError):
        top.ts_event = 3  # type: ignore[misc]  # frozen: what this test checks
    assert "qw.book.top3" in (records.BookTop.__doc__ or "")
    letter = msgspec.structs.fields(records.DeadLetter)
    defaults = {f.name: f.default for f in letter if f.default is not msgspec.NODEFAULT}
    assert defaults == {"exchange": None, "symbol": None, "source_ref": "", "source_key": None}
    assert records.Snapshot(**_snapshot_fields()).live_metrics == ()
    assert records.FeatureVector.__struct_fields__[-1] == "feed_state"
    with pytest.raises(TypeError):
        records.BookLevel(1, 2)  # type: ignore[call-arg]  # keyword-only: what this test checks


def _snapshot_fields() -> dict[str, Any]:
    return {
        "ts_event": 1,
        "ts_init": 1,
        "exchange": "x",
        "symbol": "S",
        "bids": (),
        "asks": (),
        "feature_spec_id": "f",
        "feature_names": (),
        "feature_values": (),
    }


@pytest.mark.parametrize("suffix", sorted(CATALOG))
def test_every_topic_round_trips_its_typed_record(suffix: str) -> None:
    serde = AvroSerde()
    spec = CATALOG[suffix]
    topic = spec.name("qw")
    cls = records.TOPIC_RECORDS[suffix]
    record = msgspec.convert(sample_record(serde.store.current(spec.value_schema).schema), cls)
    data = serde.encode(topic, record)
    decoded = serde.decode(data, topic)
    assert type(decoded) is cls
    assert decoded == record
    assert serde.decode_as(data, topic, cls) == record
    assert serde.encode(topic, decoded) == data  # byte for byte: what the replay parity rests on


def test_a_record_of_another_topic_is_refused_both_ways() -> None:
    serde = AvroSerde()
    label = msgspec.convert(sample_record(serde.store.current("quotewatch.Label").schema), records.Label)
    with pytest.raises(EncodeError, match=r"Label is not a quotewatch\.BookTop"):
        serde.encode("qw.book.top3", label)  # a record of another topic: what this test checks
    with pytest.raises(DecodeError, match="expected a BookTop"):
        serde.decode_as(serde.encode("qw.labels", label), "qw.labels", records.BookTop)


_UNTYPED = re.compile(r"dict\[str, Any\]|Mapping\[str, Any\]|Record = dict")
_MARKER = "# not a topic record:"


def test_no_topic_record_is_an_untyped_dict_in_the_package() -> None:
    """Every remaining ``dict[str, Any]`` / ``Mapping[str, Any]`` says on its line what it holds instead."""
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if _UNTYPED.search(line):
                marker = line.partition(_MARKER)[2].strip()
                if not marker:
                    offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offending, (
        "untyped dicts without a '# not a topic record: <what it is>' marker (a topic record must be a class "
        "of quotewatch.core.records):\n" + "\n".join(offending)
    )
