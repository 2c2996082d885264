"""A real local MLflow tracking + registry server (``mlflow server``) without Docker.

``quotewatch mlflow start|stop|status`` and the pytest ``mlflow_server`` fixture use
:class:`LocalMlflow`. Everything about one server lives in its data directory:

- ``mlflow.db``: the SQLite backend store (runs, registered models, aliases, webhooks);
- ``artifacts/``: the artifact store, served by the server itself (``--serve-artifacts``), so
  clients upload and download over HTTP and never need the directory;
- ``webhook-secret.key``: the Fernet key MLflow encrypts webhook secrets with in the database. It
  must survive restarts (without it a restarted server cannot decrypt the secrets it stored);
- ``mlflow.pid``, ``mlflow.json`` (host, port), ``mlflow.log``.

What is switched off, read from the installed mlflow 3.17 source (``mlflow/server/__init__.py``,
``mlflow/environment_variables.py``):

- ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: no huey job runner and its worker processes
  (``_launch_job_execution_runner``); QuoteWatch runs no server-side jobs (GenAI scorers,
  trace roll-ups).
- ``--workers 1``: uvicorn serves in a single process (the default is 4 workers, each a full
  copy of MLflow, ~250 MB); one process is plenty for a trainer and a few inference services.
- ``MLFLOW_DISABLE_TELEMETRY=true``: no usage telemetry thread.

**urllib3 1.x.** mlflow 3.17's webhook delivery builds ``urllib3.util.Retry(backoff_max=...)``
unconditionally (mlflow PR #16893), an argument urllib3 added in 2.0; with urllib3 1.26 every
delivery fails with ``TypeError`` in the server log. The dev extras pin urllib3 to 1.26
(``dash[testing]`` -> ``selenium<=4.2`` -> ``urllib3~=1.26``), so when the interpreter has
urllib3 < 2 the server is started with :data:`URLLIB3_COMPAT` as a ``sitecustomize`` on its
PYTHONPATH (inherited by the uvicorn child): a ``Retry`` that maps ``backoff_max`` onto 1.26's
``DEFAULT_BACKOFF_MAX``. With urllib3 2.x nothing is added.

So a running server is two processes: ``mlflow server`` (which forwards SIGTERM) and its uvicorn
child. Webhooks to a local receiver need ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and
``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` (SSRF protection is meant for shared servers; this
one binds 127.0.0.1), and ``MLFLOW_WEBHOOK_CACHE_TTL=0``: the server otherwise caches the list of
webhooks per event for 60 s, so a webhook registered by a freshly started inference service
would miss the alias changes of the next minute (without the cache each event costs one SQLite
query).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click
import platformdirs
import psutil

from quotewatch.core.errors import QuoteWatchError
from quotewatch.local.kafka import port_is_free

logger = logging.getLogger(__name__)

DEFAULT_PORT = 5000

SERVER_ENVIRONMENT: dict[str, str] = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "0",
}
"""Environment of the server process on top of the caller's (see the module docstring)."""


URLLIB3_COMPAT = """\
# Written by quotewatch.local.mlflow for an MLflow server on urllib3 1.x (see its docstring):
# mlflow 3.17 webhook delivery passes Retry(backoff_max=...), which urllib3 < 2 does not accept.
import urllib3
import urllib3.util
import urllib3.util.retry

if int(urllib3.__version__.split(".")[0]) < 2:
    _Retry = urllib3.util.retry.Retry

    class Retry(_Retry):
        def __init__(self, *args, backoff_max=None, **kwargs):
            super().__init__(*args, **kwargs)
            if backoff_max is not None:
                self.DEFAULT_BACKOFF_MAX = backoff_max

        def new(self, **kwargs):
            retry = super().new(**kwargs)
            retry.DEFAULT_BACKOFF_MAX = self.DEFAULT_BACKOFF_MAX
            return retry

    urllib3.util.retry.Retry = urllib3.util.Retry = urllib3.Retry = Retry
"""
"""``sitecustomize`` for a server on urllib3 < 2 (see the module docstring)."""


def needs_urllib3_compat() -> bool:
    """True when this interpreter's urllib3 is 1.x (mlflow 3.17 webhooks need the shim)."""
    from importlib.metadata import version

    return int(version("urllib3").split(".")[0]) < 2


class MlflowServerError(QuoteWatchError):
    """The local MLflow server could not be started, reached or stopped."""


def default_data_dir() -> Path:
    """The per-user state directory of the default local MLflow server."""
    return Path(platformdirs.user_state_dir("quotewatch")) / "mlflow"


@dataclass
class MlflowState:
    """What ``status`` reports and ``mlflow.json`` keeps."""

    data_dir: str
    host: str
    port: int
    pid: int | None = None
    running: bool = False

    @property
    def tracking_uri(self) -> str:
        """The value for MLFLOW_TRACKING_URI."""
        return f"http://{self.host}:{self.port}"

    @property
    def artifacts_dir(self) -> Path:
        """Where the server stores artifacts (tests corrupt one here on purpose)."""
        return Path(self.data_dir) / "artifacts"


