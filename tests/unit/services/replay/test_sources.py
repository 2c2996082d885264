"""Parsing the command line's times, sources and speeds; reading windows from the lake; the topic window search."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from quotewatch.core.errors import ConfigError
from quotewatch.core.lake import LakeRow, file_schema_for, lake_row, partition_dir, write_chunk
from quotewatch.core.records import MarketEvent, RawFrame, RawKind
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.replay.lake_source import lake_event_records, lake_raw_records
from quotewatch.services.replay.publisher import parse_speed
from quotewatch.services.replay.sources import (
    LogRecord,
    LogValue,
    ReplayError,
    SourceSpec,
    TopicReader,
    Window,
    find_raw_start,
    format_time,
    parse_source,
    parse_time,
    values_of,
)

SECOND = 1_000_000_000
HOUR = 3_600 * SECOND


def test_times_are_iso_8601_utc_unless_zoned_exact_to_the_nanosecond() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == SECOND
    assert parse_time("1970-01-01 00:00:01.000002") == SECOND + 2_000
    assert parse_time("1970-01-01T02:00:00+02:00") == 0
    assert parse_time("2018-04-17T00:55:00Z") == 1_523_926_500 * SECOND
    assert format_time(1_523_926_500 * SECOND + 123_456_000) == "2018-04-17T00:55:00.123456Z"
    # ts fields are integer ns: a --from/--to given to the ns is kept to the ns (datetime keeps µs).
    assert parse_time("2018-04-17T00:55:00.123456789Z") == 1_523_926_500 * SECOND + 123_456_789
    assert parse_time("2018-04-17 02:55:00,000000001+02:00") == 1_523_926_500 * SECOND + 1
    assert parse_time("2018-04-17T00:55:00.0000000019") == 1_523_926_500 * SECOND + 1  # past the 9th: dropped
    assert parse_time("1969-12-31T23:59:59.9999995Z") == -500
    assert parse_time("20180417T005500.5Z") == 1_523_926_500 * SECOND + SECOND // 2
    for ns in (1_523_926_500 * SECOND + 123_456_789, -500, 0, 1_000, 1):
        assert parse_time(format_time(ns)) == ns
    assert format_time(1_523_926_500 * SECOND + 123_456_789) == "2018-04-17T00:55:00.123456789Z"
    assert format_time(-500) == "1969-12-31T23:59:59.999999500Z"
    for bad in ("2018-04-17T00:55:00.123x", "2018-04-17T00:55:00.123456789+25:00"):
        with pytest.raises(ConfigError, match="not an ISO 8601"):
            parse_time(bad)
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


def write_dataset(
    root: Path, topic: str, records: Sequence[RawFrame | MarketEvent], key: str, partition_of: Any
) -> None:
    """Write ``records`` into the lake as the sink would: offsets per partition, a chunk per hive directory run."""
    schema = file_schema_for(topic)
    offsets: dict[int, int] = {}
    runs: list[tuple[int, str, list[LakeRow]]] = []
    for record in records:
        partition = partition_of(record)
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        row = lake_row(record, topic, partition, offset, getattr(record, key), record.ts_init // 1_000_000)
        directory = partition_dir(topic, row)
        same = [run for run in runs if run[0] == partition]
        if same and same[-1][1] == directory:
            same[-1][2].append(row)
        else:
            runs.append((partition, directory, [row]))
    for partition, directory, rows in runs:
        table = pa.Table.from_pylist(rows, schema=schema)
        first, last = rows[0]["_offset"], rows[-1]["_offset"]
        write_chunk(str(root), topic, partition, first, last, [(directory, table)])


def log_over_two_hours() -> list[RawFrame]:
    """A connection at 00:59:50 whose frames run past 01:00 (two hour partitions), then a second one at 01:30."""
    log: list[RawFrame] = []
    for seed, start, connection in ((1, 10 * HOUR - 10 * SECOND, "c1"), (2, 10 * HOUR + HOUR // 2, "c2")):
        config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=seed, start_ns=start, rate=40.0)
        log.extend(synthetic_raw_frames(FEED_ADVANCED, config, 20 * SECOND, connection_id=connection))
    return log


def test_lake_windows_start_at_the_connected_record_found_across_hour_partitions(tmp_path: Path) -> None:
    log = log_over_two_hours()
    write_dataset(tmp_path, "qw.md.raw", log, "feed", lambda r: 0)
    events, _ = Normaliser().process_all(log)
    write_dataset(tmp_path, "qw.md.events", events, "symbol", lambda r: 0 if r.symbol == "BTC-USD" else 1)

    end_ns = 10 * HOUR + 8 * SECOND
    window = Window(10 * HOUR + 5 * SECOND, end_ns)  # in c1, after the hour boundary
    start, total, records = lake_raw_records(str(tmp_path), "qw", window)
    expected = [r for r in log if r.connection_id == "c1" and r.ts_init < end_ns]
    assert (start.connection_id, start.offset) == ("c1", 0)
    got = [record.value for record in records]
    assert total == len(got) == len(expected)
    assert got == expected

    start, total, records = lake_event_records(str(tmp_path), "qw", window)
    wanted = [e for e in events if start.ts_init <= e.ts_init < end_ns]
    got_events = list(values_of(records, MarketEvent))
    assert total == len(wanted)
    for symbol in ("BTC-USD", "ETH-USD"):
        assert [e for e in got_events if e.symbol == symbol] == [e for e in wanted if e.symbol == symbol]

    start, _, _ = lake_raw_records(str(tmp_path), "qw", Window(10 * HOUR + HOUR // 2 + 3 * SECOND, None))
    assert start.connection_id == "c2"
    with pytest.raises(ReplayError, match="no CONNECTED record"):
        lake_raw_records(str(tmp_path), "qw", Window(9 * HOUR, None))


# -- the CONNECTED search of a topic window, over logs as the ingest writes them --------------------


class ListReader(TopicReader):
    """The window search over an in-memory log (the real search code; offsets = list indexes)."""

    def __init__(self, log: list[RawFrame]) -> None:  # no consumer: nothing of the base __init__
        self.topic = "qw.md.raw"
        self.partitions = [0]
        self._log = log

    def watermarks(self, partition: int) -> tuple[int, int]:
        return 0, len(self._log)

    def offset_for_time(self, partition: int, timestamp_ms: int) -> int | None:
        return next((i for i, r in enumerate(self._log) if r.ts_init // 1_000_000 >= timestamp_ms), None)

    def read_at(self, partition: int, offset: int, high: int) -> tuple[int, LogValue] | None:
        return (offset, self._log[offset]) if offset < min(high, len(self._log)) else None

    def records(self, partition: int, start: int, end: int) -> Any:
        return (LogRecord(self._log[i], None, None, 0, i) for i in range(start, min(end, len(self._log))))


S0 = 1_786_300_000 * SECOND


def control(kind: RawKind, connection: str, ts: int) -> RawFrame:
    """A control record as the ingest writes it (CLOCK: text ``tick``)."""
    return RawFrame(
        ts_event=ts,
        ts_init=ts,
        exchange="coinbase",
        feed=FEED_ADVANCED,
        symbols=("BTC-USD",),
        connection_id=connection,
        frame_index=-1,
        kind=kind,
        text="tick" if kind == "CLOCK" else '{"reason":"test","state":"RECONNECTING"}',
    )


def session(connection: str, start: int, seconds: int = 3) -> list[RawFrame]:
    config = SyntheticConfig(symbols=("BTC-USD",), seed=3, start_ns=start, rate=40.0)
    return list(synthetic_raw_frames(FEED_ADVANCED, config, seconds * SECOND, connection_id=connection))


def reconnect_log(clock_of_pending: bool) -> list[RawFrame]:
    """c1 (3 s), its loss, a connect attempt c2 that fails, a backoff, then c3 after a 300 ms handshake.

    ``clock_of_pending``: ticks carry the connection being attempted (the ingest before the fix),
    else the last one that connected (the ingest now).
    """
    t = S0 + 3 * SECOND + 100_000_000
    log = session("c1", S0)
    log.append(control("DISCONNECTED", "c1", t))
    pending = "c2" if clock_of_pending else "c1"
    log += [control("CLOCK", pending, t + 100_000_000), control("DISCONNECTED", "c2", t + 150_000_000)]
    log += [control("CLOCK", pending, t + i * 100_000_000) for i in range(2, 10)]  # the backoff
    pending = "c3" if clock_of_pending else "c1"
    log += [control("CLOCK", pending, t + i * 100_000_000) for i in range(10, 13)]  # c3's handshake
    log += session("c3", t + 13 * 100_000_000)
    assert all(a.ts_init < b.ts_init for a, b in itertools.pairwise(log))
    return log


@pytest.mark.parametrize("clock_of_pending", [True, False], ids=["written-before-the-fix", "written-now"])
def test_a_window_finds_the_latest_connected_record_around_reconnects(clock_of_pending: bool) -> None:
    log = reconnect_log(clock_of_pending)
    reader = ListReader(log)
    c1 = 0
    c3 = next(i for i, r in enumerate(log) if r.kind == "CONNECTED" and r.connection_id == "c3")

    def start_at(index: int) -> tuple[int, str]:
        found = find_raw_start(reader, log[index].ts_init)
        return found.offset, found.connection_id

    for index in (c1, c1 + 5, c3 - 14):  # inside c1, at its last frame
        assert start_at(index) == (c1, "c1")
    disconnected = next(i for i, r in enumerate(log) if r.kind == "DISCONNECTED")
    for index in range(disconnected, c3):  # the loss, the failed attempt, the backoff, the handshake
        assert start_at(index) == (c1, "c1"), index
    for index in (c3, c3 + 1, c3 + 30, len(log) - 1):
        assert start_at(index) == (c3, "c3")
    assert find_raw_start(reader, None).offset == c1
    assert find_raw_start(reader, log[0].ts_init - SECOND).offset == c1  # --from before the log


def test_clocks_ahead_of_the_first_connected_are_skipped_and_a_log_without_its_connected_is_refused() -> None:
    log = [control("CLOCK", "c1", S0 - (3 - i) * 100_000_000) for i in range(3)] + session("c1", S0)
    reader = ListReader(log)
    assert find_raw_start(reader, None).offset == 3
    assert find_raw_start(reader, log[20].ts_init).offset == 3
    with pytest.raises(ReplayError, match=r"starts \(offset 0.*with a CLOCK of connection 'c1', not CONNECTED"):
        find_raw_start(reader, log[1].ts_init)  # the handshake, before any connection in the log
    cut = ListReader(session("c1", S0)[5:] + session("c2", S0 + 5 * SECOND))  # retention cut c1's start
    with pytest.raises(ReplayError, match="of connection 'c1', not CONNECTED"):
        find_raw_start(cut, S0 + 2 * SECOND)
    assert find_raw_start(cut, S0 + 6 * SECOND).connection_id == "c2"
