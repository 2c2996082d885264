"""SIGKILL a real ``quotewatch run book`` mid-stream and restart it: every tick exactly once.

The input is a recorded capture (BTC-USD, 18k updates) interleaved with a synthetic two-symbol
feed (so several partitions and epochs are involved). The first process is killed with SIGKILL
as soon as its first transaction is visible; a second process with the same instance id fences
it, replays from the restart offsets stored with the last commit, and carries on. Read with
read_committed, ``<prefix>.features`` must then equal, partition by partition and record by
record, what the pure pipeline gives for an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config, ensure_topics, make_admin
from quotewatch.core.records import MarketEvent
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from tests.broker.services.book.streams import expected_outputs, produce_events
from tests.helpers import read_topic, shared_data_dir, wait_for
from tests.records import plain
from tests.unit.services.book.market_events import synthetic_feed

QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))


@contextmanager
def book_process(settings: CommonSettings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": settings.topic_prefix,
        "METRICS_PORT": "0",
        "TICK_MS": "100",
    }
    with log.open("ab") as output:
        process = subprocess.Popen([QUOTEWATCH, "run", "book"], env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def committed_high_watermark(settings: CommonSettings, topic: str) -> int:
    """Sum of the read_committed end offsets (last stable offsets) of ``topic``."""
    consumer = Consumer(consumer_config(settings, "watermarks", "test-watermarks"))
    try:
        partitions = make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
        return sum(max(0, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]) for p in partitions)
    finally:
        consumer.close()


def interleave(first: list[MarketEvent], second: list[MarketEvent]) -> list[MarketEvent]:
    out: list[MarketEvent] = []
    ratio = max(1, len(first) // max(1, len(second)))
    rest = iter(second)
    for index, record in enumerate(first):
        out.append(record)
        if index % ratio == 0:
            out.extend(r for r in [next(rest, None)] if r is not None)
    out.extend(rest)
    return out


def test_sigkill_mid_stream_then_restart_gives_every_tick_exactly_once(make_settings: Any, tmp_path: Path) -> None:
    settings: CommonSettings = make_settings()
    names = TopicNames(settings.topic_prefix)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    capture = shared_data_dir() / "exchange_level2_BTC-USD_2018-04-17_gdax-orderbook-ml.jsonl"
    events, _ = Normaliser().process_all(read_capture(capture).raw_frames())
    events = interleave(events, synthetic_feed(5, symbols=("ETH-USD", "SOL-USD"), count=4000))
    _, vectors, _ = expected_outputs(events)
    produce_events(settings, events)

    log = tmp_path / "book.log"
    with book_process(settings, log) as first:
        wait_for(
            lambda: first.poll() is not None or committed_high_watermark(settings, names.features) > 0,
            timeout=60,
            interval=0.01,
            message="the first committed transaction of the book service",
        )
        assert first.poll() is None, log.read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    at_kill = len(read_topic(settings, names.features))
    assert 0 < at_kill < len(vectors), f"killed mid-stream ({at_kill} of {len(vectors)} ticks committed)"

    with book_process(settings, log) as second:
        wait_for(
            lambda: second.poll() is not None or len(read_topic(settings, names.features)) >= len(vectors),
            timeout=180,
            message="every tick after the restart",
        )
        assert second.poll() is None, log.read_text()
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log.read_text()

    got = read_topic(settings, names.features)
    assert len(got) == len(vectors), "every tick exactly once (read_committed)"
    for partition in sorted({r["_partition"] for r in got}):
        records = [{k: v for k, v in r.items() if not k.startswith("_")} for r in got if r["_partition"] == partition]
        symbols = {r["symbol"] for r in records}
        assert records == [plain(v) for v in vectors if v.symbol in symbols], f"partition {partition}"
    assert "rebuilding state from already-committed input" in log.read_text(), "the restart replayed from the snapshot"