class LocalMlflow:
    """One local MLflow server, identified by its data directory."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self._state_file = self.data_dir / "mlflow.json"
        self._pid_file = self.data_dir / "mlflow.pid"
        self._key_file = self.data_dir / "webhook-secret.key"
        self.log_file = self.data_dir / "mlflow.log"
        self.database = self.data_dir / "mlflow.db"
        self.artifacts = self.data_dir / "artifacts"

    # -- state ------------------------------------------------------------------------------

    def _load_state(self) -> MlflowState | None:
        if not self._state_file.exists():
            return None
        raw = json.loads(self._state_file.read_text())
        return MlflowState(data_dir=str(self.data_dir), host=raw["host"], port=int(raw["port"]))

    def _running_pid(self) -> int | None:
        if not self._pid_file.exists():
            return None
        try:
            pid = int(self._pid_file.read_text().strip())
            process = psutil.Process(pid)
            cmdline = process.cmdline()
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
        except (ValueError, psutil.Error):
            return None
        if "server" in cmdline and any(str(self.database) in part for part in cmdline):
            return pid
        return None

    def status(self) -> MlflowState | None:
        """Host, port and PID, or None if this data directory never held a server."""
        state = self._load_state()
        if state is None:
            return None
        pid = self._running_pid()
        state.pid, state.running = pid, pid is not None
        return state

    # -- start ------------------------------------------------------------------------------

    def command(self, host: str, port: int) -> list[str]:
        """The ``mlflow server`` command line (SQLite backend, served local artifacts, one worker)."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.database}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: the caller's, :data:`SERVER_ENVIRONMENT`, the webhook key (and the
        urllib3 1.x shim when needed)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING_")}
        env.update(SERVER_ENVIRONMENT)
        env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = self._webhook_key()
        if needs_urllib3_compat():
            compat = self.data_dir / "compat"
            compat.mkdir(parents=True, exist_ok=True)
            (compat / "sitecustomize.py").write_text(URLLIB3_COMPAT)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(compat), env.get("PYTHONPATH")]))
        return env

    def _webhook_key(self) -> str:
        if not self._key_file.exists():
            # A Fernet key: 32 random bytes, URL-safe base64 (what Fernet.generate_key() returns).
            self._key_file.touch(mode=0o600)
            self._key_file.write_bytes(base64.urlsafe_b64encode(secrets.token_bytes(32)))
        return self._key_file.read_text().strip()

    def start(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 90.0) -> MlflowState:
        """Start the server and wait until ``/health`` answers.

        Idempotent: a server already running from this data directory is left alone.

        Raises:
            MlflowServerError: the port is taken or the server did not come up within ``timeout``.
        """
        current = self.status()
        if current is not None and current.running:
            if current.port != port:
                logger.warning("mlflow server already running on another port", extra={"port": current.port})
            return current
        if not port_is_free(port, host):
            raise MlflowServerError(f"port {port} is already in use on {host}: stop what listens there or pass --port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        state = MlflowState(str(self.data_dir), host, port)
        self._state_file.write_text(json.dumps({"host": host, "port": port}, indent=2) + "\n")
        log = self.log_file.open("ab")
        process = subprocess.Popen(
            self.command(host, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.data_dir,
            env=self.environment(),
        )
        log.close()
        self._pid_file.write_text(f"{process.pid}\n")
        self._wait_until_up(state, process, timeout)
        state.pid, state.running = process.pid, True
        logger.info("mlflow server up", extra={"tracking_uri": state.tracking_uri, "pid": process.pid})
        return state

    def _wait_until_up(self, state: MlflowState, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._pid_file.unlink(missing_ok=True)
                raise MlflowServerError(
                    f"mlflow server exited with {process.returncode} during start-up; last log lines: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{state.tracking_uri}/health", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)  # polling an HTTP endpoint that is not up yet
        self.stop()
        raise MlflowServerError(
            f"mlflow server did not answer within {timeout:.0f}s; last log lines: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of the server log, joined with ' | '."""
        if not self.log_file.exists():
            return "(no log)"
        return " | ".join(self.log_file.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no log)"

    # -- stop -------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server and every process it started; wait for all of them to exit.

        SIGTERM goes to ``mlflow server``, which forwards it to uvicorn (a graceful shutdown);
        anything of the process tree still alive after ``timeout`` is killed.

        Returns:
            True if a running server was stopped, False if none was running.
        """
        pid = self._running_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        parent = psutil.Process(pid)
        tree = [parent, *parent.children(recursive=True)]
        parent.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for process in alive:
            logger.warning("mlflow process ignored SIGTERM; killing it", extra={"pid": process.pid})
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=10)
        self._pid_file.unlink(missing_ok=True)
        return True


# -- quotewatch mlflow start|stop|status -----------------------------------------------------------

_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Server state directory (default: the per-user state directory).",
)


@click.group("mlflow")
def command() -> None:
    """A local MLflow tracking + registry server (SQLite, local artifacts, one worker, no job runner)."""


@command.command("start")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="Port on 127.0.0.1.")
@_DATA_DIR
@click.option("--timeout", type=float, default=90.0, show_default=True, help="Seconds to wait for /health.")
def start_command(port: int, data_dir: Path | None, timeout: float) -> None:
    """Start the server; print MLFLOW_TRACKING_URI."""
    state = LocalMlflow(data_dir).start(port=port, timeout=timeout)
    click.echo(f"mlflow running: pid {state.pid}, MLFLOW_TRACKING_URI={state.tracking_uri}, data {state.data_dir}")


@command.command("stop")
@_DATA_DIR
def stop_command(data_dir: Path | None) -> None:
    """Stop the server and its worker by the recorded PID; wait for them to exit."""
    local = LocalMlflow(data_dir)
    click.echo("mlflow stopped" if local.stop() else f"no mlflow server running from {local.data_dir}")


@command.command("status")
@_DATA_DIR
def status_command(data_dir: Path | None) -> None:
    """Print whether the server runs, its PID and tracking URI; exit 1 if it does not run."""
    local = LocalMlflow(data_dir)
    state = local.status()
    if state is None or not state.running:
        click.echo(f"not running (data dir {local.data_dir})")
        sys.exit(1)
    click.echo(f"running: pid {state.pid}, MLFLOW_TRACKING_URI={state.tracking_uri}, data {state.data_dir}")
