"""The dashboard in headless Chromium against the real broker: snapshots in, values on the page.

Each test produces Snapshot records with a real producer to its own ``<prefix>.snapshot`` topic
and waits (WebDriverWait, no sleeps) for what the page must show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from quotewatch.core.config import DashboardSettings
from quotewatch.core.kafka import make_producer
from quotewatch.core.records import MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.local.kafka import free_port
from quotewatch.services.dashboard.app import DashboardApp
from tests.helpers import get_health, stop_process, wait_for
from tests.unit.services.dashboard.factories import (
    T0_NS,
    gap_event,
    history,
    level,
    make_snapshot,
    produce_keyed,
    produce_snapshots,
    snapshot_event,
    status_event,
    update_event,
)

# Page load (first render, Chromium cold start) gets more time than a live update, which must
# show within a poll interval or two (300 ms each); the margin is for a loaded 2-core CI machine.
PAGE_TIMEOUT = 15
PROCESS_START_TIMEOUT = 60  # a fresh interpreter importing Dash, Plotly and confluent-kafka
UPDATE_TIMEOUT = 5


def displayed(dash_duo: Any, selector: str) -> bool:
    elements = dash_duo.driver.find_elements("css selector", selector)
    return bool(elements) and elements[0].is_displayed()


def text_of(dash_duo: Any, selector: str) -> str:
    return str(dash_duo.find_element(selector).text)


def wait_until_rendered(dash_duo: Any) -> None:
    """Wait for the first full render: both graphs drawn (Plotly's first load blocks the page ~1-2 s)."""
    for graph in ("#spark-p-change", "#spark-mid"):
        dash_duo.wait_for_element(f"{graph} .main-svg", timeout=PAGE_TIMEOUT)


def no_browser_errors(dash_duo: Any) -> None:
    errors = [entry for entry in dash_duo.get_logs() if "favicon" not in entry.get("message", "")]
    assert errors == [], f"browser console errors: {errors}"


def test_empty_state_then_live_values_ladder_sparklines_and_screenshot(
    dash_duo: Any,
    make_dashboard: Callable[..., DashboardApp],
    publish: Callable[..., None],
    artifacts_dir: Path,
) -> None:
    # This test is about the values; staleness has its own test. A long threshold keeps a slow,
    # loaded machine from turning the page stale while the assertions run.
    dashboard = make_dashboard(dash_stale_ms=30_000)
    dash_duo.start_server(dashboard.app)
    dash_duo.wait_for_contains_text("#empty-state", "Waiting for the first snapshot", timeout=PAGE_TIMEOUT)
    wait_until_rendered(dash_duo)
    assert text_of(dash_duo, "#status-badge") == "WAITING"
    assert not displayed(dash_duo, "#main-panel")

    # Thirty seconds of event-time history, then the snapshot under test with distinctive values.
    records = history("BTC-USD", 300)
    last = make_snapshot(
        "BTC-USD",
        ts_event=T0_NS + 300 * 100_000_000,
        bids=[level("67234.51", "0.5"), level("67234.5", "1.25"), level("67233.00000000", "2")],
        asks=[level("67234.52", "0.75"), level("67235", "3"), level("67236.1", "0.01")],
        p_change=0.734,
        challenger_p_change=0.61,
        live_metrics=[
            {
                "model_name": "lr-top3",
                "model_version": "7",
                "model_role": "CHAMPION",
                "n_labels": 1234,
                "auc": 0.6512,
                "brier": 0.1842,
                "balanced_accuracy": 0.6021,
                "base_rate": 0.31,
                "lift": -0.0214,
                "lift_low": -0.0633,
                "lift_high": 0.0125,
                "lift_rows": 1000,
                "lift_below_zero_since_ns": 1,
                "lift_flagged": True,
            }
        ],
        feed_state="SUBSCRIBED",
        updates_per_second=9.87,
        consumer_lag=3,
    )
    produced = time.monotonic()
    publish(*records, last)
    dash_duo.wait_for_text_to_equal("#kpi-p-change", "0.734", timeout=UPDATE_TIMEOUT)
    shown_after = time.monotonic() - produced

    expected = {
        "#status-badge": "LIVE",
        "#kpi-best-bid": "67,234.51",
        "#kpi-best-ask": "67,234.52",
        "#kpi-spread": "0.01",
        "#kpi-spread-bps": "0.0015 bps",
        "#kpi-challenger": "challenger 0.610",
        "#kpi-model": "lr-top3 v7",
        "#kpi-model-role": "CHAMPION",
        "#kpi-auc": "0.651",
        "#kpi-brier": "0.184",
        "#kpi-balanced-accuracy": "0.602",
        "#kpi-n-labels": "1,234 labels",
        "#kpi-lift": "-0.021 [-0.063, +0.013]",
        "#kpi-lift-note": "below zero for LIFT_ALARM_MS: review the champion (demote in the MLflow UI)",
        "#kpi-updates": "9.9/s",
        "#kpi-feed-state": "SUBSCRIBED",
        "#kpi-consumer-lag": "3",
    }
    assert {selector: text_of(dash_duo, selector) for selector in expected} == expected
    assert not displayed(dash_duo, "#empty-state")
    assert not displayed(dash_duo, "#stale-indicator")
    assert "rgb(" in (dash_duo.find_element("#card-p-change").get_attribute("style") or "")
    assert dash_duo.find_element("#card-lift").get_attribute("class") == "card flagged"
    # Read in one script: the rows are re-rendered every poll, element handles would go stale.
    rows = dash_duo.driver.execute_script(
        "return Array.from(document.querySelectorAll('#ladder-body tr'))"
        ".map(row => Array.from(row.cells).map(cell => cell.textContent))"
    )
    assert rows == [
        ["0.5", "67,234.51", "67,234.52", "0.75"],
        ["1.25", "67,234.50", "67,235.00", "3"],
        ["2", "67,233.00", "67,236.10", "0.01"],
    ]
    assert "301 snapshots read" in text_of(dash_duo, "#footer-status")
    # Both sparklines drew a line through the history (301 points each).
    for graph in ("#spark-p-change", "#spark-mid"):
        dash_duo.wait_for_element(f"{graph} .scatterlayer .trace path.js-line", timeout=UPDATE_TIMEOUT)

    screenshot = artifacts_dir / "dashboard-populated.png"
    assert dash_duo.driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 20_000
    print(f"value visible {shown_after * 1000:.0f} ms after the produce call; screenshot {screenshot}")
    no_browser_errors(dash_duo)


def test_empty_state_says_why_it_waits_stage_by_stage(
    dash_duo: Any,
    dashboard: DashboardApp,
    dashboard_settings: DashboardSettings,
    publish: Callable[..., None],
) -> None:
    """Records of each pipeline stage on the real topics move the reason on, until a snapshot shows."""
    names = TopicNames(dashboard_settings.topic_prefix)
    producer = make_producer(dashboard_settings, "test-pipeline-producer")
    serde = AvroSerde()

    def events(*records: MarketEvent) -> None:
        produce_keyed(producer, serde, names.md_events, records)

    dash_duo.start_server(dashboard.app)
    dash_duo.wait_for_contains_text("#empty-state", "Waiting for the first snapshot", timeout=PAGE_TIMEOUT)
    dash_duo.wait_for_contains_text("#empty-reasons", f"Nothing on {names.md_raw} yet", timeout=PAGE_TIMEOUT)

    t0 = T0_NS
    events(status_event("CONNECTING", t0), gap_event("RECONNECT", t0, "connection c1 opened"))
    dash_duo.wait_for_contains_text("#empty-reasons", "BTC-USD: feed not subscribed (CONNECTING)", UPDATE_TIMEOUT)
    # A configured symbol with no record yet is listed too.
    assert f"ETH-USD: no market event on {names.md_events} yet" in text_of(dash_duo, "#empty-reasons")

    events(status_event("SUBSCRIBED", t0 + 10_000_000, "level2"))
    dash_duo.wait_for_contains_text("#empty-reasons", "BTC-USD: no book snapshot yet (feed subscribed)", UPDATE_TIMEOUT)

    events(snapshot_event(t0 + 120_000_000), update_event(t0 + 180_000_000))
    dash_duo.wait_for_contains_text("#empty-reasons", "BTC-USD: no tick closed yet", UPDATE_TIMEOUT)

    events(gap_event("SEQUENCE_JUMP", t0 + 190_000_000, "sequence_num 161 -> 163"))
    dash_duo.wait_for_contains_text("#empty-reasons", "BTC-USD: book not synced since a gap", UPDATE_TIMEOUT)

    events(snapshot_event(t0 + 300_000_000), update_event(t0 + 450_000_000))
    dash_duo.wait_for_contains_text("#empty-reasons", "is the book running?", UPDATE_TIMEOUT)
    assert text_of(dash_duo, "#status-badge") == "WAITING"

    publish(make_snapshot("BTC-USD", ts_event=t0 + 400_000_000, p_change=0.42))
    dash_duo.wait_for_text_to_equal("#kpi-p-change", "0.420", timeout=UPDATE_TIMEOUT)
    assert not displayed(dash_duo, "#empty-state")
    # With a snapshot there is nothing to explain: the probe closes its consumer and ends.
    probe = dashboard.runtime.get().probe
    wait_for(lambda: not probe.alive, timeout=UPDATE_TIMEOUT, message="the upstream probe stopped")
    assert dashboard.runtime.get().feed().waiting == ()
    producer.flush(10)
    no_browser_errors(dash_duo)


def test_stale_indicator_after_the_feed_stops_and_recovery(
    dash_duo: Any,
    dashboard: DashboardApp,
    dashboard_settings: DashboardSettings,
    publish: Callable[..., None],
) -> None:
    dash_duo.start_server(dashboard.app)
    dash_duo.wait_for_contains_text("#empty-state", "Waiting for the first snapshot", timeout=PAGE_TIMEOUT)
    wait_until_rendered(dash_duo)

    produced = time.monotonic()
    publish(make_snapshot("BTC-USD", p_change=0.123))
    dash_duo.wait_for_text_to_equal("#kpi-p-change", "0.123", timeout=UPDATE_TIMEOUT)
    assert text_of(dash_duo, "#status-badge") == "LIVE"
    assert not displayed(dash_duo, "#stale-indicator")

    # Nothing else is produced: once DASH_STALE_MS has passed, the page says so.
    dash_duo.wait_for_contains_text(
        "#stale-indicator", "STALE", timeout=dashboard_settings.dash_stale_ms / 1000 + UPDATE_TIMEOUT
    )
    stale_after = time.monotonic() - produced
    assert stale_after >= dashboard_settings.dash_stale_ms / 1000
    assert text_of(dash_duo, "#status-badge") == "STALE"
    assert "no snapshot for BTC-USD" in text_of(dash_duo, "#stale-indicator")
    assert "stale" in (dash_duo.find_element("#main-panel").get_attribute("class") or "")
    assert text_of(dash_duo, "#kpi-p-change") == "0.123"  # the last values stay visible, dimmed

    publish(make_snapshot("BTC-USD", ts_event=T0_NS + 10**9, p_change=0.456))
    dash_duo.wait_for_text_to_equal("#kpi-p-change", "0.456", timeout=UPDATE_TIMEOUT)
    wait_for(lambda: not displayed(dash_duo, "#stale-indicator"), timeout=UPDATE_TIMEOUT, message="stale cleared")
    assert text_of(dash_duo, "#status-badge") == "LIVE"
    no_browser_errors(dash_duo)


def test_two_symbols_selector_switches(
    dash_duo: Any,
    dashboard: DashboardApp,
    publish: Callable[..., None],
) -> None:
    publish(
        make_snapshot("BTC-USD", bids=[level("67234.51", "1")], asks=[level("67234.52", "1")], p_change=0.111),
        make_snapshot(
            "ETH-USD",
            bids=[level("3456.78", "2")],
            asks=[level("3456.79", "4")],
            p_change=0.222,
            model=None,
        ),
    )
    dash_duo.start_server(dashboard.app)
    # The first configured symbol is selected by default; the selector shows with two symbols.
    dash_duo.wait_for_text_to_equal("#kpi-best-bid", "67,234.51", timeout=PAGE_TIMEOUT)
    wait_for(lambda: displayed(dash_duo, "#selector-wrap"), timeout=UPDATE_TIMEOUT, message="selector shown")

    dash_duo.select_dcc_dropdown("#symbol-select", "ETH-USD")
    dash_duo.wait_for_text_to_equal("#kpi-best-bid", "3,456.78", timeout=UPDATE_TIMEOUT)
    assert text_of(dash_duo, "#kpi-p-change") == "0.222"
    assert text_of(dash_duo, "#kpi-model") == "no model yet"
    assert text_of(dash_duo, "#kpi-n-labels") == "no labels yet"
    assert "ETH-USD" in text_of(dash_duo, "#snapshot-time")

    # The choice survives the polls: a new ETH-USD snapshot updates the ETH-USD page.
    publish(make_snapshot("ETH-USD", ts_event=T0_NS + 10**9, bids=[level("3457", "2")], asks=[level("3457.01", "1")]))
    dash_duo.wait_for_text_to_equal("#kpi-best-bid", "3,457.00", timeout=UPDATE_TIMEOUT)

    dash_duo.select_dcc_dropdown("#symbol-select", "BTC-USD")
    dash_duo.wait_for_text_to_equal("#kpi-best-bid", "67,234.51", timeout=UPDATE_TIMEOUT)
    assert text_of(dash_duo, "#kpi-p-change") == "0.111"
    no_browser_errors(dash_duo)


def test_push_mode_over_websocket_values_selector_and_stale(
    dash_duo: Any,
    push_dashboard: DashboardApp,
    dashboard_settings: DashboardSettings,
    publish: Callable[..., None],
) -> None:
    assert push_dashboard.push
    dash_duo.start_server(push_dashboard.app)
    dash_duo.wait_for_contains_text("#empty-state", "Waiting for the first snapshot", timeout=PAGE_TIMEOUT)
    wait_until_rendered(dash_duo)

    produced = time.monotonic()
    publish(
        make_snapshot("BTC-USD", bids=[level("67234.51", "1")], asks=[level("67234.52", "1")], p_change=0.777),
        make_snapshot("ETH-USD", bids=[level("3456.78", "2")], asks=[level("3456.79", "4")], p_change=0.222),
    )
    dash_duo.wait_for_text_to_equal("#kpi-p-change", "0.777", timeout=UPDATE_TIMEOUT)
    assert text_of(dash_duo, "#kpi-best-bid") == "67,234.51"
    wait_for(lambda: displayed(dash_duo, "#selector-wrap"), timeout=UPDATE_TIMEOUT, message="selector shown")

    dash_duo.select_dcc_dropdown("#symbol-select", "ETH-USD")
    dash_duo.wait_for_text_to_equal("#kpi-best-bid", "3,456.78", timeout=UPDATE_TIMEOUT)
    assert text_of(dash_duo, "#kpi-p-change") == "0.222"

    # With nothing produced the push loop still refreshes the age: the stale indicator appears.
    dash_duo.wait_for_contains_text(
        "#stale-indicator", "no snapshot for ETH-USD", timeout=dashboard_settings.dash_stale_ms / 1000 + UPDATE_TIMEOUT
    )
    assert time.monotonic() - produced >= dashboard_settings.dash_stale_ms / 1000
    publish(make_snapshot("ETH-USD", ts_event=T0_NS + 10**9, bids=[level("3457", "2")], asks=[level("3457.01", "1")]))
    dash_duo.wait_for_text_to_equal("#kpi-best-bid", "3,457.00", timeout=UPDATE_TIMEOUT)
    dash_duo.wait_for_text_to_equal("#status-badge", "LIVE", timeout=UPDATE_TIMEOUT)
    no_browser_errors(dash_duo)


@pytest.fixture
def start_dashboard_process(
    dashboard_settings: DashboardSettings, tmp_path: Path
) -> Iterator[Callable[[bool], tuple[str, subprocess.Popen[bytes]]]]:
    """Starts ``quotewatch run dashboard`` as a real process on a free port: (push) -> (url, process)."""
    started: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "dashboard.log").open("wb")

    def start(push: bool = False) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": dashboard_settings.kafka_bootstrap_servers,
            "TOPIC_PREFIX": dashboard_settings.topic_prefix,
            "DASH_HOST": "127.0.0.1",
            "DASH_PORT": str(port),
            "DASH_DEBUG": "false",
            "DASH_PUSH": "true" if push else "false",
            # The backlog record is 60 s old, so it is stale under any threshold below that. The
            # live one must stay LIVE while a loaded machine (CI: browser, broker and this process
            # on 2 cores) takes seconds to produce, fetch and render it: with the 2 s default a
            # CI run saw 0.654 rendered already STALE.
            "DASH_STALE_MS": "30000",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "quotewatch.cli", "run", "dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        started.append(process)
        return f"http://127.0.0.1:{port}", process

    try:
        yield start
    finally:
        for process in started:
            stop_process(process)
        log.close()


