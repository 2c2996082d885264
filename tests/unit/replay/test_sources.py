"""Parsing the command line's times, sources and speeds; reading windows from the lake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from quotewatch.core.errors import ConfigError
from quotewatch.core.lake import file_schema_for, partition_dir, write_chunk
from quotewatch.domain.coinbase import FEED_ADVANCED
from quotewatch.domain.normaliser import Normaliser
from quotewatch.domain.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.replay.publisher import parse_speed
from quotewatch.replay.sources import (
    ReplayError,
    SourceSpec,
    Window,
    format_time,
    lake_event_records,
    lake_raw_records,
    parse_source,
    parse_time,
)

SECOND = 1_000_000_000
HOUR = 3_600 * SECOND


def test_times_are_iso_8601_utc_unless_zoned_exact_to_the_microsecond() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == SECOND
    assert parse_time("1970-01-01 00:00:01.000002") == SECOND + 2_000
    assert parse_time("1970-01-01T02:00:00+02:00") == 0
    assert parse_time("2018-04-17T00:55:00Z") == 1_523_926_500 * SECOND
    assert format_time(1_523_926_500 * SECOND + 123_456_000) == "2018-04-17T00:55:00.123456Z"
    with pytest.raises(ConfigError, match="not an ISO 8601"):
        parse_time("yesterday")
    with pytest.raises(ConfigError, match="must be after"):
        Window(2 * SECOND, SECOND)
    window = Window(SECOND, 2 * SECOND)
    assert (window.contains(SECOND), window.contains(2 * SECOND), window.before_end(2 * SECOND - 1)) == (
        True,
        False,
        True,
    )


def test_sources_and_speeds() -> None:
    assert parse_source("topic", "qw") == SourceSpec("topic", prefix="qw")
    assert parse_source("topic:live", "qw") == SourceSpec("topic", prefix="live")
    assert parse_source("lake", "qw") == SourceSpec("lake", prefix="qw")
    assert parse_source("capture:/data/x.jsonl", "qw") == SourceSpec("capture", path=Path("/data/x.jsonl"))
    assert parse_source("synthetic:7:24", "qw") == SourceSpec("synthetic", seed=7, hours=24.0)
    for bad in ("kafka:x", "capture:", "synthetic:7", "synthetic:x:1", "synthetic:1:0"):
        with pytest.raises(ConfigError):
            parse_source(bad, "qw")
    assert [parse_speed(s) for s in ("max", "1x", "10X", "0.5x")] == [None, 1.0, 10.0, 0.5]
    for bad in ("fast", "0x", "-2x", "10"):
        with pytest.raises(ConfigError, match="--speed"):
            parse_speed(bad)


def write_dataset(root: Path, topic: str, records: list[dict[str, Any]], key: str, partition_of: Any) -> None:
    """Write ``records`` into the lake as the sink would: offsets per partition, a chunk per hive directory run."""
    schema = file_schema_for(topic)
    offsets: dict[int, int] = {}
    runs: list[tuple[int, str, list[dict[str, Any]]]] = []
    for record in records:
        partition = partition_of(record)
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        row = {**record, "_topic": topic, "_partition": partition, "_offset": offset, "_key": record[key]}
        row["_timestamp_ms"] = record["ts_init"] // 1_000_000
        directory = partition_dir(topic, record)
        same = [run for run in runs if run[0] == partition]
        if same and same[-1][1] == directory:
            same[-1][2].append(row)
        else:
            runs.append((partition, directory, [row]))
    for partition, directory, rows in runs:
        table = pa.Table.from_pylist(rows, schema=schema)
        first, last = rows[0]["_offset"], rows[-1]["_offset"]
        write_chunk(str(root), topic, partition, first, last, [(directory, table)])


def log_over_two_hours() -> list[dict[str, Any]]:
    """A connection at 00:59:50 whose frames run past 01:00 (two hour partitions), then a second one at 01:30."""
    log: list[dict[str, Any]] = []
    for seed, start, connection in ((1, 10 * HOUR - 10 * SECOND, "c1"), (2, 10 * HOUR + HOUR // 2, "c2")):
        config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=seed, start_ns=start, rate=40.0)
        log.extend(synthetic_raw_frames(FEED_ADVANCED, config, 20 * SECOND, connection_id=connection))
    return log


def test_lake_windows_start_at_the_connected_record_found_across_hour_partitions(tmp_path: Path) -> None:
    log = log_over_two_hours()
    write_dataset(tmp_path, "qw.md.raw", log, "feed", lambda r: 0)
    events, _ = Normaliser().process_all(log)
    write_dataset(tmp_path, "qw.md.events", events, "symbol", lambda r: 0 if r["symbol"] == "BTC-USD" else 1)

    window = Window(10 * HOUR + 5 * SECOND, 10 * HOUR + 8 * SECOND)  # in c1, after the hour boundary
    start, total, records = lake_raw_records(str(tmp_path), "qw", window)
    expected = [r for r in log if r["connection_id"] == "c1" and r["ts_init"] < window.end_ns]
    assert (start.connection_id, start.offset) == ("c1", 0)
    got = [record.value for record in records]
    assert total == len(got) == len(expected)
    assert got == expected

    start, total, records = lake_event_records(str(tmp_path), "qw", window)
    wanted = [e for e in events if start.ts_init <= e["ts_init"] < window.end_ns]
    got = [record.value for record in records]
    assert total == len(wanted)
    for symbol in ("BTC-USD", "ETH-USD"):
        assert [e for e in got if e["symbol"] == symbol] == [e for e in wanted if e["symbol"] == symbol]

    start, _, _ = lake_raw_records(str(tmp_path), "qw", Window(10 * HOUR + HOUR // 2 + 3 * SECOND, None))
    assert start.connection_id == "c2"
    with pytest.raises(ReplayError, match="no CONNECTED record"):
        lake_raw_records(str(tmp_path), "qw", Window(9 * HOUR, None))
