"""``capture export`` round trip with the real broker: md.raw -> capture -> feed server -> ingest -> the same events.

A session of the synthetic market (Advanced Trade protocol, two symbols) is written to ``A.md.raw``
as the ingest writes it (CONNECTED, frames, CLOCKs). ``quotewatch capture export --source topic:A``
writes a window of it as a capture; ``feed serve --capture`` (the server in a thread, as fast as
it can) serves it to a real ingest writing ``B.*``. The market events of ``B.md.events`` (snapshots,
updates, trades: the content of the frames) are, per symbol and in order, those the normaliser
makes of A's frames up to ``--to``. Heartbeats, CLOCKs and GAPs are the new session's own
(another connection, another clock), and ``ts_init`` is the new receive time.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin, producer_config
from quotewatch.core.records import MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.captures import read_capture
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.feed_server.server import CaptureSource, FeedServer, serve_in_thread
from quotewatch.services.replay.sources import format_time
from tests.broker.services.ingest.test_ingest_feed_server import ingest_settings, running_ingest, values_to_end
from tests.helpers import wait_for

QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
SYMBOLS = ("BTC-USD", "ETH-USD")
SECOND = 1_000_000_000
MARKET = ("SNAPSHOT", "UPDATE", "TRADE")


def content(events: list[MarketEvent]) -> dict[str, list[tuple[Any, ...]]]:
    """Per symbol, in order: what a market event says (not when it was received or on which connection)."""
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for event in events:
        if event.kind in MARKET:
            out[event.symbol].append((event.kind, event.ts_event, event.snapshot, event.update, event.trade))
    return dict(out)


def test_export_then_serve_then_ingest_gives_the_same_events(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    source: CommonSettings = make_settings()
    ensure_topics(make_admin(source), source.topic_prefix)
    config = SyntheticConfig(symbols=SYMBOLS, seed=13, rate=150.0)
    log = list(synthetic_raw_frames(FEED_ADVANCED, config, 30 * SECOND))
    serde = AvroSerde()
    topic = TopicNames(source.topic_prefix).md_raw
    producer = Producer(producer_config(source, "export-test"))
    for record in log:
        producer.produce(topic, serde.encode(topic, record), key=record.feed.encode())
        producer.poll(0)
    assert producer.flush(60) == 0

    # The CLI, as a user runs it: a window inside the session (the export starts at its CONNECTED).
    start_ns, end_ns = config.start_ns + 10 * SECOND, config.start_ns + 20 * SECOND
    output = tmp_path / "exported.jsonl.gz"
    env = {"KAFKA_BOOTSTRAP_SERVERS": source.kafka_bootstrap_servers, "TOPIC_PREFIX": source.topic_prefix}
    done = subprocess.run(
        [QUOTEWATCH, "capture", "export", "--source", "topic", "--from", format_time(start_ns), "--to",
         format_time(end_ns), "--output", str(output)],
        env={**_base_env(), **env}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    frames = [r for r in log if r.kind == "FRAME" and r.ts_init < end_ns]
    assert f"wrote {len(frames)} frames" in done.stdout
    assert "of connection synthetic" in done.stdout
    capture = read_capture(output)
    assert list(capture.lines) == [r.text for r in frames]
    assert (tmp_path / "exported.recv_ts.tsv").is_file()

    expected = content(Normaliser().process_all([r for r in log if r.ts_init < end_ns])[0])
    assert set(expected) == set(SYMBOLS)
    server = FeedServer("advanced", CaptureSource(capture, speed=None), heartbeat_interval=0.25)
    with serve_in_thread(server) as running:
        # A long heartbeat timeout: this test is about content, and a reconnect (a stall of the busy test
        # machine) would replay the capture from its start a second time.
        target = ingest_settings(
            make_settings,
            running.url,
            "advanced",
            symbols=",".join(SYMBOLS),
            topic_prefix=f"{source.topic_prefix}-b",
            heartbeat_timeout_seconds=20.0,
        )
        events_topic = TopicNames(target.topic_prefix).md_events
        state: dict[str, Any] = {}

        def arrived() -> bool:
            try:
                state["got"] = content(values_to_end(target, events_topic, MarketEvent))
            except KafkaException:  # the topic's leader right after creation, on a busy broker
                return False
            return all(len(state["got"].get(s, [])) >= len(expected[s]) for s in SYMBOLS)

        with running_ingest(target) as service:
            wait_for(lambda: running.call(lambda: any(c.replay_finished for c in server.connections)), timeout=60)
            try:
                wait_for(arrived, timeout=90, interval=1.0, message="the served capture's events in B.md.events")
            except AssertionError as exc:
                got = state.get("got", {})
                counts = {s: (len(got.get(s, [])), len(expected[s])) for s in SYMBOLS}
                first = {
                    s: next(
                        (i for i, (a, b) in enumerate(zip(got.get(s, []), expected[s], strict=False)) if a != b), None
                    )
                    for s in SYMBOLS
                }
                raise AssertionError(f"{exc}: (got, expected) {counts}, first difference {first}") from None
    assert service.stats.connections == 1
    assert service.stats.dead_letters == 0
    assert state["got"] == expected


def _base_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith(("TOPIC_", "KAFKA_"))}
