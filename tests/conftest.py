"""Shared fixtures of the test tiers.

Tiers by folder, each marked automatically: ``unit`` (no broker), ``broker`` (a real Kafka),
``e2e`` (several services as real processes), ``browser`` (Dash in headless Chromium),
``faults`` (the fault suite: a subset in ``make test``, all of it in ``make faults``).

The session broker is, in order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; a testcontainers Redpanda
if a Docker engine answers; else the project's local Apache Kafka (KRaft) on a free port, in a
temporary data directory, stopped at the end of the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.config import CommonSettings

TIERS = ("unit", "broker", "e2e", "browser", "faults")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.fspath)).relative_to(root).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@dataclass(frozen=True)
class BrokerInfo:
    bootstrap_servers: str
    kind: str


_BROKER: BrokerInfo | None = None


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - any failure means no usable engine
        return False
    return True


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerInfo]:
    """A real Kafka-compatible broker for the whole session."""
    global _BROKER
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        _BROKER = BrokerInfo(env, f"external broker at {env} (KAFKA_BOOTSTRAP_SERVERS)")
        yield _BROKER
        return
    if _docker_engine_answers():
        from testcontainers.kafka import RedpandaContainer

        with RedpandaContainer("docker.redpanda.com/redpandadata/redpanda:v25.2.10") as container:
            _BROKER = BrokerInfo(container.get_bootstrap_server(), "testcontainers Redpanda")
            yield _BROKER
        return
    from quotewatch.local.kafka import KAFKA_VERSION, LocalKafka, free_port

    local = LocalKafka(tmp_path_factory.mktemp("kafka"))
    state = local.start(port=free_port())
    _BROKER = BrokerInfo(
        state.bootstrap_servers, f"local Apache Kafka {KAFKA_VERSION} (KRaft) at {state.bootstrap_servers}"
    )
    try:
        yield _BROKER
    finally:
        local.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _BROKER is not None:
        passed = [
            r
            for r in terminalreporter.stats.get("passed", [])
            if "tests/broker" in r.nodeid or "tests/e2e" in r.nodeid or "tests/browser" in r.nodeid
        ]
        terminalreporter.write_line(f"broker-backed tests: {len(passed)} passed against a real broker: {_BROKER.kind}")


@pytest.fixture
def topic_prefix() -> str:
    """A fresh topic namespace per test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(broker: BrokerInfo, topic_prefix: str) -> Callable[..., Any]:
    """Build any settings class pointed at the session broker and this test's prefix."""

    def build(cls: type[CommonSettings] = CommonSettings, **overrides: Any) -> Any:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "topic_prefix": topic_prefix,
            "metrics_port": 0,
        }
        values.update(overrides)
        return cls(**values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., CommonSettings]) -> CommonSettings:
    return make_settings()


@pytest.fixture
def topics(settings: CommonSettings) -> CommonSettings:
    """The catalog's topics created in this test's namespace; returns the settings."""
    from quotewatch.core.kafka import ensure_topics, make_admin

    ensure_topics(make_admin(settings), settings.topic_prefix)
    return settings


@pytest.fixture
def group_id() -> str:
    """A fresh consumer group per test."""
    return f"g{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class MlflowServerInfo:
    tracking_uri: str
    artifacts_dir: Path
    """Where the server stores artifacts (a test may corrupt one there on purpose)."""
    data_dir: Path
    pid: int


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServerInfo]:
    """A real ``mlflow server`` (SQLite, served local artifacts, one worker) for the whole session.

    Started once on a free port in a temporary directory (~10-20 s), stopped at the end with every
    process it started. Tests keep apart by registering their own model names.
    """
    from quotewatch.local.kafka import free_port
    from quotewatch.local.mlflow import LocalMlflow

    local = LocalMlflow(tmp_path_factory.mktemp("mlflow"))
    state = local.start(port=free_port(), timeout=180)
    try:
        yield MlflowServerInfo(state.tracking_uri, state.artifacts_dir, local.data_dir, state.pid or 0)
    finally:
        local.stop()


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis: deterministic in CI, no example database written into the repo.
    from hypothesis import settings as hypothesis_settings

    hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None)
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
