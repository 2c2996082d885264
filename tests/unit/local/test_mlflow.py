"""The local MLflow server manager without starting a server (that is tests/e2e/model_lifecycle)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from quotewatch.local.mlflow import SERVER_ENVIRONMENT, LocalMlflow, MlflowServerError, needs_urllib3_compat


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(MlflowServerError, match=f"port {port} is already in use on 127.0.0.1") as info:
            LocalMlflow(tmp_path / "mlflow").start(port=port)
    assert "\n" not in str(info.value)


def test_status_and_stop_of_an_unused_data_dir(tmp_path: Path) -> None:
    assert LocalMlflow(tmp_path).status() is None
    assert LocalMlflow(tmp_path).stop() is False


def test_the_server_runs_one_worker_without_job_runner_on_sqlite(tmp_path: Path) -> None:
    local = LocalMlflow(tmp_path)
    command = local.command("127.0.0.1", 5123)
    assert command[1:4] == ["-m", "mlflow", "server"]
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path.resolve() / "artifacts")
    assert "--serve-artifacts" in command
    env = local.environment()
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"
    assert env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert SERVER_ENVIRONMENT.items() <= env.items()


def test_the_webhook_encryption_key_is_private_and_survives_restarts(tmp_path: Path) -> None:
    key = LocalMlflow(tmp_path).environment()["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]
    assert LocalMlflow(tmp_path).environment()["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == key
    assert (tmp_path / "webhook-secret.key").stat().st_mode & 0o077 == 0
    from cryptography.fernet import Fernet

    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x", "a valid Fernet key"


def test_the_callers_tracking_uri_does_not_leak_into_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert "MLFLOW_TRACKING_URI" not in LocalMlflow(tmp_path).environment()


def test_mlflow_webhook_delivery_can_build_its_http_session_in_the_server_environment(tmp_path: Path) -> None:
    """mlflow 3.17 passes Retry(backoff_max=...) (urllib3 >= 2 only); the dev extras pin urllib3 1.26."""
    import subprocess
    import sys

    env = LocalMlflow(tmp_path).environment()
    assert ("PYTHONPATH" in env) == needs_urllib3_compat()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlflow.webhooks.delivery import _create_webhook_session as s; "
            "r = s().adapters['http://'].max_retries; print(r.total, r.get_backoff_time() <= 60)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3", "True"]
