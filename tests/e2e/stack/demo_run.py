"""One run of the real ``quotewatch demo`` command for the stack tests, and what they ask of it.

:func:`running_demo` starts the command (its own Kafka broker, MLflow server, feed server, every
service and the dashboard, on free ports in ``base/demo``) in its own session, as a terminal would,
and stops it at the end if a test has not: SIGINT, then whatever the stack left is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import wait_for


@dataclass
class DemoRun:
    process: subprocess.Popen[bytes]
    run_dir: Path
    output: Path

    def status(self) -> dict[str, Any]:
        path = self.run_dir / "stack.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def alive_or_fail(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"quotewatch demo exited with {self.process.returncode}:\n{self.output.read_text()[-4000:]}"
            )

    def tree(self) -> set[int]:
        """Every process the demo started (children, grandchildren and the detached broker)."""
        pids = {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        status = self.status()
        pids |= {entry["pid"] for entry in status.get("processes", {}).values() if entry.get("pid")}
        if status.get("kafka_pid"):
            pids.add(status["kafka_pid"])
        return pids

    def started(self, timeout: float) -> dict[str, Any]:
        """The stack's status once every process is ready (waits for it)."""

        def ready() -> dict[str, Any] | None:
            self.alive_or_fail()
            status = self.status()
            return status if status.get("processes", {}).get("dashboard") else None

        return wait_for(ready, timeout=timeout, interval=1, message="every process of the stack ready")

    def log(self, process: str) -> str:
        path = self.run_dir / "logs" / f"{process}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def running_demo(base: Path, args: Sequence[str]) -> Iterator[DemoRun]:
    """``quotewatch demo --run-dir base/demo --free-ports ARGS``, stopped on the way out if still running."""
    run_dir = base / "demo"
    output = base / "demo.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotewatch.cli", "demo", "--run-dir", str(run_dir), "--free-ports", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a test sends SIGINT to the demo alone, as a terminal would
        )
    run = DemoRun(process, run_dir, output)
    try:
        yield run
    finally:
        if process.poll() is None:  # a test failed before stopping it: do not leave the stack running
            leftovers = run.tree()
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for pid in leftovers:
                if alive(pid):
                    psutil.Process(pid).kill()
