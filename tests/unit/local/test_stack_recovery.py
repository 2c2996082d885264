"""What the demo's supervisor does when something goes wrong, on real processes and a real HTTP server.

A child that exits leaves nothing running in its group, a registry that answers 5xx is asked again
(not taken for "no champion", not fatal), a relative capture reaches the feed server, and the
broker ends with the supervisor and stops the stack when it dies on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from quotewatch.core.kafka import ShutdownSignal
from quotewatch.local.champion import RegistryUnavailableError, champion_version
from quotewatch.local.kafka import LocalKafka, free_port
from quotewatch.local.processes import ManagedProcess, ProcessSpec
from quotewatch.local.stack import LocalStack, StackConfig, StackError
from tests.helpers import wait_for


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- a child that exits leaves nothing behind in its group ------------------------------------------

# Like `mlflow server`: starts workers in its own process group, then exits itself; one worker
# ignores SIGTERM.
EXITS_LEAVING_WORKERS = textwrap.dedent(
    """
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); time.sleep(600)"])
    print("workers", worker.pid, stubborn.pid, flush=True)
    sys.exit(3)
    """
)


def worker_pids(log: Path) -> list[int]:
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith("workers ") and "ignoring" in text:
            return [int(pid) for pid in line.split()[1:]]
    return []


def test_stop_ends_the_workers_a_child_that_already_exited_left_in_its_group(tmp_path: Path) -> None:
    process = ManagedProcess(ProcessSpec("server", [sys.executable, "-c", EXITS_LEAVING_WORKERS]), tmp_path, tmp_path)
    process.start()
    workers = wait_for(lambda: process.poll() is not None and worker_pids(process.log_path), timeout=30)
    assert process.poll() == 3
    assert all(alive(pid) for pid in workers), "the workers outlive their parent"
    try:
        process.stop(timeout=1)  # what a restart and the stack's stop() call
        assert not [pid for pid in workers if alive(pid)], "left running in the exited child's group"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- the registry ------------------------------------------------------------------------------------


@dataclass
class FakeRegistry:
    """An HTTP server answering MLflow's alias look-up with whatever ``reply`` says at the time."""

    url: str
    reply: tuple[int, bytes] = (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')
    requests: list[tuple[int, bytes]] = field(default_factory=list)

    def champion(self, version: str) -> None:
        self.reply = (200, json.dumps({"model_version": {"name": "quotewatch", "version": version}}).encode())

    def count(self, status: int) -> int:
        return sum(1 for code, _ in list(self.requests) if code == status)


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    state: dict[str, FakeRegistry] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake = state["registry"]
            code, body = fake.reply
            fake.requests.append((code, body))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["registry"] = FakeRegistry(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["registry"]
    finally:
        server.shutdown()
        server.server_close()


def test_champion_version_tells_no_champion_from_no_answer(registry: FakeRegistry) -> None:
    assert champion_version(registry.url) is None  # 404: no such model or alias yet
    registry.champion("4")
    assert champion_version(registry.url) == "4"
    for reply in [(500, b"oops"), (503, b"busy"), (200, b"<html>a proxy page</html>")]:
        registry.reply = reply
        with pytest.raises(RegistryUnavailableError):
            champion_version(registry.url)
    with pytest.raises(RegistryUnavailableError):
        champion_version(f"http://127.0.0.1:{free_port()}")  # nothing listens


@dataclass
class SupervisorThread:
    stack: LocalStack
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> SupervisorThread:
        def run() -> None:
            try:
                self.stack.supervise()
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stack.shutdown.set()
        assert self.thread is not None
        self.thread.join(30)
        self.stack.stop()


def stack_on(tmp_path: Path, mlflow_url: str, **options: Any) -> LocalStack:
    port = int(mlflow_url.rsplit(":", 1)[1])
    stack = LocalStack(StackConfig(run_dir=tmp_path, mlflow_port=port, **options), ShutdownSignal())
    stack.log_dir.mkdir(parents=True)
    return stack


def status_champion(run_dir: Path) -> str | None:
    path = run_dir / "stack.json"
    if not path.exists():
        return None
    champion = json.loads(path.read_text()).get("champion_version")
    return None if champion is None else str(champion)


def test_a_registry_error_is_asked_again_at_the_next_check_not_fatal(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.reply = (503, b"busy")
    stack = stack_on(tmp_path, registry.url, bootstrap_interval=0.1)
    supervisor = SupervisorThread(stack).start()
    try:
        wait_for(lambda: registry.count(503) >= 3 or supervisor.error, timeout=20, message="three checks")
        assert supervisor.error is None, f"supervise() ended on a registry error: {supervisor.error!r}"
        assert stack._training_attempts == 0, "an unanswered look-up is not 'no champion': nothing to train yet"
        registry.champion("7")
        # stack.json is replaced atomically after the champion is found: wait for the file itself.
        wait_for(
            lambda: status_champion(tmp_path) == "7" or supervisor.error, timeout=20, message="stack.json champion"
        )
        assert supervisor.error is None
        assert stack.champion == "7"
    finally:
        supervisor.finish()


def test_after_a_training_run_a_registry_error_starts_no_new_run(tmp_path: Path, registry: FakeRegistry) -> None:
    release = tmp_path / "release-trainer"
    stack = stack_on(tmp_path, registry.url, bootstrap_interval=0.1)
    # The bootstrap trainer, stood in for by a job that ends when the test says so.
    trainer = ProcessSpec(
        "trainer",
        [sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)"],
        restart=False,
    )
    stack.trainer_spec = lambda: trainer  # type: ignore[method-assign]  # the one part replaced
    supervisor = SupervisorThread(stack).start()
    try:
        wait_for(lambda: stack._training_attempts == 1 or supervisor.error, timeout=20, message="a training run")
        registry.reply = (503, b"busy")
        release.touch()
        wait_for(lambda: registry.count(503) >= 3 or supervisor.error, timeout=20, message="checks after the run")
        assert supervisor.error is None, repr(supervisor.error)
        assert stack._training_attempts == 1, "the run's outcome is unknown until the registry answers"
        assert stack._trainer is None
        registry.champion("1")
        wait_for(lambda: stack.champion == "1" or supervisor.error, timeout=20, message="the promoted champion")
        assert supervisor.error is None
        assert stack._training_attempts == 1
    finally:
        supervisor.finish()


# -- the capture ---------------------------------------------------------------------------------------


def test_a_relative_capture_reaches_the_feed_server_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = tmp_path / "captures" / "btc.jsonl"
    capture.parent.mkdir()
    capture.write_text("")
    monkeypatch.chdir(tmp_path)
    stack = LocalStack(StackConfig(run_dir=Path("run"), feed="capture", capture=Path("captures/btc.jsonl")))
    spec = stack.feed_spec()
    assert spec is not None
    given = Path(spec.argv[spec.argv.index("--capture") + 1])
    # The feed server runs with cwd=run_dir: the path must name the same file from there.
    assert given.is_absolute()
    assert (stack.run_dir / given).resolve() == capture.resolve()


# -- the broker ----------------------------------------------------------------------------------------


class SleeperKafka(LocalKafka):
    """LocalKafka launching a stand-in for the JVM (no Java needed): the process handling is the real one."""

    def _java(self, libs: Path, heap: str, *args: str) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(600)"]


LAUNCHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from quotewatch.local.kafka import LocalKafka

    class SleeperKafka(LocalKafka):
        def _java(self, libs, heap, *args):
            return [sys.executable, "-c", "import time; time.sleep(600)"]

    kafka = SleeperKafka(Path(sys.argv[1]))
    kafka.data_dir.mkdir(parents=True, exist_ok=True)
    kafka._launch(Path("."), "256m", die_with_parent=True)  # as LocalStack.start() launches it
    print(kafka._launched.pid, flush=True)
    time.sleep(600)
    """
)


def test_the_broker_the_stack_launches_ends_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "kafka")], stdout=subprocess.PIPE, text=True
    )
    assert supervisor.stdout is not None
    broker = int(supervisor.stdout.readline())
    try:
        assert alive(broker)
        supervisor.kill()  # SIGKILL: no handler, no finally, no stop()
        supervisor.wait(10)
        wait_for(lambda: not alive(broker), timeout=10, message="the broker to end with its supervisor")
    finally:
        if alive(broker):
            os.kill(broker, signal.SIGKILL)


def test_a_broker_that_dies_stops_the_stack_with_a_clear_error(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path), ShutdownSignal())
    stack.log_dir.mkdir(parents=True)
    stack.champion = "1"  # no bootstrap training in this test
    stack.kafka = kafka = SleeperKafka(tmp_path / "kafka")
    kafka.data_dir.mkdir(parents=True)
    kafka._launch(Path("."), "256m", die_with_parent=True)
    assert kafka._launched is not None
    supervisor = SupervisorThread(stack).start()
    try:
        assert supervisor.thread is not None
        assert supervisor.thread.is_alive()
        os.kill(kafka._launched.pid, signal.SIGKILL)  # the OOM killer, say
        wait_for(lambda: supervisor.error is not None, timeout=20, message="the supervisor to notice")
        assert isinstance(supervisor.error, StackError)
        message = str(supervisor.error)
        assert "Kafka broker exited with code -9" in message
        assert str(kafka.data_dir) in message
    finally:
        supervisor.finish()
        if kafka._launched is not None and kafka._launched.poll() is None:
            kafka._launched.kill()
