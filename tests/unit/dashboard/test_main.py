"""``quotewatch run dashboard`` as a real process, with no broker at all.

A read-only UI creates no topics, so it needs neither admin rights nor a broker to start: it
serves ``/health`` at once while its consumer waits for the broker and the snapshot topic. (On
a real broker, that it creates nothing and picks its topic up once it exists:
tests/broker/dashboard/test_snapshot_consumer.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

from quotewatch.local.kafka import free_port
from tests.helpers import wait_for

# A fresh interpreter importing Dash, Plotly and confluent-kafka; well below the 30 s a topic
# creation against a missing broker takes to fail.
START_TIMEOUT = 20


def _health(url: str) -> requests.Response | None:
    try:
        return requests.get(f"{url}/health", timeout=2)
    except requests.RequestException:
        return None


def test_the_dashboard_serves_without_a_broker_and_waits_for_it(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key != "QUOTEWATCH_CONFIG_FILE"},
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nothing listens there
        "TOPIC_PREFIX": "nobroker",
        "DASH_HOST": "127.0.0.1",
        "DASH_PORT": str(port),
        "DASH_DEBUG": "false",
        "METRICS_PORT": "0",
    }
    log_path = tmp_path / "dashboard.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotewatch.cli", "run", "dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        response = wait_for(
            lambda: process.poll() is None and _health(url),
            timeout=START_TIMEOUT,
            message=f"the dashboard to serve (log: {log_path})",
        )
        assert process.poll() is None, log_path.read_text()
        body = response.json()
        assert body["topic"] == "nobroker.snapshot"
        assert body["caught_up"] is False
        assert body["snapshots_read"] == 0
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
