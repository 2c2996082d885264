"""The sink's pure parts and ``quotewatch lake info`` without a broker."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from click.testing import CliRunner

from quotewatch.cli import main
from quotewatch.core import lake
from quotewatch.lake_sink.sink import _group_rows
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
