"""``capture export`` without a broker: the frames of one connection -> a capture that reads back the same.

The broker round trip (a topic's md.raw -> export -> ``feed serve --capture`` -> ingest) is in
tests/broker/services/replay/test_capture_export.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from quotewatch.core.errors import ConfigError
from quotewatch.core.records import RawFrame
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.coinbase import FEED_ADVANCED, FEED_EXCHANGE
from quotewatch.services.replay.engine import BacktestEngine
from quotewatch.services.replay.export import ExportSummary, frames_of_window, sidecar_for, write_capture
from quotewatch.services.replay.sources import RawStart, ReplayError

SECOND = 1_000_000_000


def raw_log(feed: str = FEED_ADVANCED, seconds: int = 20, connection: str = "synthetic") -> list[RawFrame]:
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=5, rate=100.0)
    return list(synthetic_raw_frames(feed, config, seconds * SECOND, connection_id=connection))


def export_to(path: Path, log: list[RawFrame]) -> ExportSummary:
    start = RawStart(0, log[0].ts_init, log[0].connection_id)
    summary = ExportSummary(path, sidecar_for(path), 0, start, None, None)
    write_capture(path, frames_of_window(log, start, summary), summary)
    return summary


@pytest.mark.parametrize("feed", [FEED_ADVANCED, FEED_EXCHANGE])
def test_the_capture_reads_back_the_frames_and_their_receive_times(tmp_path: Path, feed: str) -> None:
    log = raw_log(feed)
    summary = export_to(tmp_path / "session.jsonl.gz", log)
    frames = [r for r in log if r.kind == "FRAME"]
    assert summary.frames == len(frames)
    assert summary.skipped["CONNECTED"] == 1
    assert summary.skipped["CLOCK"] > 100
    assert summary.sidecar == tmp_path / "session.recv_ts.tsv"
    capture = read_capture(tmp_path / "session.jsonl.gz")
    assert capture.feed == feed
    assert capture.symbols == ("BTC-USD", "ETH-USD")
    assert list(capture.lines) == [r.text for r in frames]
    assert list(capture.recv_ns) == [r.ts_init for r in frames], "receive times kept to the nanosecond"
    assert not list(tmp_path.glob("*.partial"))


def test_the_exported_capture_backtests_to_the_same_ticks_features_and_labels(tmp_path: Path) -> None:
    """Only the control records (CLOCKs) are gone: the ticks, their features and labels are the same."""
    log = raw_log(seconds=30)
    export_to(tmp_path / "s.jsonl.gz", log)
    live = BacktestEngine(100, 500, keep_records=True).run_raw(log)
    exported = BacktestEngine(100, 500, keep_records=True).run_raw(read_capture(tmp_path / "s.jsonl.gz").raw_frames())

    def content(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        # Per symbol in stream order (live, CLOCK events close some ticks earlier than the next frame
        # would: the symbols' ticks interleave differently, each symbol's are the same).
        return sorted(rows, key=lambda row: row[:2])

    market = [e for e in live.events if e.kind in ("SNAPSHOT", "UPDATE", "TRADE")]
    again = [e for e in exported.events if e.kind in ("SNAPSHOT", "UPDATE", "TRADE")]
    assert content((e.symbol, e.kind, e.ts_event, e.snapshot, e.update, e.trade) for e in again) == content(
        (e.symbol, e.kind, e.ts_event, e.snapshot, e.update, e.trade) for e in market
    )
    assert len(market) > 1000
    assert content((f.symbol, f.ts_event, f.epoch, f.values) for f in exported.feature_records) == content(
        (f.symbol, f.ts_event, f.epoch, f.values) for f in live.feature_records
    )
    assert content((label.symbol, label.t_event, label.label) for label in exported.label_records) == content(
        (label.symbol, label.t_event, label.label) for label in live.label_records
    )


def test_the_gzip_is_reproducible(tmp_path: Path) -> None:
    log = raw_log(seconds=5)
    export_to(tmp_path / "a.jsonl.gz", log)
    export_to(tmp_path / "b.jsonl.gz", log)
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    export_to(tmp_path / "plain.jsonl", log)
    assert read_capture(tmp_path / "plain.jsonl").lines == read_capture(tmp_path / "a.jsonl.gz").lines


def test_a_window_spanning_two_connections_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    first = raw_log(seconds=5, connection="first")
    second = [
        replace(record, ts_init=record.ts_init + 10 * SECOND) for record in raw_log(seconds=5, connection="second")
    ]
    with pytest.raises(ReplayError, match=r"reaches into another connection \(second, CONNECTED at"):
        export_to(tmp_path / "x.jsonl.gz", first + second)
    assert list(tmp_path.iterdir()) == []


def test_an_overflow_is_reported_and_a_frame_with_a_line_break_refused(tmp_path: Path) -> None:
    log = raw_log(seconds=5)
    overflow = replace(log[50], kind="OVERFLOW", text="{}", frame_index=-1)
    summary = export_to(tmp_path / "o.jsonl.gz", [*log[:50], overflow, *log[50:]])
    assert summary.overflows == [log[50].ts_init]
    assert "OVERFLOW at" in summary.describe()
    broken = [*log[:10], replace(log[10], text='{"type":\n"x"}')]
    with pytest.raises(ReplayError, match="holds a line break"):
        export_to(tmp_path / "b.jsonl.gz", broken)


def test_the_output_must_be_named_as_a_capture(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"FILE\.jsonl\.gz or FILE\.jsonl"):
        sidecar_for(tmp_path / "capture.json")
