"""The local stack supervisor's process handling, on real child processes (no broker, no services).

What `make demo` promises about processes: each child has its own log file, a crashed child is
restarted, and Ctrl-C leaves no process behind, including grandchildren that ignore SIGTERM or
left the process group. The whole stack with every service is tests/e2e/stack/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from quotewatch.core.kafka import ShutdownSignal
from quotewatch.local.processes import ManagedProcess, ProcessSpec, terminate_tree
from quotewatch.local.stack import STREAM_SERVICES, LocalStack, StackConfig, StackError
from tests.helpers import wait_for
from tests.unit.infra.cli_resolve import resolve_cli

# A child that starts a grandchild ignoring SIGTERM (same group) and one that leaves the group
# (setsid), prints all three PIDs, then sleeps.
FAMILY = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); time.sleep(600)"])
    escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print("pids", os.getpid(), stubborn.pid, escaped.pid, flush=True)
    time.sleep(600)
    """
)


def family_pids(log: Path) -> list[int]:
    for line in log.read_text().splitlines():
        if line.startswith("pids "):
            return [int(pid) for pid in line.split()[1:]]
    return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_terminate_tree_leaves_no_descendant_behind(tmp_path: Path) -> None:
    process = ManagedProcess(ProcessSpec("family", [sys.executable, "-c", FAMILY]), tmp_path, tmp_path)
    process.start()
    pids = wait_for(lambda: family_pids(process.log_path) if "ignoring" in process.log_path.read_text() else None)
    assert all(alive(pid) for pid in pids)
    process.stop(timeout=2)
    assert not [pid for pid in pids if alive(pid)]
    assert process.poll() is not None


def test_terminate_tree_of_a_gone_process_is_a_no_op() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    child.wait()
    terminate_tree(child.pid, timeout=1)


def test_each_child_has_its_own_log_file(tmp_path: Path) -> None:
    process = ManagedProcess(
        ProcessSpec(
            "talker", [sys.executable, "-c", "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"]
        ),
        tmp_path,
        tmp_path,
    )
    process.start()
    wait_for(lambda: process.poll() is not None)
    process.stop(timeout=2)
    text = (tmp_path / "talker.log").read_text()
    assert "starting:" in text
    assert "to stdout" in text
    assert "to stderr" in text


def test_a_crashed_service_is_restarted_with_backoff(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    script = f"open({str(counter)!r}, 'a').write('x'); raise SystemExit(3)"
    stack = LocalStack(StackConfig(run_dir=tmp_path, bootstrap_interval=3600), ShutdownSignal())
    stack.log_dir.mkdir(parents=True)
    stack.champion = "1"  # no bootstrap training in this test
    stack.processes["crasher"] = process = ManagedProcess(
        ProcessSpec("crasher", [sys.executable, "-c", script]), stack.log_dir, tmp_path
    )
    process.start()
    thread = threading.Thread(target=stack.supervise)
    thread.start()
    try:
        # Backoff 1 s then 2 s: three runs within a few seconds, each one logged.
        wait_for(lambda: counter.exists() and len(counter.read_text()) >= 3, timeout=20)
    finally:
        stack.shutdown.set()
        thread.join()
        stack.stop()
    assert process.restarts >= 2
    assert (stack.log_dir / "crasher.log").read_text().count("starting:") >= 3


def test_one_shot_jobs_are_not_restarted(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path), ShutdownSignal())
    stack.log_dir.mkdir(parents=True)
    process = ManagedProcess(ProcessSpec("job", [sys.executable, "-c", "pass"], restart=False), stack.log_dir, tmp_path)
    process.start()
    wait_for(lambda: process.poll() is not None)
    stack._restart_if_exited(process, now=1e9)
    assert process.next_restart_at is None
    assert process.restarts == 0
    process.stop(timeout=1)


def test_a_failed_start_is_one_clear_error_with_the_log(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path, ready_timeout=20), ShutdownSignal())
    stack.log_dir.mkdir(parents=True)
    spec = ProcessSpec("broken", [sys.executable, "-c", "import sys; sys.exit('bad config: FOO')"], ready=lambda: False)
    with pytest.raises(StackError, match=r"broken exited with 1 while starting(.|\n)*bad config: FOO"):
        stack._start_and_wait([spec])
    stack.stop()


