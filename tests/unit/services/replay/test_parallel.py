"""Parallel backtests (``--workers N``, ``--dask-scheduler``): symbol-day partitions whose union is the serial run.

The input is a lake holding a raw log across a UTC midnight (three symbols, three connections: one
before the window, one spanning midnight, one after it) and the events normalised from it. The
serial run (``run_backtest`` as it always ran), two local worker processes and a Dask
``LocalCluster`` of two worker processes must give the same record files, the same metrics.json
(scores, baseline fit, counts) and the same scores row for row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from quotewatch.cli import main
from quotewatch.core.config import BacktestSettings
from quotewatch.core.records import Label, MarketEvent, RawFrame
from quotewatch.domain.ml.registry import LoadedModel
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.replay.backtest import RECORD_FILES, BacktestResult, read_records, run_backtest
from quotewatch.services.replay.engine import input_lookahead_ns
from quotewatch.services.replay.parallel import DAY_NS, _run_once, plan, run_partition, survey
from quotewatch.services.replay.partitions import PartitionTask
from quotewatch.services.replay.sources import SourceSpec, Window, parse_time
from tests.unit.services.replay.test_backtest import lr_model
from tests.unit.services.replay.test_sources import write_dataset

SECOND = 1_000_000_000
MIDNIGHT = parse_time("2026-08-10T00:00:00Z")
SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD")
QUIET = "ETH-USD"
QUIET_FROM, QUIET_TO = MIDNIGHT - SECOND // 20, MIDNIGHT + 8 * SECOND
"""In the stored events, ETH-USD is silent here: its last tick before midnight is labelled only 8 s later."""
WINDOW = Window(MIDNIGHT - 150 * SECOND, MIDNIGHT + 2 * 60 * SECOND)


def raw_log() -> list[RawFrame]:
    """c0 before the window, c1 across midnight (day 2's partitions start at it), c2 after midnight."""
    log: list[RawFrame] = []
    sessions = (("c0", -180, 40), ("c1", -90, 180), ("c2", 100, 20))
    for seed, (connection, start_s, seconds) in enumerate(sessions, start=1):
        config = SyntheticConfig(symbols=SYMBOLS, seed=seed, start_ns=MIDNIGHT + start_s * SECOND, rate=10.0)
        log.extend(synthetic_raw_frames(FEED_ADVANCED, config, seconds * SECOND, connection_id=connection))
    return log


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    raws = raw_log()
    write_dataset(root, "qw.md.raw", raws, "feed", lambda r: 0)
    events, _ = Normaliser().process_all(raws)
    stored = [e for e in events if not (e.symbol == QUIET and QUIET_FROM <= e.ts_init < QUIET_TO)]
    write_dataset(root, "qw.md.events", stored, "symbol", _symbol_partition)
    return root


def _symbol_partition(event: MarketEvent) -> int:
    return SYMBOLS.index(event.symbol)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return lr_model()


def backtest_settings(lake: Path) -> BacktestSettings:
    return BacktestSettings(lake_uri=str(lake), mlflow_tracking_uri=None, tick_ms=100, delta_ms=500)


def run(lake: Path, model: LoadedModel, out: Path, events: bool = False, **parallel: Any) -> BacktestResult:
    return run_backtest(
        backtest_settings(lake),
        SourceSpec("lake", "qw"),
        WINDOW,
        [model],
        output_dir=out / "report",
        records_dir=out / "records",
        log_mlflow=False,
        events=events,
        **parallel,
    )


def assert_same(serial: BacktestResult, other: BacktestResult, serial_dir: Path, other_dir: Path) -> None:
    """Records, metrics.json and the scores row for row."""
    for suffix in RECORD_FILES:
        expected = read_records(serial_dir / "records" / f"{suffix}.avro")
        assert expected, f"{suffix}: the serial run made records"
        assert read_records(other_dir / "records" / f"{suffix}.avro") == expected, suffix
    assert json.loads((other_dir / "report" / "metrics.json").read_text()) == json.loads(
        (serial_dir / "report" / "metrics.json").read_text()
    )
    assert serial.evaluation is not None
    assert other.evaluation is not None
    assert np.array_equal(other.evaluation.y, serial.evaluation.y)
    for name, curve in serial.evaluation.curves.items():
        assert np.array_equal(other.evaluation.curves[name], curve, equal_nan=True), name
    assert other.models[0].p.tobytes() == serial.models[0].p.tobytes()


def test_the_plan_tiles_the_window_per_symbol_and_day(lake: Path) -> None:
    settings = backtest_settings(lake)
    found = survey(settings, SourceSpec("lake", "qw"), WINDOW)
    assert found.symbols == SYMBOLS
    assert found.start is not None
    assert found.start.connection_id == "c0"
    days = ("2026-08-09", "2026-08-10")
    raw = plan(settings, WINDOW, found, events=False)
    assert [(p.symbols, p.day) for p in raw] == [(SYMBOLS, day) for day in days], "the raw log: one per day"
    partitions = plan(settings, WINDOW, found, events=True)
    assert [(p.symbols, p.day) for p in partitions] == [((symbol,), day) for symbol in sorted(SYMBOLS) for day in days]
    first, second = partitions[0], partitions[1]
    # Day 1 emits from the warm-up on (as the serial run) to midnight; day 2 from midnight to --to.
    assert (first.emit_from_ns, first.emit_to_ns) == (None, MIDNIGHT)
    assert (second.emit_from_ns, second.emit_to_ns) == (MIDNIGHT, WINDOW.end_ns)
    assert first.read_from_ns == WINDOW.start_ns
    assert second.read_from_ns is not None
    assert second.read_from_ns < MIDNIGHT
    assert first.read_limit_ns == second.read_limit_ns == WINDOW.end_ns + input_lookahead_ns(500)  # type: ignore[operator]
    assert MIDNIGHT % DAY_NS == 0
    # Input counted once: day 1 from the start, day 2 from midnight on.
    assert [(p.count_from_ns, p.count_to_ns) for p in raw] == [(None, MIDNIGHT), (MIDNIGHT, None)]


def test_local_workers_and_a_dask_cluster_give_the_serial_result_from_the_raw_log(
    lake: Path, model: LoadedModel, tmp_path: Path
) -> None:
    from distributed import LocalCluster

    serial = run(lake, model, tmp_path / "serial")
    assert serial.evaluation is not None
    assert serial.evaluation.y.size > 500
    assert serial.engine.counts.rejected_raw == 0
    assert serial.engine.counts.raw_records > 0
    workers = run(lake, model, tmp_path / "workers", workers=2)
    assert_same(serial, workers, tmp_path / "serial", tmp_path / "workers")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_dask = run(lake, model, tmp_path / "dask", dask_scheduler=cluster.scheduler_address)
    assert_same(serial, on_dask, tmp_path / "serial", tmp_path / "dask")


def test_stored_events_with_a_symbol_silent_across_midnight_give_the_serial_result(
    lake: Path, model: LoadedModel, tmp_path: Path
) -> None:
    serial = run(lake, model, tmp_path / "serial", events=True)
    workers = run(lake, model, tmp_path / "workers", events=True, workers=2)
    assert_same(serial, workers, tmp_path / "serial", tmp_path / "workers")
    # The quiet symbol's last tick before midnight is labelled only when its events resume 8 s
    # later, past the first read (Δ + 5 s): its day-1 partition reads on until it is.
    settings = backtest_settings(lake)
    day_one = next(p for p in plan(settings, WINDOW, survey(settings, SourceSpec("lake", "qw"), WINDOW), events=True)
                   if p.symbols == (QUIET,) and p.emit_to_ns == MIDNIGHT)  # fmt: skip
    task = PartitionTask(settings, SourceSpec("lake", "qw"), day_one, events=True)
    result = run_partition(task)
    assert result.runs > 1
    first_read, settled = _run_once(task, MIDNIGHT + input_lookahead_ns(500))
    assert not settled
    assert first_read.labels.t_event.size < result.labels.t_event.size, "the re-read found the day's last labels"
    serial_labels = {
        (r.symbol, r.t_event) for r in read_records(tmp_path / "serial" / "records" / "labels.avro", Label)
    }
    late = set(zip(result.labels.symbol.tolist(), result.labels.t_event.tolist(), strict=True)) - set(
        zip(first_read.labels.symbol.tolist(), first_read.labels.t_event.tolist(), strict=True)
    )
    assert late
    assert late <= serial_labels


def test_the_cli_runs_workers_and_refuses_workers_with_a_scheduler(
    lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAKE_URI", str(lake))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["backtest", "--source", "lake:qw", "--from", "2026-08-09T23:57:30Z", "--to", "2026-08-10T00:02:00Z"]
    common = ["--no-progress", "--no-mlflow"]
    serial = CliRunner().invoke(main, [*args, *common, "--output", str(tmp_path / "a")])
    assert serial.exit_code == 0, serial.output
    parallel = CliRunner().invoke(main, [*args, *common, "--workers", "2", "--output", str(tmp_path / "b")])
    assert parallel.exit_code == 0, parallel.output
    assert (tmp_path / "b" / "table.md").read_text() == (tmp_path / "a" / "table.md").read_text()
    both = CliRunner().invoke(main, [*args, *common, "--workers", "2", "--dask-scheduler", "tcp://127.0.0.1:1"])
    assert both.exit_code != 0
    assert "exclude each other" in both.output
