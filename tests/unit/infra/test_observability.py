"""Prometheus scrape targets, Grafana provisioning and the container healthcheck, held to the code:
targets are the services' METRICS_PORTs, every dashboard query names metrics and labels that
``quotewatch.core.metrics`` defines, and the healthcheck reads the real ``/health`` endpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from quotewatch.core import metrics
from quotewatch.core.clock import FakeClock
from quotewatch.core.config import SERVICE_SETTINGS
from quotewatch.core.health import Liveness, ObservabilityServer
from tests.unit.infra.conftest import REPO

PROMETHEUS = yaml.safe_load((REPO / "infra/prometheus/prometheus.yml").read_text())
DASHBOARD_PATH = REPO / "infra/grafana/dashboards/quotewatch.json"
DATASOURCES = yaml.safe_load((REPO / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
DASHBOARD_PROVIDERS = yaml.safe_load((REPO / "infra/grafana/provisioning/dashboards/quotewatch.yml").read_text())
STREAM_SERVICES = ("ingest", "book", "labeler", "inference", "lake-sink")
PROMQL_FUNCTIONS_AND_KEYWORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate", "time", "vector",
    "histogram_quantile", "or", "and", "unless", "on", "ignoring", "le",
}  # fmt: skip


def exported_series() -> dict[str, set[str]]:
    """Every series name the metrics of core/metrics.py export, mapped to the metric's labels."""
    series: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, kind = value._name, str(value._type)  # the metric's family name and type
        labels = set(value._labelnames)
        suffixes = {
            "counter": ("_total", "_created"),
            "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "info": ("_info",),
        }[kind]
        for suffix in suffixes:
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]]
    return queries


# -- Prometheus -------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_on_its_metrics_port(full_model: dict[str, Any]) -> None:
    targets = {
        job["job_name"]: target
        for job in PROMETHEUS["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    for service in STREAM_SERVICES:
        host, _, port = targets[service].partition(":")
        assert host == service, f"{service}: the target is the compose service name"
        assert host in full_model["services"]
        assert int(port) == SERVICE_SETTINGS[service.replace("-", "_")].model_fields["metrics_port"].default
        assert int(port) == int(full_model["services"][service]["environment"]["METRICS_PORT"])
    # The dashboard has no METRICS_PORT: it serves /metrics next to the app on DASH_PORT.
    assert targets["dashboard"] == f"dashboard:{full_model['services']['dashboard']['environment']['DASH_PORT']}"
    prometheus = full_model["services"]["prometheus"]
    assert any(mount["target"] == "/etc/prometheus/prometheus.yml" for mount in prometheus["volumes"])


# -- Grafana ----------------------------------------------------------------------------------------


def test_dashboard_is_valid_json_on_the_provisioned_datasource(full_model: dict[str, Any]) -> None:
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    assert dashboard["uid"]
    assert dashboard["title"] == "QuoteWatch"
    (datasource,) = DATASOURCES["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
    # Grafana mounts: the provider's path is where compose mounts the dashboards.
    (provider,) = DASHBOARD_PROVIDERS["providers"]
    grafana_mounts = {mount["target"]: mount["source"] for mount in full_model["services"]["grafana"]["volumes"]}
    assert grafana_mounts[provider["options"]["path"]].endswith("infra/grafana/dashboards")
    assert grafana_mounts["/etc/grafana/provisioning"].endswith("infra/grafana/provisioning")


def test_dashboard_queries_name_metrics_and_labels_that_exist() -> None:
    series = exported_series()
    assert "quotewatch_records_in_total" in series
    assert "quotewatch_processing_seconds_bucket" in series
    for query in dashboard_queries():
        used = set(re.findall(r"\b(quotewatch_\w+)", query))
        assert used, f"query names no QuoteWatch metric: {query}"
        unknown = used - set(series)
        assert not unknown, f"{query}: no such metric in core/metrics.py: {unknown}"
        labels_available = set().union(*(series[name] for name in used))
        selector_labels = {
            label
            for selector in re.findall(r"\{([^}]*)\}", query)
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector)
        }
        grouping = {
            label.strip()
            for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query)
            for label in clause.split(",")
            if label.strip()
        }
        assert selector_labels | grouping <= labels_available, (
            f"{query}: unknown labels {(selector_labels | grouping) - labels_available}"
        )


def test_dashboard_shows_everything_the_issue_lists() -> None:
    text = "\n".join(dashboard_queries())
    for metric in (
        metrics.RECORDS_IN,
        metrics.RECORDS_OUT,
        metrics.CONSUMER_LAG,
        metrics.PROCESSING_SECONDS,
        metrics.DEAD_LETTERS,
        metrics.GAPS,
        metrics.RECONNECTS,
        metrics.FEED_STATE,
        metrics.MODEL_VERSION,
        metrics.MODEL_RELOADS,
    ):
        assert metric._name in text, f"no panel shows {metric._name}"
    assert 'outcome="failure"' in text, "reload failures have their own panel"


def test_the_metric_check_rejects_a_misspelt_metric() -> None:
    series = exported_series()
    assert "quotewatch_records_in" not in series  # counters are exported with _total
    assert "quotewatch_model_version_total" not in series


# -- the container healthcheck (infra/docker/healthcheck.py) ------------------------------------------


def run_healthcheck(port: int, variable: str = "METRICS_PORT") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "infra/docker/healthcheck.py")],
        env={variable: str(port)},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


@pytest.fixture
def endpoint() -> Any:
    clock = FakeClock()
    liveness = Liveness("test", clock, stall_seconds=5)
    server = ObservabilityServer("127.0.0.1", 0, liveness).start()
    try:
        yield server, liveness, clock
    finally:
        server.stop()


def test_healthcheck_follows_the_health_endpoint(endpoint: Any) -> None:
    server, liveness, clock = endpoint
    assert run_healthcheck(server.port).returncode == 0
    liveness.set_lag(10)
    clock.advance(6_000_000_000)  # input waiting, nothing processed for longer than the stall limit
    stalled = run_healthcheck(server.port)
    assert stalled.returncode == 1
    assert "HTTP 503" in stalled.stderr
    liveness.progressed(5)
    assert run_healthcheck(server.port).returncode == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(port).returncode == 1
    assert run_healthcheck(port, "DASH_PORT").returncode == 1, "the dashboard's /health on DASH_PORT"
    assert run_healthcheck(0).returncode == 0, "no metrics endpoint configured: the process is the health"