def test_a_taken_port_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        stack = LocalStack(StackConfig(run_dir=tmp_path, dash_port=port), ShutdownSignal())
        with pytest.raises(StackError, match=f"ports already in use on 127.0.0.1: dashboard {port}"):
            stack.check_ports()
    assert not (tmp_path / "logs").exists()


def test_every_command_the_stack_runs_exists_in_the_cli(tmp_path: Path) -> None:
    (tmp_path / "capture.jsonl").write_text("")  # --capture must name an existing file
    for feed in ("synthetic", "capture", "live"):
        config = StackConfig(run_dir=tmp_path, feed=feed, capture=tmp_path / "capture.jsonl")
        for spec in LocalStack(config).all_specs():
            if spec.argv[:3] == [sys.executable, "-m", "quotewatch.cli"]:
                resolve_cli(spec.argv[3:])
            else:
                assert spec.name == "mlflow"
                assert spec.argv[:4] == [sys.executable, "-m", "mlflow", "server"]


def test_services_get_their_own_ports_and_the_shared_settings(tmp_path: Path) -> None:
    config = StackConfig(run_dir=tmp_path, metrics_ports={name: 20000 + i for i, name in enumerate(STREAM_SERVICES)})
    specs = {spec.name: spec for spec in LocalStack(config).service_specs()}
    assert set(specs) == {*STREAM_SERVICES, "dashboard"}
    for index, name in enumerate(STREAM_SERVICES):
        assert specs[name].env["METRICS_PORT"] == str(20000 + index)
        assert specs[name].env["METRICS_HOST"] == "127.0.0.1"
        assert specs[name].env["LAKE_URI"] == str((tmp_path / "lake").resolve())
    assert specs["ingest"].env["COINBASE_WS_URL"] == f"ws://127.0.0.1:{config.feed_port}"
    assert specs["dashboard"].env["DASH_HOST"] == "127.0.0.1"
    live = {spec.name: spec for spec in LocalStack(StackConfig(run_dir=tmp_path, feed="live")).service_specs()}
    assert "COINBASE_WS_URL" not in live["ingest"].env, "live Coinbase: the feed's public endpoint"


SUPERVISOR = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from quotewatch.core.kafka import ShutdownSignal
    from quotewatch.local.processes import ProcessSpec
    from quotewatch.local.stack import LocalStack, StackConfig

    run_dir = Path(sys.argv[1])
    stack = LocalStack(StackConfig(run_dir=run_dir, bootstrap_interval=3600), ShutdownSignal().install())
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    stack.champion = "1"
    stack._start_and_wait([ProcessSpec("family", [sys.executable, "-c", sys.argv[2]]),
                           ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])])
    stack._write_status()
    try:
        stack.supervise()
    finally:
        stack.stop()
    """
)


def test_ctrl_c_stops_the_supervisor_and_every_process_it_started(tmp_path: Path) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path), FAMILY],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        log = tmp_path / "logs" / "family.log"
        family = wait_for(lambda: log.exists() and "ignoring" in log.read_text() and family_pids(log), timeout=30)
        wait_for(lambda: (tmp_path / "stack.json").exists(), timeout=30)
        tree = [p.pid for p in psutil.Process(supervisor.pid).children(recursive=True)]
        assert set(family) <= set(tree)  # the setsid one is still a descendant (by parent)
        os.kill(supervisor.pid, signal.SIGINT)
        assert supervisor.wait(timeout=60) == 0, supervisor.stdout.read() if supervisor.stdout else b""
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
    leftovers = [pid for pid in {*tree, *family} if alive(pid)]
    assert not leftovers, f"still running after Ctrl-C: {leftovers}"
    assert not (tmp_path / "stack.json").exists()


def test_the_demo_command_and_its_options_exist(tmp_path: Path) -> None:
    path, _ = resolve_cli(
        ["demo", "--run-dir", str(tmp_path), "--free-ports", "--feed", "live", "--symbols", "BTC-USD"]
    )
    assert path == ["demo"]
    with pytest.raises(AssertionError, match="No such option"):
        resolve_cli(["demo", "--no-such-option"])
