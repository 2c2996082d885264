"""``quotewatch run dashboard`` as a real process, with no broker at all.

A read-only UI creates no topics, so it needs neither admin rights nor a broker to start: it
serves ``/health`` at once while its consumer waits for the broker and the snapshot topic. (On
a real broker, that it creates nothing and picks its topic up once it exists:
tests/broker/services/dashboard/test_snapshot_consumer.py.)
"""

from __future__ import annotations

from pathlib import Path

from quotewatch.local.kafka import free_port
from tests.helpers import dashboard_process, get_health, wait_for

# A fresh interpreter importing Dash, Plotly and confluent-kafka; well below the 30 s a topic
# creation against a missing broker takes to fail.
START_TIMEOUT = 20


def test_the_dashboard_serves_without_a_broker_and_waits_for_it(tmp_path: Path) -> None:
    log_path = tmp_path / "dashboard.log"
    nothing_listens = f"127.0.0.1:{free_port()}"
    with dashboard_process(nothing_listens, "nobroker", log_path) as (url, process):
        response = wait_for(
            lambda: process.poll() is None and get_health(url),
            timeout=START_TIMEOUT,
            message=f"the dashboard to serve (log: {log_path})",
        )
        assert process.poll() is None, log_path.read_text()
        body = response.json()
        assert body["topic"] == "nobroker.snapshot"
        assert body["caught_up"] is False
        assert body["snapshots_read"] == 0
