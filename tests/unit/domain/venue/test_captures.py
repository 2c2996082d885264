"""The capture reader: sidecars, receive times, feed detection, errors."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from quotewatch.domain.venue.captures import CaptureError, capture_files, read_capture
from tests.helpers import shared_data_dir


def _write(tmp_path: Path, name: str, lines: list[str], sidecar: str) -> Path:
    path = tmp_path / name
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    stem = name.removesuffix(".gz").removesuffix(".jsonl")
    (tmp_path / f"{stem}.recv_ts.tsv").write_text(sidecar)
    return path


def test_receive_times_are_exact_and_made_strictly_increasing(tmp_path: Path) -> None:
    lines = ['{"type":"heartbeat","product_id":"BTC-USD","time":"2021-04-17T16:43:37Z"}'] * 3
    path = _write(
        tmp_path,
        "x.jsonl.gz",
        lines,
        "line\tlocal_recv_unix_ts\n1\t1618677817.0618958\n2\t1618677817.0618958\n3\t1618677817\n",
    )
    capture = read_capture(path)
    assert capture.recv_ns == (1_618_677_817_061_895_800, 1_618_677_817_061_895_801, 1_618_677_817_061_895_802)
    assert capture.feed == "coinbase-exchange"
    assert capture.symbols == ("BTC-USD",)
    raws = list(capture.raw_frames(disconnect=True))
    assert [r.kind for r in raws] == ["CONNECTED", "FRAME", "FRAME", "FRAME", "DISCONNECTED"]
    assert [r.frame_index for r in raws] == [-1, 0, 1, 2, -1]
    assert all(a.ts_init < b.ts_init for a, b in itertools.pairwise(raws))
    assert raws[1].text == lines[0]
    assert {r.connection_id for r in raws} == {"capture:x"}


def test_misaligned_or_missing_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "y.jsonl", ['{"channel":"heartbeats"}'] * 2, "line\tlocal_recv_unix_ts\n1\t1.0\n")
    with pytest.raises(CaptureError, match="1 sidecar rows for 2 capture lines"):
        read_capture(path)
    (tmp_path / "z.jsonl").write_text("{}\n")
    with pytest.raises(CaptureError, match="no sidecar"):
        read_capture(tmp_path / "z.jsonl")
    with pytest.raises(CaptureError, match="not a capture"):
        read_capture(tmp_path / "y.recv_ts.tsv")


def test_a_capture_of_garbage_says_it_has_no_protocol(tmp_path: Path) -> None:
    path = _write(tmp_path, "g.jsonl", ["not json", "[1]"], "line\tlocal_recv_unix_ts\n1\t1\n2\t2\n")
    with pytest.raises(CaptureError, match="which Coinbase protocol"):
        read_capture(path)


def test_the_2018_mongo_sidecar_gives_second_resolution_receive_times() -> None:
    path = next(p for p in capture_files(shared_data_dir()) if p.name.startswith("exchange_level2_BTC-USD_2018"))
    capture = read_capture(path)
    assert capture.recv_ns[0] == 1_523_926_501_000_000_000
    assert all(a < b for a, b in itertools.pairwise(capture.recv_ns))
    assert capture.recv_ns[-1] // 1_000_000_000 in range(1_523_927_100, 1_523_927_101)
