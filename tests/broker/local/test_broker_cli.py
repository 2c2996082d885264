"""`quotewatch broker start/status/stop` start a real Kafka and leave no process behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from quotewatch.local.kafka import free_port


def quotewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotewatch.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def kafka_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "kafka.Kafka" in cmdline and any(str(data_dir) in part for part in cmdline):
            found.append(process)
    return found


def test_start_status_stop_leaves_no_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "broker"
    port = free_port()
    started = quotewatch("broker", "start", "--port", str(port), "--data-dir", str(data_dir))
    assert started.returncode == 0, started.stderr
    assert f"127.0.0.1:{port}" in started.stdout
    try:
        assert len(kafka_processes(data_dir)) == 1
        status = quotewatch("broker", "status", "--data-dir", str(data_dir))
        assert status.returncode == 0
        assert "running" in status.stdout
        again = quotewatch("broker", "start", "--port", str(port), "--data-dir", str(data_dir))
        assert again.returncode == 0, "start is idempotent for a running broker"
        assert len(kafka_processes(data_dir)) == 1
        taken = quotewatch("broker", "start", "--port", str(port), "--data-dir", str(tmp_path / "other"))
        assert taken.returncode == 1
        assert f"error: port {port} is already in use" in taken.stderr
    finally:
        stopped = quotewatch("broker", "stop", "--data-dir", str(data_dir))
    assert stopped.returncode == 0
    assert "broker stopped" in stopped.stdout
    assert kafka_processes(data_dir) == []
    status = quotewatch("broker", "status", "--data-dir", str(data_dir))
    assert status.returncode == 1
    assert "not running" in status.stdout
