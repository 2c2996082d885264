"""The issue's done-when, as real processes: ``quotewatch feed serve --synthetic`` + ``quotewatch run ingest``
with COINBASE_WS_URL pointing at it fill ``md.raw`` and ``md.events``, visible with ``quotewatch topics tail``.

Also: the ingest's /metrics and /health endpoints, and a clean exit on SIGTERM (drain, flush, code 0).
"""

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
from tests.helpers import read_topic, wait_for

QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as output:
        proc = subprocess.Popen([QUOTEWATCH, *args], env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def tail(settings: CommonSettings, topic: str, count: int) -> list[dict[str, Any]]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers}
    result = subprocess.run(
        [QUOTEWATCH, "topics", "tail", topic, "--from-beginning", "-n", str(count)],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_feed_serve_synthetic_and_run_ingest_fill_raw_and_events(make_settings: Any, tmp_path: Path) -> None:
    settings: CommonSettings = make_settings()
    names = TopicNames(settings.topic_prefix)
    feed_port, metrics_port = free_port(), free_port()
    feed_args = [
        "feed",
        "serve",
        "--synthetic",
        "--port",
        str(feed_port),
        "--symbols",
        "BTC-USD,ETH-USD",
        "--rate",
        "300",
    ]
    ingest_env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": settings.topic_prefix,
        "COINBASE_WS_URL": f"ws://127.0.0.1:{feed_port}",
        "SYMBOLS": "BTC-USD,ETH-USD",
        "METRICS_PORT": str(metrics_port),
    }
    with (
        process(feed_args, {}, tmp_path / "feed.log") as feed,
        process(["run", "ingest"], ingest_env, tmp_path / "ingest.log") as ingest,
    ):
        health = f"http://127.0.0.1:{metrics_port}/health"
        wait_for(lambda: _quiet_get(health) == 200, timeout=30, interval=0.2, message="the ingest's /health")
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(
            lambda: 'quotewatch_feed_state{service="ingest",state="SUBSCRIBED"} 1.0' in http_get(metrics)[1],
            timeout=30,
            message="the feed state SUBSCRIBED in /metrics",
        )
        raw = wait_for(lambda: (r := tail(settings, names.md_raw, 40)) and len(r) >= 40 and r, timeout=30)
        # md.events is keyed by symbol: read every partition to its end (a tail of the first N records
        # may come from one partition only), until both products have events.
        events = wait_for(
            lambda: (
                (r := read_topic(settings, names.md_events, timeout=10))
                and len(r) >= 400
                and {e["symbol"] for e in r} >= {"BTC-USD", "ETH-USD"}
                and r
            ),
            timeout=60,
            message="400 events of both products on md.events",
        )
        ingest.send_signal(signal.SIGTERM)
        assert ingest.wait(60) == 0, (tmp_path / "ingest.log").read_text()[-3000:]
        feed.send_signal(signal.SIGTERM)
        assert feed.wait(30) == 0, (tmp_path / "feed.log").read_text()[-3000:]
    assert raw[0]["kind"] == "CONNECTED"
    assert raw[0]["feed"] == "coinbase-advanced"
    assert {"FRAME", "CLOCK"} <= {r["kind"] for r in raw}
    assert all(r["_kafka"]["key"] == "coinbase-advanced" for r in raw)
    kinds = {e["kind"] for e in events}
    assert {"STATUS", "GAP", "SNAPSHOT", "UPDATE"} <= kinds
    assert {e["symbol"] for e in events} == {"BTC-USD", "ETH-USD"}
    # The stop is in the log: the last raw record is the DISCONNECTED of the SIGTERM.
    last = tail(settings, names.md_raw, 100_000)[-1]
    assert last["kind"] == "DISCONNECTED"
    assert json.loads(last["text"])["state"] == "STOPPED"


def _quiet_get(url: str) -> int | None:
    try:
        return http_get(url)[0]
    except OSError:
        return None