@pytest.mark.parametrize("push", [False, True], ids=["waitress-polling", "uvicorn-push"])
def test_production_server_shows_the_compacted_backlog_as_stale_then_live(
    push: bool,
    dash_br: Any,
    dashboard_settings: DashboardSettings,
    snapshot_topic: str,
    publish: Callable[..., None],
    start_dashboard_process: Callable[[bool], tuple[str, subprocess.Popen[bytes]]],
) -> None:
    # Written a minute ago, before the dashboard started: read from the beginning, shown stale.
    produce_snapshots(
        make_producer(dashboard_settings, "test-backlog-producer"),
        AvroSerde(),
        snapshot_topic,
        [make_snapshot("BTC-USD", p_change=0.321)],
        timestamp_ms=time.time_ns() // 1_000_000 - 60_000,
    )
    url, process = start_dashboard_process(push)
    health = wait_for(
        lambda: get_health(url), timeout=PROCESS_START_TIMEOUT, message="dashboard process answers /health"
    )
    assert health.headers["Server"] == "quotewatch-dashboard"  # waitress or uvicorn, not a development server

    dash_br.server_url = url
    dash_br.wait_for_text_to_equal("#kpi-p-change", "0.321", timeout=PAGE_TIMEOUT)
    dash_br.wait_for_contains_text("#stale-indicator", "STALE", timeout=UPDATE_TIMEOUT)

    publish(make_snapshot("BTC-USD", ts_event=T0_NS + 10**9, p_change=0.654))
    dash_br.wait_for_text_to_equal("#kpi-p-change", "0.654", timeout=UPDATE_TIMEOUT)
    dash_br.wait_for_text_to_equal("#status-badge", "LIVE", timeout=UPDATE_TIMEOUT)

    response = requests.get(f"{url}/health", timeout=5)
    body = response.json()
    assert response.status_code == 200, body
    assert body["healthy"] is True
    assert body["snapshots_read"] == 2
    assert body["positions"] == {f"{snapshot_topic}[0]": 2}
    assert body["symbols"] == ["BTC-USD"]
    assert "quotewatch_records_in_total" in requests.get(f"{url}/metrics", timeout=5).text

    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
