"""The lake's contracts without a broker: Avro -> Arrow types, layout, file names, chunks, reading, info."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotewatch.core import lake
from quotewatch.core.lake import (
    ChunkRecord,
    LakeError,
    LakeRecordError,
    arrow_schema_for,
    avro_to_arrow,
    file_name,
    file_schema_for,
    hour_partition,
    parse_file_name,
    partition_dir,
    write_chunk,
)
from quotewatch.core.schemas import default_store
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import CATALOG
from tests.records import plain
from tests.unit.core.test_schemas_and_serde import sample_record

STORE = default_store()
TOPIC_SCHEMAS = sorted({spec.value_schema for spec in CATALOG.values()})
T0 = 1_776_387_600_000_000_000  # 2026-04-17T01:00:00Z
HOUR = 3_600 * 10**9


# -- Avro -> Arrow ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOPIC_SCHEMAS)
def test_every_catalog_schema_maps_to_arrow_and_a_full_record_round_trips(name: str) -> None:
    schema = STORE.current(name).schema
    arrow_type, nullable = avro_to_arrow(schema)
    assert isinstance(arrow_type, pa.StructType)
    assert not nullable
    # Through Avro first, so the values are what the sink gets from the serde.
    serde = AvroSerde()
    record = serde.decode(serde.encode_with(STORE.current(name), sample_record(schema)))
    row = msgspec.to_builtins(record, builtin_types=(bytes,))  # what lake_row makes of it
    batch = pa.RecordBatch.from_pylist([row], schema=pa.schema(list(arrow_type)))
    assert batch.to_pylist() == [plain(record)]
    assert [f.name for f in arrow_type] == [f["name"] for f in schema["fields"]]


def test_types_follow_the_avro_schema() -> None:
    events = arrow_schema_for("qw.md.events")
    assert events.field("ts_event").type == pa.int64()
    assert not events.field("ts_event").nullable
    assert events.field("kind").type == pa.string()  # enum
    snapshot = events.field("snapshot")
    assert snapshot.nullable  # ["null", BookSnapshot]
    bids = snapshot.type.field("bids")
    assert bids.type == pa.list_(
        pa.field(
            "item",
            pa.struct([pa.field("price_e8", pa.int64(), False), pa.field("size_e8", pa.int64(), False)]),
            False,
        )
    )
    change = events.field("update").type.field("changes").type.value_type
    assert change.field("side").type == pa.string()
    labels = arrow_schema_for("qw.labels")
    assert labels.field("label").type == pa.int32()
    assert labels.field("delta_ms").type == pa.int32()
    assert arrow_schema_for("qw.predictions").field("model_role").type == pa.string()
    raw = arrow_schema_for("qw.md.raw")
    assert raw.field("symbols").type == pa.list_(pa.field("item", pa.string(), False))
    assert arrow_schema_for("features").field("values").type.value_type == pa.float64()
    assert raw.names[-5:] == list(lake.META_COLUMNS)
    assert raw.metadata[b"quotewatch.value_schema"] == b"quotewatch.RawFrame"
    dead_letter, _ = avro_to_arrow(STORE.current("quotewatch.DeadLetter").schema)
    assert dead_letter.field("source_key").type == pa.binary()
    assert dead_letter.field("source_key").nullable


def test_file_schema_leaves_the_partition_column_to_the_path() -> None:
    assert "symbol" in arrow_schema_for("qw.features").names
    assert "symbol" not in file_schema_for("qw.features").names
    assert "feed" not in file_schema_for("qw.md.raw").names
    assert "symbols" in file_schema_for("qw.md.raw").names


def test_maps_fixed_and_logical_types() -> None:
    arrow_type, _ = avro_to_arrow({"type": "map", "values": ["null", "double"]})
    assert arrow_type == pa.map_(pa.string(), pa.field("value", pa.float64(), True))
    assert avro_to_arrow({"type": "fixed", "name": "F", "size": 8}) == (pa.binary(8), False)
    assert avro_to_arrow({"type": "long", "logicalType": "timestamp-micros"}) == (pa.int64(), False)
    assert avro_to_arrow(["null", "string"]) == (pa.string(), True)


def test_unions_without_a_column_type_are_refused() -> None:
    with pytest.raises(LakeError, match="several non-null branches"):
        avro_to_arrow(["null", "string", "long"])
    with pytest.raises(LakeError, match="unknown Avro type"):
        avro_to_arrow("quotewatch.Nowhere")
    with pytest.raises(LakeError, match="not written to the lake"):
        arrow_schema_for("qw.snapshot")


# -- layout ----------------------------------------------------------------------------------------


def test_partition_directories_use_symbol_or_feed_and_the_utc_hour_of_ts_event() -> None:
    feature = {"symbol": "BTC-USD", "ts_event": T0 - 1}
    assert partition_dir("qw.features", feature) == "symbol=BTC-USD/date=2026-04-17/hour=0"
    assert partition_dir("qw.features", {**feature, "ts_event": T0}) == "symbol=BTC-USD/date=2026-04-17/hour=1"
    midnight = T0 - HOUR
    assert hour_partition(midnight - 1) == "date=2026-04-16/hour=23"
    assert hour_partition(midnight) == "date=2026-04-17/hour=0"
    assert hour_partition(-1) == "date=1969-12-31/hour=23"
    raw = {"feed": "coinbase-advanced", "symbols": ["ETH-USD", "BTC-USD"], "ts_event": T0}
    assert partition_dir("replay7.md.raw", raw) == "feed=coinbase-advanced/date=2026-04-17/hour=1"
    assert partition_dir("qw.labels", {"symbol": "BTC/USD ä", "ts_event": T0}).startswith("symbol=BTC%2FUSD%20%C3%A4/")


def test_records_without_a_partition_value_are_poison() -> None:
    with pytest.raises(LakeRecordError, match="empty partition value"):
        partition_dir("qw.features", {"symbol": "", "ts_event": T0})
    with pytest.raises(LakeRecordError, match="no string 'symbol'"):
        partition_dir("qw.features", {"ts_event": T0})


@pytest.mark.parametrize("symbol", ["X" * 201, "€" * 23])
def test_a_partition_value_too_long_for_a_directory_name_is_poison(symbol: str) -> None:
    # A directory name passes the filesystem's 255-byte limit: every write of the chunk would fail
    # with ENAMETOOLONG, so the record is dead-lettered instead of stopping the sink.
    with pytest.raises(LakeRecordError, match="percent-encoded, at most 200"):
        partition_dir("qw.features", {"symbol": symbol, "ts_event": T0})
    assert partition_dir("qw.features", {"symbol": "X" * 200, "ts_event": T0}).startswith("symbol=XXX")


@given(
    topic=st.from_regex(r"[A-Za-z0-9_\-]{1,12}(\.[a-z0-9]{1,6}){1,3}", fullmatch=True),
    partition=st.integers(0, 10_000),
    first=st.integers(0, 2**62),
    length=st.integers(0, 2**20),
)
def test_file_names_round_trip_and_sort_by_offset(topic: str, partition: int, first: int, length: int) -> None:
    name = file_name(topic, partition, first, first + length)
    assert parse_file_name(name) == lake.ChunkName(topic, partition, first, first + length)
    assert len(name.split("+")[2]) == 20
    assert file_name(topic, partition, first, first) < file_name(topic, partition, first + 1, first + 1)


def test_file_name_examples_and_rejects() -> None:
    assert file_name("qw.md.events", 2, 1200, 2399) == (
        "qw.md.events+2+00000000000000001200+00000000000000002399.parquet"
    )
    for bad in ("x.parquet", "qw.features+0+1.parquet", "qw.features+0+5+4.parquet", "a+b+1+2.parquet", "t+0+1+2.csv"):
        assert parse_file_name(bad) is None
    with pytest.raises(ValueError, match="invalid chunk"):
        file_name("qw.features", 0, 10, 9)


def test_dataset_uri_keeps_the_namespace_and_drops_connection_options(tmp_path: Path) -> None:
    assert lake.dataset_uri(str(tmp_path), "replay1.features") == str(tmp_path / "replay1.features")
    assert lake.dataset_uri("s3://bucket/lake/?endpoint_override=x:9000&scheme=http", "qw.labels") == (
        "s3://bucket/lake/qw.labels"
    )
    location = lake.lake_location("relative/lake")
    assert location.root == os.path.abspath("relative/lake")
    with pytest.raises(LakeError, match="LAKE_URI=nope://"):
        lake.lake_location("nope://x/y")


# -- chunks, reading, info -------------------------------------------------------------------------


def feature_row(symbol: str, ts: int, offset: int, partition: int = 0) -> dict[str, Any]:
    return {
        "ts_event": ts,
        "ts_init": ts + 7,
        "exchange": "coinbase",
        "symbol": symbol,
        "tick_ms": 100,
        "epoch": 1,
        "feature_spec_id": "spec-v1",
        "values": [0.5, float(offset)],
        "bids": [{"price_e8": 804_000_000_000, "size_e8": 10**8}],
        "asks": [{"price_e8": 804_001_000_000, "size_e8": 2 * 10**8}],
        "feed_state": "SUBSCRIBED",
        "_topic": "qw.features",
        "_partition": partition,
        "_offset": offset,
        "_key": symbol,
        "_timestamp_ms": ts // 1_000_000,
    }


def write_rows(root: Path | str, rows: list[dict[str, Any]], first: int, last: int, partition: int = 0) -> list[str]:
    """Write ``rows`` as the chunk [first, last] the way the sink does (grouped by directory, first row first)."""
    schema = file_schema_for("qw.features")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(partition_dir("qw.features", row), []).append(row)
    tables = [(d, pa.Table.from_pylist(r, schema=schema)) for d, r in groups.items()]
    return [w.path for w in write_chunk(str(root), "qw.features", partition, first, last, tables)]


def test_a_chunk_is_one_file_per_directory_named_by_its_offsets_and_described_in_the_footer(tmp_path: Path) -> None:
    rows = [feature_row("BTC-USD", T0 - 200, 10), feature_row("ETH-USD", T0 - 100, 12), feature_row("BTC-USD", T0, 13)]
    written = write_rows(tmp_path, rows, 10, 14)
    name = "qw.features+0+00000000000000000010+00000000000000000014.parquet"
    assert written == [
        f"symbol=BTC-USD/date=2026-04-17/hour=0/{name}",
        f"symbol=ETH-USD/date=2026-04-17/hour=0/{name}",
        f"symbol=BTC-USD/date=2026-04-17/hour=1/{name}",
    ]
    dataset = tmp_path / "qw.features"
    metadata = pq.read_metadata(dataset / written[1])
    assert lake.chunk_description(metadata) == ChunkRecord("qw.features", 0, 10, 14, tuple(written))
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    assert not [p for p in dataset.rglob("*") if p.name.startswith(".")], "no temporary file is left behind"
    before = {p: p.read_bytes() for p in dataset.rglob("*.parquet")}
    write_rows(tmp_path, rows, 10, 14)
    assert {p: p.read_bytes() for p in dataset.rglob("*.parquet")} == before, "rewriting a chunk is idempotent"


def test_read_table_restores_partition_columns_filters_and_deduplicates(tmp_path: Path) -> None:
    first = [feature_row("BTC-USD", T0 - 200 + i, i) for i in range(5)] + [feature_row("ETH-USD", T0 + 5, 5)]
    write_rows(tmp_path, first, 0, 6)
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + HOUR + 1, 7)], 7, 7)
    write_rows(tmp_path, [feature_row("ETH-USD", T0 + 1, 0, partition=1)], 0, 0, partition=1)
    # A manual copy overlapping offsets 5..7 under another name: readers still see each offset once.
    write_rows(tmp_path, [feature_row("ETH-USD", T0 + 5, 5), feature_row("BTC-USD", T0 + HOUR + 1, 7)], 5, 7)
    table = lake.read_table(str(tmp_path), "qw.features")
    assert list(zip(table["_partition"].to_pylist(), table["_offset"].to_pylist(), strict=True)) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 7), (1, 0)
    ]  # fmt: skip
    assert table.schema.names == [*arrow_schema_for("qw.features").names, "date", "hour"]
    rows = table.to_pylist()
    assert rows[5]["symbol"] == "ETH-USD"
    assert rows[5]["hour"] == 1
    assert str(rows[5]["date"]) == "2026-04-17"
    expected = feature_row("ETH-USD", T0 + 5, 5)
    assert {k: rows[5][k] for k in expected} == expected
    only_eth = lake.read_table(str(tmp_path), "qw.features", symbols=["ETH-USD"], columns=["_offset", "symbol"])
    assert only_eth.to_pylist() == [{"_offset": 5, "symbol": "ETH-USD"}, {"_offset": 0, "symbol": "ETH-USD"}]
    window = lake.read_table(str(tmp_path), "qw.features", start_ns=T0 - 198, end_ns=T0 + 5, columns=["ts_event"])
    assert window["ts_event"].to_pylist() == [T0 - 198, T0 - 197, T0 - 196, T0 + 1]
    late = lake.read_dataset(str(tmp_path), "qw.features", start_ns=T0 + HOUR)
    assert isinstance(late, pd.DataFrame)
    assert late["_offset"].tolist() == [7]
    with pytest.raises(LakeError, match="no column"):
        lake.read_table(str(tmp_path), "qw.features", columns=["nope"])
    empty = lake.read_table(str(tmp_path), "other.features")
    assert empty.num_rows == 0
    assert "values" in empty.schema.names


def test_raw_frames_filter_by_their_symbols_array(tmp_path: Path) -> None:
    schema = file_schema_for("qw.md.raw")
    frames = [
        {
            "ts_event": T0 + i,
            "ts_init": T0 + i,
            "exchange": "coinbase",
            "symbols": symbols,
            "connection_id": "c1",
            "frame_index": i,
            "kind": "FRAME",
            "text": "{}",
            "_topic": "qw.md.raw",
            "_partition": 0,
            "_offset": i,
            "_key": "coinbase-exchange",
            "_timestamp_ms": 1,
        }
        for i, symbols in enumerate([["BTC-USD"], ["ETH-USD", "SOL-USD"], ["BTC-USD", "ETH-USD"], []])
    ]
    directory = "feed=coinbase-exchange/" + hour_partition(T0)
    write_chunk(str(tmp_path), "qw.md.raw", 0, 0, 3, [(directory, pa.Table.from_pylist(frames, schema=schema))])
    table = lake.read_table(str(tmp_path), "qw.md.raw", symbols=["ETH-USD"], columns=["_offset", "feed"])
    assert table.to_pylist() == [
        {"_offset": 1, "feed": "coinbase-exchange"},
        {"_offset": 2, "feed": "coinbase-exchange"},
    ]


def test_the_files_open_directly_in_duckdb_pandas_and_polars(tmp_path: Path) -> None:
    rows = [feature_row("BTC-USD", T0 - 1, 0), feature_row("ETH-USD", T0, 1), feature_row("BTC/USD", T0, 2)]
    write_rows(tmp_path, rows, 0, 2)
    dataset = lake.dataset_uri(str(tmp_path), "qw.features")
    found = duckdb.execute(
        f"select symbol, hour, _offset, bids[1].price_e8 as bid from read_parquet('{dataset}/**/*.parquet', "
        "hive_partitioning=1) order by _offset"
    ).fetchall()
    bid = 804_000_000_000
    assert found == [("BTC-USD", 0, 0, bid), ("ETH-USD", 1, 1, bid), ("BTC/USD", 1, 2, bid)]
    frame = pd.read_parquet(dataset).sort_values("_offset")
    assert frame["_offset"].tolist() == [0, 1, 2]
    assert frame["symbol"].astype(str).tolist() == [
        "BTC-USD",
        "ETH-USD",
        "BTC/USD",
    ]
    polars = pl.scan_parquet(f"{dataset}/**/*.parquet", hive_partitioning=True).sort("_offset").collect()
    assert polars["symbol"].to_list() == ["BTC-USD", "ETH-USD", "BTC/USD"]
    assert polars["values"].to_list()[2] == [0.5, 2.0]


def test_lake_info_reports_rows_time_range_coverage_holes_overlaps_and_incomplete_chunks(tmp_path: Path) -> None:
    # Chunk ranges tile the offsets: 0..9, then 10..19 whose first rows sit after commit markers
    # (offsets 10 and 11 hold no row): no hole. 20..29 is missing: a hole. 30..39 and 35..45 overlap.
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + i, i) for i in range(9)], 0, 9)
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + i, i) for i in range(12, 19)], 10, 19)
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + 30, 30)], 30, 39)
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + 35, 35)], 35, 45)
    incomplete = write_rows(
        tmp_path, [feature_row("ETH-USD", T0 - 5, 0, 2), feature_row("BTC-USD", T0 + 2 * HOUR, 1, 2)], 0, 1, 2
    )
    (tmp_path / "qw.features" / incomplete[1]).unlink()
    stale = tmp_path / "qw.features" / "symbol=ETH-USD" / ".left-by-a-crash.parquet.tmp"
    stale.write_bytes(b"partial")
    infos = lake.lake_info(str(tmp_path))
    assert [i.topic for i in infos] == ["qw.features"]
    info = infos[0]
    assert (info.files, info.rows) == (5, 9 + 7 + 1 + 1 + 1)
    assert (info.ts_event_min, info.ts_event_max) == (T0 - 5, T0 + 35)
    first, third = info.partitions
    assert (first.partition, first.first_offset, first.last_offset, first.chunks) == (0, 0, 45, 4)
    assert first.holes == [(20, 29)]
    assert first.overlaps == [(35, 39)]
    assert (third.partition, third.holes, third.overlaps) == (2, [], [])
    assert not third.complete, "a partition with an incomplete chunk is not complete"
    assert [(c.partition, c.first_offset, c.last_offset, c.missing) for c in info.incomplete_chunks] == [
        (2, 0, 1, [incomplete[1]])
    ]
    assert info.temporary_files == ["symbol=ETH-USD/.left-by-a-crash.parquet.tmp"]
    assert not info.healthy
    text = lake.format_lake_info(infos)
    assert "hole: offsets 20..29 missing (10 offsets)" in text
    assert "overlap: offsets 35..39" in text
    assert "incomplete chunk: partition 2 offsets 0..1, missing 1 file(s)" in text
    assert "partition 2: offsets 0..1 in 1 chunks, 1 rows, INCOMPLETE" in text
    assert "2026-04-17T00:59:59.999999995Z" in text


def test_finding_a_chunk_after_a_crash(tmp_path: Path) -> None:
    rows = [feature_row("BTC-USD", T0, 100), feature_row("ETH-USD", T0, 101)]
    written = write_rows(tmp_path, rows, 100, 105)
    directory = written[0].rsplit("/", 1)[0]
    chunk = lake.find_chunk(str(tmp_path), "qw.features", 0, 100, directory)
    assert chunk == ChunkRecord("qw.features", 0, 100, 105, tuple(written))
    assert lake.find_chunk(str(tmp_path), "qw.features", 0, 101, directory) is None
    assert lake.find_chunk(str(tmp_path), "qw.features", 1, 100, directory) is None
    assert lake.find_chunk(str(tmp_path), "qw.features", 0, 100, "symbol=XRP-USD/date=2026-04-17/hour=1") is None
    assert lake.missing_files(str(tmp_path), chunk) == []
    (tmp_path / "qw.features" / written[1]).unlink()
    assert lake.missing_files(str(tmp_path), chunk) == [written[1]]
    write_rows(tmp_path, [feature_row("BTC-USD", T0, 106)], 106, 110)
    last = lake.last_chunk(str(tmp_path), "qw.features", 0)
    assert last is not None
    assert (last.first_offset, last.last_offset) == (106, 110)
    assert lake.last_chunk(str(tmp_path), "qw.features", 1) is None
