"""The children of the local stack: each in its own session with its own log, stopped with its whole tree.

:class:`ManagedProcess` starts one child (a :class:`ProcessSpec`) in its own process group (its
own session), appending to ``<log_dir>/<name>.log``, and stops it with :func:`terminate_tree`:
SIGTERM to the group and every descendant, waiting for all of them, SIGKILL for whatever outlives
the timeout. The group is signalled even when the child itself has already exited: what it spawned
(``mlflow server``'s uvicorn worker, holding the port) would otherwise outlive it and make every
restart fail. Each child also asks the kernel for SIGTERM should the supervisor itself die
(``PR_SET_PDEATHSIG``, :mod:`quotewatch.local.lifetime`). :func:`http_ok` and :func:`tcp_open`
are the readiness probes of :class:`ProcessSpec`.

Why not a supervisor library. The candidates in the package index were weighed: honcho runs a
Procfile but neither restarts a crashed process nor orders start-up by readiness (it stops
everything when one process exits); circus restarts and kills process groups but brings its own
ZeroMQ arbiter daemon and ini configuration, and a readiness-ordered start-up or a conditional
one-shot mid-run (the model bootstrap) would be plugins around it; supervisord restarts and
kills as groups too, but is a separate daemon with an XML-RPC control plane whose own lifetime
Ctrl-C would then have to manage, with start-up ordered by priority only, not readiness. What
the demo needs — readiness-ordered start, restart with backoff, a bootstrap step that depends on
the registry's state, and a Ctrl-C that provably leaves nothing behind — is a small loop over
:mod:`subprocess` with :mod:`psutil` (already a dependency) for the process trees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from quotewatch.local.lifetime import die_with_parent

logger = logging.getLogger(__name__)


# -- one supervised child -------------------------------------------------------------------------


@dataclass
class ProcessSpec:
    """A child process of the stack and how to tell it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the supervisor's environment (or the whole environment)."""
    inherit_env: bool = True
    """False: ``env`` is the child's entire environment."""
    ready: Callable[[], bool] | None = None
    """Polled after start until true (None: ready once started)."""
    restart: bool = True
    """Restart when it exits (long-running services); one-shot jobs are not restarted."""


class ManagedProcess:
    """One child: started in its own session with its log file, stopped with its whole tree."""

    def __init__(self, spec: ProcessSpec, log_dir: Path, cwd: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.next_restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        """Start the child (appending to its log file)."""
        env = dict(os.environ) if self.spec.inherit_env else {}
        env.update(self.spec.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._log = self.log_path.open("ab")
        header = f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(self.spec.argv)}\n"
        self._log.write(header.encode())
        self._log.flush()
        self._popen = subprocess.Popen(
            self.spec.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self._cwd,
            env=env,
            start_new_session=True,  # its own process group: Ctrl-C reaches only the supervisor
            preexec_fn=die_with_parent(),  # forked from the main thread only
        )
        self.started_at = time.monotonic()
        self.next_restart_at = None
        logger.info("started %s (pid %d), log %s", self.spec.name, self._popen.pid, self.log_path)

    def poll(self) -> int | None:
        """The exit code once the child exited, else None."""
        return None if self._popen is None else self._popen.poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = 12) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float) -> None:
        """SIGTERM the child's process group and every descendant; kill what outlives ``timeout``.

        The group is stopped even when the child has exited already: what it spawned may still run
        in its group (``mlflow server`` dies, its uvicorn worker keeps the port).
        """
        if self._popen is None:
            return
        # Not reaped yet (poll() is None): the PID is still the child's, its descendants can be found.
        leader_running = self._popen.poll() is None
        terminate_tree(self._popen.pid, timeout, leader_running=leader_running)
        self._popen.wait()  # reap the direct child
        if self._log is not None:
            self._log.close()
            self._log = None


def _process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _group_members(pgid: int) -> list[psutil.Process]:
    """The processes of process group ``pgid`` that have not exited."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):  # gone while listing
            continue
    return members


_EXIT_POLL_SECONDS = 0.05


def _running(process: psutil.Process) -> bool:
    """True until ``process`` has exited (a zombie has: it only waits to be reaped)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _still_running(pgid: int, tracked: dict[int, psutil.Process]) -> list[psutil.Process]:
    """What is left of ``tracked`` and of group ``pgid`` (members forked meanwhile included)."""
    tracked.update({process.pid: process for process in _group_members(pgid)})
    return [process for process in tracked.values() if _running(process)]


def _wait_until_gone(pgid: int, tracked: dict[int, psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` for every tracked process and group member to exit; those still running.

    Most of them are not this process's children (a group member whose parent exited belongs to
    init now), so they cannot be waited for: their state is polled every 50 ms.
    """
    deadline = time.monotonic() + timeout
    alive = _still_running(pgid, tracked)
    while alive and time.monotonic() < deadline:
        time.sleep(_EXIT_POLL_SECONDS)
        alive = _still_running(pgid, tracked)
    return alive


def terminate_tree(pid: int, timeout: float, *, leader_running: bool = True) -> None:
    """Stop process group ``pid`` (a session leader's) and every descendant of ``pid``.

    SIGTERM first (services flush, commit and close on it), SIGKILL for whatever is still alive
    after ``timeout`` (then up to 10 s more for the kernel to end them); returns once every one of
    them is gone. The group is signalled whether or not its leader still runs.

    Args:
        leader_running: False when ``pid`` has exited and was reaped already: its number may
            belong to an unrelated process by now, so only its group is stopped (a group's id is
            not reused while any member of the group lives). Descendants that left the group
            (setsid) after their parent exited cannot be found any more.
    """
    tracked = {process.pid: process for process in _process_tree(pid)} if leader_running else {}
    tracked.update({process.pid: process for process in _group_members(pid)})
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for process in tracked.values():  # descendants that left the group (setsid) get it too
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    alive = _wait_until_gone(pid, tracked, timeout)
    if alive:
        logger.warning("killing processes that ignored SIGTERM: %s", [p.pid for p in alive])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        left = _wait_until_gone(pid, tracked, 10.0)
        if left:
            logger.error("processes still running after SIGKILL: %s", [p.pid for p in left])


# -- readiness probes ------------------------------------------------------------------------------


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http on 127.0.0.1
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def health_probe(url: str) -> Callable[[], bool]:
    """A readiness probe: ``url`` answers 200 (a service's /health: its loop is running)."""
    return lambda: http_ok(url)


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
