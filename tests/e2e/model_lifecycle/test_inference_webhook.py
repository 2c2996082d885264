"""``quotewatch run inference`` registers its MLflow webhook on start and switches on it (the poll is an hour)."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from quotewatch.core.config import CommonSettings
from quotewatch.local.kafka import free_port
from tests.broker.services.inference.registry_models import fitted_lr, register, set_alias
from tests.conftest import MlflowServerInfo
from tests.e2e.model_lifecycle.test_model_lifecycle import inference_process
from tests.helpers import wait_for


def champion_version(metrics_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(r'quotewatch_model_version\{[^}]*role="champion"[^}]*\} ([0-9.e+]+)', text)
    return int(float(match.group(1))) if match else None


def test_inference_registers_its_webhook_and_switches_on_an_alias_event(
    make_settings: Any, mlflow_server: MlflowServerInfo, tmp_path: Path
) -> None:
    settings: CommonSettings = make_settings()
    uri = mlflow_server.tracking_uri
    model_name = f"qw-hook-{uuid.uuid4().hex[:8]}"
    set_alias(uri, model_name, "champion", register(uri, model_name, fitted_lr(seed=5)))
    second = register(uri, model_name, fitted_lr(seed=6))
    metrics_port, webhook_port = free_port(), free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": settings.topic_prefix,
        "MLFLOW_TRACKING_URI": uri,
        "MODEL_URI": f"models:/{model_name}@champion",
        "CHALLENGER_URI": f"models:/{model_name}@challenger",
        "MODEL_POLL_SECONDS": "3600",
        "METRICS_PORT": str(metrics_port),
        "WEBHOOK_PORT": str(webhook_port),
        "MLFLOW_WEBHOOK_SECRET": uuid.uuid4().hex,
    }
    log = tmp_path / "inference.log"
    with inference_process(env, log) as process:
        wait_for(lambda: champion_version(metrics_port) == 1, timeout=120, interval=0.5, message="v1 serving")
        wait_for(lambda: "registry webhook registered" in log.read_text(), timeout=60, message="webhook registered")
        set_alias(uri, model_name, "champion", second)
        wait_for(lambda: champion_version(metrics_port) == int(second), timeout=60, interval=0.2, message="switch")
        text = log.read_text()
        assert f"alias champion of {model_name} moved to v{second} (webhook): checking now" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    from mlflow import MlflowClient

    hooks = MlflowClient(tracking_uri=uri, registry_uri=uri).list_webhooks(max_results=100)
    (ours,) = [hook for hook in hooks if hook.name == f"quotewatch-inference-{settings.topic_prefix}-0"]
    assert ours.url == f"http://127.0.0.1:{webhook_port}/mlflow-webhook"
    assert str(ours.status) == "DISABLED", "a stopped service is not called any more"


def test_a_webhook_port_without_a_secret_is_refused(make_settings: Any, tmp_path: Path) -> None:
    settings: CommonSettings = make_settings()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPIC_PREFIX": settings.topic_prefix,
        "WEBHOOK_PORT": str(free_port()),
    }
    env.pop("MLFLOW_WEBHOOK_SECRET", None)
    log = tmp_path / "inference.log"
    with inference_process(env, log) as process:
        assert process.wait(120) == 1
    assert "error: WEBHOOK_PORT is set but MLFLOW_WEBHOOK_SECRET is not" in log.read_text()
