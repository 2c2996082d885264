"""The sink's pure parts and ``quotewatch lake info`` without a broker."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from click.testing import CliRunner

from quotewatch.cli import main
from quotewatch.core import lake
from quotewatch.core.clock import FakeClock
from quotewatch.core.config import LakeSinkSettings
from quotewatch.core.health import Liveness, StuckWatchdog
from quotewatch.core.kafka import ShutdownSignal
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.lake_sink.sink import LakeSink, _group_rows
from tests.unit.core.test_lake import T0, feature_row, write_rows


def test_a_chunk_is_split_by_directory_in_row_order_with_the_first_rows_directory_first() -> None:
    table = pa.table({"_offset": [10, 11, 12, 13, 14]})
    directories = ["symbol=B/h", "symbol=A/h", "symbol=B/h", "symbol=C/h", "symbol=A/h"]
    groups = _group_rows(table, directories, first="symbol=B/h")
    assert [(d, t["_offset"].to_pylist()) for d, t in groups] == [
        ("symbol=B/h", [10, 12]),
        ("symbol=A/h", [11, 14]),
        ("symbol=C/h", [13]),
    ]


def test_lake_info_prints_coverage_and_exits_1_on_a_hole(tmp_path: Path) -> None:
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + i, i) for i in range(3)], 0, 4)
    runner = CliRunner()
    healthy = runner.invoke(main, ["lake", "info", "--lake-uri", str(tmp_path)])
    assert healthy.exit_code == 0, healthy.output
    assert "qw.features: 3 rows in 1 files" in healthy.output
    assert "partition 0: offsets 0..4 in 1 chunks, 3 rows, complete" in healthy.output
    write_rows(tmp_path, [feature_row("BTC-USD", T0 + 9, 9)], 8, 9)
    broken = runner.invoke(main, ["lake", "info", "--lake-uri", str(tmp_path), "--json"])
    assert broken.exit_code == 1
    (dataset,) = [json.loads(line) for line in broken.output.splitlines()]
    assert dataset["partitions"][0]["holes"] == [[5, 7]]
    assert dataset["healthy"] is False
    assert lake.lake_info(str(tmp_path))[0].rows == 4


SECOND = 1_000_000_000


def test_a_loop_turn_counts_for_the_stuck_watchdog_only_while_the_sink_holds_partitions(tmp_path: Path) -> None:
    """The sink runs in the runtime's sink mode, whose session applies the rule of every stream loop
    (tests/unit/core/test_unassigned_watch.py): here with input waiting on the topics."""
    clock = FakeClock()
    liveness = Liveness("lake-sink", clock, 30)
    settings = LakeSinkSettings(kafka_bootstrap_servers="127.0.0.1:9", lake_uri=str(tmp_path))
    sink = LakeSink(
        settings=settings,
        serde=AvroSerde(),
        clock=clock,
        shutdown=ShutdownSignal(),
        liveness=liveness,
        input_probe=lambda: True,
    )
    session = sink._runner.session
    fired: list[bool] = []
    watchdog = StuckWatchdog(liveness, 60, on_stuck=lambda: fired.append(True))
    # Holding a partition (what an assignment sets up): every turn is a beat, however long it took.
    topic = TopicNames(settings.topic_prefix).features
    session.assigned.add((topic, 0))
    clock.advance(90 * SECOND)
    session.turned()
    assert liveness.stuck_seconds() == 0
    assert not watchdog.check()
    assert not watchdog.check()
    # Partitions lost and never assigned again (what a revoke or a loss leaves): the loop still
    # turns, but with input waiting that is not a sign of life, and the watchdog restarts the sink.
    session.assigned.clear()
    for _ in range(2):
        clock.advance(31 * SECOND)
        session.turned()
    assert liveness.stuck_seconds() == 62
    assert watchdog.check() is False  # suspect on the first check
    assert watchdog.check() is True
    assert fired == [True]
