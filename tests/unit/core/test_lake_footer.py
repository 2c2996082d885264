"""Chunk descriptions in Parquet footers are not trusted: bounded, checked, never an exception.

Before: a footer whose description has ``"partition": 1e999`` raised OverflowError in
``chunk_description`` (a lake sink restart loop, and ``quotewatch lake info`` died); ``[`` x 1000
raised RecursionError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from quotewatch.core import lake
from quotewatch.core.lake import CHUNK_METADATA_KEY, ChunkName, ChunkRecord, file_name
from tests.unit.core.test_lake import T0, feature_row, write_rows

NAME = file_name("qw.features", 0, 10, 14)
GOOD: dict[str, Any] = {
    "version": 1,
    "topic": "qw.features",
    "partition": 0,
    "first_offset": 10,
    "last_offset": 14,
    "files": [f"symbol=BTC-USD/date=2026-04-17/hour=0/{NAME}"],
}


def footer(description: bytes) -> pq.FileMetaData:
    """The metadata of a one-row Parquet file whose footer carries ``description``."""
    table = pa.table({"x": [1]}).replace_schema_metadata({CHUNK_METADATA_KEY: description})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return pq.read_metadata(pa.BufferReader(sink.getvalue()))


def described(description: Any, name: ChunkName | None = None) -> ChunkRecord | None:
    raw = description if isinstance(description, bytes) else json.dumps(description).encode()
    return lake.chunk_description(footer(raw), name)


def test_our_description_reads_back() -> None:
    assert described(GOOD) == ChunkRecord("qw.features", 0, 10, 14, tuple(GOOD["files"]))
    assert described(GOOD, lake.parse_file_name(NAME)) is not None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"version":1,"topic":"qw.features","partition":1e999,"first_offset":10,"last_offset":14,"files":["a"]}',
        b"[" * 1000,
        b'{"topic":' * 2000,
        b"x" * (2 * 1024 * 1024),
    ],
    ids=["partition 1e999", "1000 brackets", "deep object", "2 MiB"],
)
def test_hostile_footers_are_no_description(raw: bytes) -> None:
    assert described(raw) is None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"partition": -1}, "negative partition"),
        ({"partition": True}, "a bool is no partition"),
        ({"first_offset": 2**63}, "beyond int64"),
        ({"last_offset": 9}, "last before first"),
        ({"topic": "t" * 300}, "topic too long"),
        ({"files": []}, "no files"),
        ({"files": "a"}, "files not a list"),
        ({"files": [f"../../elsewhere/{NAME}"]}, "path escaping the dataset"),
        ({"files": [f"/abs/{NAME}"]}, "absolute path"),
        ({"files": ["symbol=X/other.parquet"]}, "a file of another chunk"),
        ({"files": [7]}, "not a path"),
    ],
)
def test_invalid_descriptions_are_no_description(change: dict[str, Any], why: str) -> None:
    assert described({**GOOD, **change}) is None, why


def test_a_footer_must_describe_the_chunk_its_file_is_named_after(tmp_path: Path) -> None:
    assert described(GOOD, ChunkName("qw.features", 0, 10, 15)) is None
    # A file whose footer claims a later last offset would make the sink skip records it never wrote.
    rows = [feature_row("BTC-USD", T0, 100)]
    (written,) = write_rows(tmp_path, rows, 100, 105)
    path = tmp_path / "qw.features" / written
    table = pq.read_table(path)
    forged = dict(table.schema.metadata)
    forged[CHUNK_METADATA_KEY] = json.dumps({**GOOD, "first_offset": 100, "last_offset": 10**9}).encode()
    pq.write_table(table.replace_schema_metadata(forged), path)
    directory = written.rsplit("/", 1)[0]
    assert lake.find_chunk(str(tmp_path), "qw.features", 0, 100, directory) is None
    assert lake.last_chunk(str(tmp_path), "qw.features", 0) is None
    info = lake.dataset_info(str(tmp_path), "qw.features")
    assert (info.files, info.partitions[0].first_offset, info.partitions[0].last_offset) == (1, 100, 105)


_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=30), max_size=3),
)


@hypothesis_settings(max_examples=150)
@given(
    changes=st.dictionaries(st.sampled_from(sorted(GOOD)), _values, max_size=3),
    raw=st.one_of(st.none(), st.binary(max_size=200), st.text(max_size=2000).map(str.encode)),
)
def test_footer_fuzz(changes: dict[str, Any], raw: bytes | None) -> None:
    if raw is None:
        raw = json.dumps({**GOOD, **changes}).encode()
    chunk = lake.chunk_description(footer(raw))
    if chunk is not None:
        assert 0 <= chunk.partition < 2**31
        assert 0 <= chunk.first_offset <= chunk.last_offset < 2**63
        assert all(
            path.endswith(file_name(chunk.topic, chunk.partition, chunk.first_offset, chunk.last_offset))
            for path in chunk.files
        )
