"""The local MLflow server as QuoteWatch runs it: two processes (no job runner), start/status/stop, no orphans."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

from quotewatch.local.kafka import free_port
from tests.conftest import MlflowServerInfo


def quotewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotewatch.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def server_processes(data_dir: Path, port: int) -> list[psutil.Process]:
    """The ``mlflow server`` of ``data_dir`` and whatever serves or works for it (found even if orphaned)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        argv = process.info["cmdline"] or []
        text = " ".join(argv)
        ours = str(data_dir) in text or (
            "--port" in argv and argv[argv.index("--port") + 1 : argv.index("--port") + 2] == [str(port)]
        )
        if ours and ("mlflow" in text or "uvicorn" in text or "huey" in text):
            found.append(process)
    return found


def test_the_session_server_is_one_uvicorn_worker_and_no_job_runner(mlflow_server: MlflowServerInfo) -> None:
    parent = psutil.Process(mlflow_server.pid)
    children = parent.children(recursive=True)
    assert len(children) == 1, [c.cmdline() for c in children]
    (worker,) = children
    assert "uvicorn" in worker.cmdline()
    assert worker.cmdline()[worker.cmdline().index("--workers") + 1] == "1"
    assert not any("huey" in " ".join(c.cmdline()) for c in children)
    with urllib.request.urlopen(f"{mlflow_server.tracking_uri}/health", timeout=10) as response:
        assert response.read() == b"OK"


def test_start_status_stop_leaves_no_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "mlflow"
    port = free_port()
    started = quotewatch("mlflow", "start", "--port", str(port), "--data-dir", str(data_dir), "--timeout", "240")
    assert started.returncode == 0, started.stderr
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in started.stdout
    try:
        assert len(server_processes(data_dir, port)) == 2, "mlflow server + its uvicorn worker"
        status = quotewatch("mlflow", "status", "--data-dir", str(data_dir))
        assert status.returncode == 0
        assert "running" in status.stdout
        again = quotewatch("mlflow", "start", "--port", str(port), "--data-dir", str(data_dir))
        assert again.returncode == 0, "start is idempotent for a running server"
        assert len(server_processes(data_dir, port)) == 2
        taken = quotewatch("mlflow", "start", "--port", str(port), "--data-dir", str(tmp_path / "other"))
        assert taken.returncode == 1
        assert f"error: port {port} is already in use" in taken.stderr
    finally:
        stopped = quotewatch("mlflow", "stop", "--data-dir", str(data_dir))
    assert stopped.returncode == 0
    assert "mlflow stopped" in stopped.stdout
    assert server_processes(data_dir, port) == []
    status = quotewatch("mlflow", "status", "--data-dir", str(data_dir))
    assert status.returncode == 1
    assert "not running" in status.stdout
