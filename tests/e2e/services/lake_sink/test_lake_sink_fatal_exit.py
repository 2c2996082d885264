"""A FatalError ends a real ``quotewatch run lake-sink`` process with a non-zero exit, committing nothing.

The error contract of the consumer runtime (core/errors.py): a fatal error is never dead-lettered
nor retried; the process exits non-zero and its supervisor restarts it. The fatal case here is the
sink's own: the group's committed offset lies past the log's end (as after a topic was deleted and
created again), so the first record delivered is below the start position, and writing it would
give the lake a second file for offsets it already holds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config
from quotewatch.core.records import BookLevel, BookTop
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from tests.e2e.services.lake_sink.test_lake_sink_crash import files_in, sink_environment
from tests.helpers import read_topic


def book_top(t: int) -> BookTop:
    return BookTop(
        ts_event=t,
        ts_init=t,
        exchange="coinbase",
        symbol="BTC-USD",
        tick_ms=100,
        epoch=1,
        bids=(BookLevel(price_e8=100, size_e8=1),),
        asks=(BookLevel(price_e8=101, size_e8=1),),
    )


def test_a_fatal_error_ends_the_service_process_with_a_non_zero_exit(topics: CommonSettings, tmp_path: Path) -> None:
    names = TopicNames(topics.topic_prefix)
    producer = Producer({"bootstrap.servers": topics.kafka_bootstrap_servers})
    serde = AvroSerde()
    for t in range(3):
        producer.produce(names.book_top3, key=b"BTC-USD", value=serde.encode(names.book_top3, book_top(t)), partition=0)
    assert producer.flush(10) == 0
    group = f"{topics.topic_prefix}.lake-sink"
    committer = Consumer(consumer_config(topics, group, "test-committer"))
    committer.commit(offsets=[TopicPartition(names.book_top3, 0, 50)], asynchronous=False)
    committer.close()

    lake, log = tmp_path / "lake", tmp_path / "sink.log"
    env: dict[str, Any] = sink_environment(topics, lake, metrics_port=0)
    env["STUCK_EXIT_SECONDS"] = "0"  # the exit must be the error's, not the watchdog's
    with log.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "quotewatch.cli", "run", "lake-sink"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=180,
            check=False,
        )
    output = log.read_text()
    assert done.returncode == 1, output[-4000:]
    assert "error: " in output, output[-4000:]
    assert "was the topic re-created?" in output, output[-4000:]
    assert files_in(lake) == 0, "nothing is written past a fatal error"
    assert read_topic(topics, names.dlq, timeout=2) == [], "a fatal error is not dead-lettered"
    checker = Consumer(consumer_config(topics, group, "test-checker"))
    try:
        (committed,) = checker.committed([TopicPartition(names.book_top3, 0)], timeout=10)
    finally:
        checker.close()
    assert committed.offset == 50, "the fatal error committed an offset"
