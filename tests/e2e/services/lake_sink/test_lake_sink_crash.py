"""``quotewatch run lake-sink`` as a real process, SIGKILLed mid-stream twice: no offset lost or written twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quotewatch.core.config import CommonSettings
from quotewatch.core.topics import TopicNames
from quotewatch.local.kafka import free_port
from tests.helpers import wait_for
from tests.unit.services.lake_sink.factories import (
    ProducedRecord,
    assert_lake_holds_exactly,
    capture_records,
    committed_everything,
    produce_records,
    rows_in_lake,
)

SUFFIXES = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")


def sink_environment(settings: CommonSettings, lake: Path, metrics_port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LAKE_", "TOPIC_PREFIX"))}
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "TOPIC_PREFIX": settings.topic_prefix,
            "LAKE_URI": str(lake),
            "LAKE_FLUSH_BYTES": "24000",  # many small chunks: a kill lands among writes and commits
            "LAKE_FLUSH_SECONDS": "0.3",
            "METRICS_PORT": str(metrics_port),
            "LOG_LEVEL": "INFO",
        }
    )
    return env


@contextmanager
def sink_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotewatch.cli", "run", "lake-sink"], env=env, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def files_in(lake: Path) -> int:
    return sum(1 for _ in lake.rglob("*.parquet")) if lake.exists() else 0


def running_and(process: subprocess.Popen[bytes], log: Path, condition: Any) -> Any:
    """``condition()``, but fail at once with the log's tail when the sink process has died."""
    if process.poll() is not None:
        raise AssertionError(f"the sink exited with {process.returncode}:\n{log.read_text()[-4000:]}")
    return condition()


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return dict(json.loads(response.read()))
    except OSError:
        return {}


def halves(records: dict[str, tuple[Any, ...]]) -> tuple[dict[str, Any], dict[str, Any]]:
    first = {suffix: values[: len(values) // 2] for suffix, values in records.items()}
    second = {suffix: values[len(values) // 2 :] for suffix, values in records.items()}
    return first, second


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(topics: CommonSettings, tmp_path: Path) -> None:
    settings = topics
    names = TopicNames(settings.topic_prefix)
    lake = tmp_path / "lake"
    log = tmp_path / "lake-sink.log"
    port = free_port()
    env = sink_environment(settings, lake, port)
    early, late = halves(capture_records(800))
    produced: list[ProducedRecord] = produce_records(settings, early, transaction_size=250)
    lake_topics = [f"{names.prefix}.{suffix}" for suffix in SUFFIXES]

    # 1st run: killed with SIGKILL once it has written some files, long before the end.
    with sink_process(env, log) as first:
        wait_for(lambda: files_in(lake) >= 25, timeout=60, interval=0.2, message="25 files from the first run")
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    at_first_kill = rows_in_lake(lake, lake_topics)
    assert 0 < at_first_kill < len(produced), "the kill landed mid-stream"

    # More input arrives while the sink is down; 2nd run, killed again mid-stream.
    produced += produce_records(settings, late, transaction_size=250)
    with sink_process(env, log) as second:
        after_first = files_in(lake)
        wait_for(
            lambda: files_in(lake) >= after_first + 30, timeout=60, interval=0.2, message="files from the second run"
        )
        second.send_signal(signal.SIGKILL)
        assert second.wait(30) == -signal.SIGKILL
    assert rows_in_lake(lake, lake_topics) < len(produced), "the second kill landed mid-stream"

    # 3rd run: catches up, reports healthy, stops cleanly on SIGTERM.
    with sink_process(env, log) as third:
        wait_for(
            lambda: running_and(third, log, lambda: committed_everything(settings, produced)),
            timeout=120,
            interval=0.3,
            message="every record",
        )
        status = wait_for(lambda: (h := health(port)) and h.get("healthy") and h, message="a healthy /health")
        assert status["records_processed"] > 0
        third.send_signal(signal.SIGTERM)
        assert third.wait(60) == 0, log.read_text()[-3000:]

    assert_lake_holds_exactly(lake, produced)
    report = subprocess.run(
        [sys.executable, "-m", "quotewatch.cli", "lake", "info", "--lake-uri", str(lake), "--json"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    datasets = {d["topic"]: d for d in map(json.loads, report.stdout.splitlines())}
    assert sorted(datasets) == sorted(lake_topics)
    for topic, dataset in datasets.items():
        mine = [r for r in produced if r.topic == topic]
        assert dataset["healthy"]
        assert dataset["rows"] == len(mine)
        last = {r.partition: r.offset for r in mine}
        assert [
            (p["partition"], p["first_offset"], p["last_offset"], p["holes"], p["overlaps"])
            for p in dataset["partitions"]
        ] == [(partition, 0, last[partition], [], []) for partition in sorted(last)]
        assert dataset["incomplete_chunks"] == []
    text = subprocess.run(
        [sys.executable, "-m", "quotewatch.cli", "lake", "info", "--lake-uri", str(lake)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    ).stdout
    assert f"{names.features}: " in text
    assert "complete" in text
    assert "INCOMPLETE" not in text
    print(  # for the record: which repairs the kills caused
        "recoveries:",
        {
            "skipped complete chunks": log.read_text().count("skipping a chunk written before a crash"),
            "rewritten incomplete chunks": log.read_text().count("rewriting a chunk a crash left incomplete"),
        },
    )
