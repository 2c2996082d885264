"""Browser tier: the dashboard in headless Debian Chromium through dash[testing] (``dash_duo``).

Chromium's flags are in :mod:`tests.browser.chromium`. ``pytest_setup_options`` is the dash
testing plugin's hook for the WebDriver options; it is optional so that a run with the plugin
disabled (``-p no:dash``) still loads this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from selenium.webdriver.chrome.options import Options

from quotewatch.core.config import DashboardSettings
from quotewatch.core.kafka import make_producer
from quotewatch.core.records import Snapshot
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.services.dashboard.app import DashboardApp, create_app
from tests.browser.chromium import chromium_options
from tests.unit.services.dashboard.factories import produce_snapshots


@pytest.hookimpl(optionalhook=True)
def pytest_setup_options() -> Options:
    """Called by the dash testing plugin when it builds ``dash_duo`` / ``dash_br``."""
    return chromium_options()


@pytest.fixture
def dashboard_settings(make_settings: Callable[..., Any], topics: Any) -> DashboardSettings:
    """Dashboard settings on the session broker, in this test's topic namespace (topics created)."""
    # DASH_STALE_MS 4 s, not the 2 s default: a record must render LIVE after the produce call
    # even when the loaded CI machine (browser, broker, dashboard on 2 cores) and the publisher's
    # fresh idempotent producer (its first send waits for a producer id) take a few seconds.
    settings: DashboardSettings = make_settings(DashboardSettings, symbols=("BTC-USD", "ETH-USD"), dash_stale_ms=4000)
    return settings


@pytest.fixture
def snapshot_topic(dashboard_settings: DashboardSettings) -> str:
    return TopicNames(dashboard_settings.topic_prefix).snapshot


@pytest.fixture
def publish(dashboard_settings: DashboardSettings, snapshot_topic: str) -> Iterator[Callable[..., None]]:
    """Produce Snapshot records to this test's snapshot topic with a real idempotent producer.

    ``publish(record, ...)`` returns once the broker acknowledged every record.
    """
    producer: Producer = make_producer(dashboard_settings, "test-snapshot-producer")
    serde = AvroSerde()

    def send(*records: Snapshot) -> None:
        produce_snapshots(producer, serde, snapshot_topic, records)

    yield send
    producer.flush(10)


@pytest.fixture
def make_dashboard(dashboard_settings: DashboardSettings) -> Iterator[Callable[..., DashboardApp]]:
    """Builds dashboard apps on this test's settings (with overrides); their consumers stop at teardown."""
    apps: list[DashboardApp] = []

    def build(**overrides: Any) -> DashboardApp:
        apps.append(create_app(dashboard_settings.model_copy(update=overrides)))
        return apps[-1]

    try:
        yield build
    finally:
        for app in apps:
            app.runtime.stop()


@pytest.fixture
def dashboard(make_dashboard: Callable[..., DashboardApp]) -> DashboardApp:
    """The dashboard app of this test (polling mode, the settings' thresholds)."""
    return make_dashboard()


@pytest.fixture
def push_dashboard(make_dashboard: Callable[..., DashboardApp]) -> DashboardApp:
    """The dashboard in push mode (DASH_PUSH: FastAPI backend, WebSocket callbacks)."""
    return make_dashboard(dash_push=True)


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots go: QUOTEWATCH_ARTIFACTS_DIR when set (CI keeps it), else the test's tmp_path."""
    root = os.environ.get("QUOTEWATCH_ARTIFACTS_DIR")
    path = Path(root) / "browser" if root else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path
