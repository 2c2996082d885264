"""The whole QuoteWatch system on one machine, without Docker: ``quotewatch demo`` (``make demo``).

:class:`LocalStack` starts, on 127.0.0.1 and in this order, waiting for each to be ready:

1. the local Apache Kafka broker (:class:`~quotewatch.local.kafka.LocalKafka`, in ``RUN_DIR/kafka``),
   unless an existing broker is given, and the topic catalog (``quotewatch topics create``);
2. the MLflow tracking + registry server, run as :class:`~quotewatch.local.mlflow.LocalMlflow`
   runs it (SQL backend so registry webhooks work, artifacts served by the server, both under
   ``RUN_DIR/mlflow``) but as a supervised child of the stack;
3. the feed: the local Coinbase-protocol feed server (synthetic book by default, or replaying a
   ``--capture FILE``), or live Coinbase (``--feed live``, when the network allows);
4. ingest, book, labeler, inference, lake sink (lake under ``RUN_DIR/lake``) and the dashboard
   (http://127.0.0.1:8050), together;

then supervises them: a child that exits is restarted with exponential backoff, and a first model
is **bootstrapped**: while the registry has no ``champion``, ``quotewatch train`` runs every
``bootstrap_interval`` seconds on the lake the running stack is filling, until a trained model has
been registered and promoted; inference's alias polling then serves it, so within a few minutes
the dashboard shows live p_change from a registered champion. A registry that answers with an
error (a 5xx, a timeout, a refused connection) is logged and asked again at the next check; it
neither stops the stack nor counts as "no champion yet" (which would start a training run).

The broker is supervised too, but not restarted: it is the system of record, and a broker that
died on its own (the OOM killer, a full disk, a corrupt log segment) would most likely die again
and take the services' transactions with it each time. When the local broker exits, the
supervisor stops the whole stack with an error naming the broker's log; its data stays in
``RUN_DIR/kafka``, so ``quotewatch demo`` with the same ``--run-dir`` resumes from it (the
services continue from their committed offsets).

One log file per process in ``RUN_DIR/logs/<name>.log`` (``kafka.log`` links to the broker's own);
``RUN_DIR/stack.json`` lists every PID, port and URL while the stack runs. Ctrl-C (SIGINT) or
SIGTERM stops everything in reverse order and leaves no process behind: every child runs in its
own process group (its own session), is sent SIGTERM as a group, is waited for together with
every descendant it spawned (MLflow's server workers), and is killed when it does not exit in
time. Each child, the broker included, also asks the kernel for SIGTERM should the supervisor
itself die (``PR_SET_PDEATHSIG``, :mod:`quotewatch.local.lifetime`).

Elsewhere: one child, its process group and its readiness probes, and why the supervisor is a
small loop over :mod:`subprocess` and :mod:`psutil` rather than a supervisor library:
:mod:`quotewatch.local.processes`; the question asked of the registry:
:mod:`quotewatch.local.champion`; the ``quotewatch demo`` command: :mod:`quotewatch.local.demo`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from quotewatch.core.errors import FatalError
from quotewatch.core.kafka import ShutdownSignal
from quotewatch.local.champion import CHAMPION, MODEL_NAME, RegistryUnavailableError, champion_version
from quotewatch.local.kafka import LocalKafka, port_is_free
from quotewatch.local.mlflow import LocalMlflow
from quotewatch.local.processes import ManagedProcess, ProcessSpec, health_probe, tcp_open

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The stream services with a /metrics + /health endpoint, in start order, and their default ports.
STREAM_SERVICES: Mapping[str, int] = {
    "ingest": 9101,
    "book": 9102,
    "labeler": 9103,
    "inference": 9104,
    "lake-sink": 9105,
}
FeedMode = Literal["synthetic", "capture", "live"]


class StackError(FatalError):
    """The local stack could not start (a port is taken, a process did not become ready), or its
    broker died."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state, which feed it reads and the ports it binds on 127.0.0.1."""

    run_dir: Path
    feed: FeedMode = "synthetic"
    capture: Path | None = None
    """The recorded capture the feed server replays (feed="capture")."""
    capture_timestamps: Literal["original", "now"] = "original"
    """Its exchange times as recorded, or moved to each connection's start (``feed serve --timestamps``)."""
    capture_feed: str = "coinbase-advanced"
    """The capture's protocol (detected from its content): the feed server speaks it, the ingest reads it."""
    symbols: tuple[str, ...] = ("BTC-USD", "ETH-USD")
    topic_prefix: str = "qw"
    bootstrap_servers: str | None = None
    """An existing broker to use instead of starting the local one."""
    kafka_port: int = 9092
    mlflow_port: int = 5000
    feed_port: int = 8765
    dash_port: int = 8050
    webhook_port: int = 8091
    """Inference's MLflow webhook receiver: an alias move reloads the model at once."""
    metrics_ports: Mapping[str, int] = field(default_factory=lambda: dict(STREAM_SERVICES))
    lake_flush_seconds: float = 10.0
    """Lake sink flush age: short, so the bootstrap trainer sees data within seconds."""
    bootstrap_interval: float = 45.0
    """Seconds of data before the first training attempt, and between attempts while no champion
    exists (the trainer's gate refuses a model that does not beat the naive baselines, which a few
    hundred rows rarely do)."""
    bootstrap_model: Literal["lr", "xgb", "best"] = "lr"
    """What the bootstrap trains (``quotewatch train --model``): logistic regression fits in seconds
    on a busy 2-core machine, so the first champion serves sooner; ``quotewatch train`` (best of LR
    and XGBoost, gated against that champion) replaces it later."""
    ready_timeout: float = 120.0
    stop_timeout: float = 20.0
    restart_backoff_max: float = 30.0

    @property
    def kafka_bootstrap(self) -> str:
        return self.bootstrap_servers or f"{HOST}:{self.kafka_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dash_port}"

    @property
    def feed_url(self) -> str:
        return f"ws://{HOST}:{self.feed_port}"

    def host_ports(self) -> dict[str, int]:
        """Every port the stack binds on 127.0.0.1, by owner."""
        ports = {"mlflow": self.mlflow_port, "dashboard": self.dash_port, "inference webhook": self.webhook_port}
        ports.update({f"{name} metrics": port for name, port in self.metrics_ports.items()})
        if self.bootstrap_servers is None:
            ports["kafka"] = self.kafka_port
        if self.feed != "live":
            ports["feed-server"] = self.feed_port
        return ports


# -- the stack ---------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    """``quotewatch ARGS`` run by this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "quotewatch.cli", *args]


class LocalStack:
    """Start, supervise and stop every QuoteWatch process on 127.0.0.1 (see the module docstring)."""

    def __init__(self, config: StackConfig, shutdown: ShutdownSignal | None = None) -> None:
        self.config = config
        self.shutdown = shutdown or ShutdownSignal()
        self.run_dir = config.run_dir.expanduser().resolve()
        self.log_dir = self.run_dir / "logs"
        self.lake_dir = self.run_dir / "lake"
        self.processes: dict[str, ManagedProcess] = {}
        # The supervisor's cwd is not the children's (run_dir): a relative capture is resolved here.
        self.capture = config.capture.expanduser().resolve() if config.capture is not None else None
        self.kafka: LocalKafka | None = None
        self.champion: str | None = None
        self._trainer: ManagedProcess | None = None
        # A bootstrap run that ended (and its exit code): what it achieved is known once the registry answers.
        self._finished_training: tuple[ManagedProcess, int] | None = None
        self._next_training_at = 0.0
        self._training_attempts = 0
        self._registry_failures = 0
        self.webhook_secret = secrets.token_urlsafe(32)

    # -- what runs --------------------------------------------------------------------------

    def common_env(self) -> dict[str, str]:
        """The settings every service shares (CommonSettings), pointed at this stack."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.config.kafka_bootstrap,
            "TOPIC_PREFIX": self.config.topic_prefix,
            "SYMBOLS": ",".join(self.config.symbols),
            "MLFLOW_TRACKING_URI": self.config.mlflow_url,
            "LAKE_URI": str(self.lake_dir),
            "METRICS_HOST": HOST,
        }

    def mlflow_spec(self) -> ProcessSpec:
        """The MLflow server as :class:`~quotewatch.local.mlflow.LocalMlflow` runs it (SQLite backend,
        served artifacts, persistent webhook key, one worker), but as a supervised child here.
        """
        mlflow = LocalMlflow(self.run_dir / "mlflow")
        mlflow.artifacts.mkdir(parents=True, exist_ok=True)
        return ProcessSpec(
            name="mlflow",
            argv=mlflow.command(HOST, self.config.mlflow_port),
            env=mlflow.environment(),
            inherit_env=False,
            ready=health_probe(f"{self.config.mlflow_url}/health"),
        )

    def feed_spec(self) -> ProcessSpec | None:
        config = self.config
        if config.feed == "live":
            return None
        if config.feed == "synthetic":
            source = ["--synthetic"]
        else:
            protocol = "exchange" if config.capture_feed == "coinbase-exchange" else "advanced"
            source = ["--capture", str(self.capture), "--timestamps", config.capture_timestamps]
            source += ["--protocol", protocol]
        return ProcessSpec(
            name="feed-server",
            argv=_cli(
                "feed",
                "serve",
                *source,
                "--host",
                HOST,
                "--port",
                str(config.feed_port),
                "--symbols",
                ",".join(config.symbols),
            ),
            ready=lambda: tcp_open(config.feed_port, HOST),
        )

    def service_specs(self) -> list[ProcessSpec]:
        """ingest, book, labeler, inference, lake sink and dashboard with their environments."""
        config = self.config
        specs = []
        for name in STREAM_SERVICES:
            port = config.metrics_ports[name]
            env = {**self.common_env(), "METRICS_PORT": str(port)}
            if name == "ingest" and config.feed != "live":
                env["COINBASE_WS_URL"] = config.feed_url
                if config.feed == "capture":
                    env["FEED"] = config.capture_feed
            if name == "lake-sink":
                env["LAKE_FLUSH_SECONDS"] = str(config.lake_flush_seconds)
            if name == "inference":
                # Inference registers (or updates) its HMAC-verified webhook on MLflow at every start.
                env["WEBHOOK_PORT"] = str(config.webhook_port)
                env["MLFLOW_WEBHOOK_SECRET"] = self.webhook_secret
            specs.append(
                ProcessSpec(
                    name=name,
                    argv=_cli("run", name),
                    env=env,
                    ready=health_probe(f"http://{HOST}:{port}/health"),
                )
            )
        specs.append(
            ProcessSpec(
                name="dashboard",
                argv=_cli("run", "dashboard"),
                env={**self.common_env(), "DASH_HOST": HOST, "DASH_PORT": str(config.dash_port), "METRICS_PORT": "0"},
                ready=health_probe(f"{config.dashboard_url}/health"),
            )
        )
        return specs

    def trainer_spec(self) -> ProcessSpec:
        """The bootstrap training job: lake -> registered model, promoted to champion."""
        argv = _cli("train", "--model", self.config.bootstrap_model, "--promote")
        return ProcessSpec(name="trainer", argv=argv, env=self.common_env(), restart=False)

    def all_specs(self) -> list[ProcessSpec]:
        """Every process the stack may run, in start order (for checks and the status file)."""
        specs = [ProcessSpec("topics", _cli("topics", "create"), self.common_env(), restart=False), self.mlflow_spec()]
        feed = self.feed_spec()
        if feed is not None:
            specs.append(feed)
        return [*specs, *self.service_specs(), self.trainer_spec()]

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until SIGINT/SIGTERM, stop everything; the exit code."""
        try:
            self.start()
            if not self.shutdown.requested:
                self.supervise()
            return 0
        finally:
            self.stop()

    def check_ports(self) -> None:
        """Fail with one clear line when a port the stack needs is taken."""
        taken = {owner: port for owner, port in self.config.host_ports().items() if not port_is_free(port)}
        if taken:
            listing = ", ".join(f"{owner} {port}" for owner, port in sorted(taken.items()))
            raise StackError(f"ports already in use on {HOST}: {listing} (stop what listens there or pick other ports)")
        clash = len(set(self.config.host_ports().values())) != len(self.config.host_ports())
        if clash:
            raise StackError(f"two parts of the stack were given the same port: {self.config.host_ports()}")

    def start(self) -> None:
        """Start every part, each ready before what needs it; raise StackError if one is not.

        MLflow and the feed server need no broker, so they start while the broker does; the
        services start together once the topics, MLflow and the feed are there.
        """
        self.check_ports()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.lake_dir.mkdir(parents=True, exist_ok=True)
        independent = [self.mlflow_spec()]
        feed = self.feed_spec()
        if feed is not None:
            independent.append(feed)
        self._start(independent)
        if self.config.bootstrap_servers is None:
            logger.info("starting the local Kafka broker on %s:%d", HOST, self.config.kafka_port)
            self.kafka = LocalKafka(self.run_dir / "kafka")
            link = self.log_dir / "kafka.log"  # the broker writes its own log; list it with the others
            if not link.is_symlink():
                link.symlink_to(self.kafka.log_file)
            # SIGTERM from the kernel should this supervisor die, like every other child.
            self.kafka.start(port=self.config.kafka_port, die_with_parent=True)
            self._write_status()
        self._run_once(ProcessSpec("topics", _cli("topics", "create"), self.common_env(), restart=False))
        self._wait_ready(independent)
        self._start_and_wait(self.service_specs())
        self._look_up_champion()  # None on a registry error too: supervise() asks again
        self._write_status()
        logger.info(
            "QuoteWatch is running: dashboard %s, MLflow %s, logs %s (Ctrl-C stops everything)",
            self.config.dashboard_url,
            self.config.mlflow_url,
            self.log_dir,
        )

    def _start(self, specs: Sequence[ProcessSpec]) -> None:
        for spec in specs:
            process = ManagedProcess(spec, self.log_dir, self.run_dir)
            self.processes[spec.name] = process
            process.start()
        self._write_status()

    def _start_and_wait(self, specs: Sequence[ProcessSpec]) -> None:
        self._start(specs)
        self._wait_ready(specs)

    def _wait_ready(self, specs: Sequence[ProcessSpec]) -> None:
        """Until every one of ``specs`` passes its readiness probe; StackError if one exits or times out."""
        deadline = time.monotonic() + self.config.ready_timeout
        waiting = [self.processes[spec.name] for spec in specs]
        while waiting:
            if self.shutdown.requested:
                return
            for process in list(waiting):
                code = process.poll()
                if code is not None:
                    raise StackError(
                        f"{process.spec.name} exited with {code} while starting; "
                        f"{process.log_path}:\n{process.log_tail()}"
                    )
                if process.spec.ready is None or process.spec.ready():
                    logger.info("%s is ready", process.spec.name)
                    waiting.remove(process)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.spec.name for p in waiting)
                raise StackError(
                    f"not ready within {self.config.ready_timeout:.0f}s: {names}; "
                    f"{waiting[0].log_path}:\n{waiting[0].log_tail()}"
                )
            self.shutdown.wait(0.2)

    def _run_once(self, spec: ProcessSpec) -> None:
        """Run a one-shot job to completion; raise StackError if it fails."""
        process = ManagedProcess(spec, self.log_dir, self.run_dir)
        self.processes[spec.name] = process
        process.start()
        while process.poll() is None:
            if self.shutdown.wait(0.2):
                return
        code = process.poll()
        process.stop(self.config.stop_timeout)
        del self.processes[spec.name]
        if code != 0:
            raise StackError(f"{spec.name} failed with exit code {code}; {process.log_path}:\n{process.log_tail()}")

    def supervise(self) -> None:
        """Until shutdown: restart children that exit, and bootstrap a champion while there is none.

        Who calls this: :meth:`run`, from the main thread, after :meth:`start`.
        """
        while not self.shutdown.wait(0.5):
            now = time.monotonic()
            self._check_broker()
            for process in self.processes.values():
                self._restart_if_exited(process, now)
            self._bootstrap_model(now)

    def _check_broker(self) -> None:
        """Raise StackError once the local broker has exited (not restarted: see the module docstring)."""
        if self.kafka is None:
            return
        code = self.kafka.exit_code()
        if code is None:
            return
        raise StackError(
            f"the Kafka broker exited with code {code}; stopping the stack. Its data is kept in "
            f"{self.kafka.data_dir}: `quotewatch demo` with the same --run-dir resumes from it. "
            f"Broker log {self.kafka.log_file}: {self.kafka.log_tail()}"
        )

    def _restart_if_exited(self, process: ManagedProcess, now: float) -> None:
        code = process.poll()
        if code is None or not process.spec.restart:
            return
        if process.next_restart_at is None:
            stable = now - process.started_at > 60
            if stable:
                process.restarts = 0  # it ran fine for a while: start the backoff afresh
            delay = min(self.config.restart_backoff_max, 2.0**process.restarts)
            process.next_restart_at = now + delay
            logger.error(
                "%s exited with %s; restarting in %.0fs (restart %d); last log lines:\n%s",
                process.spec.name,
                code,
                delay,
                process.restarts + 1,
                process.log_tail(),
            )
        elif now >= process.next_restart_at:
            process.stop(self.config.stop_timeout)  # reap it and anything it left behind
            process.restarts += 1
            process.start()
            self._write_status()

    def _look_up_champion(self) -> bool:
        """Ask the registry for the champion into ``self.champion``; False when it gave no answer.

        A registry error is logged (a warning on the first of a run of them) and changes nothing:
        the caller asks again at its next check.
        """
        try:
            champion = champion_version(self.config.mlflow_url)
        except RegistryUnavailableError as exc:
            self._registry_failures += 1
            log = logger.warning if self._registry_failures == 1 else logger.debug
            log("the MLflow registry did not answer (%s); asking again at the next check", exc)
            return False
        if self._registry_failures:
            logger.info("the MLflow registry answers again (after %d failed checks)", self._registry_failures)
            self._registry_failures = 0
        self.champion = champion
        return True

    def _bootstrap_model(self, now: float) -> None:
        """Train and promote a first model once the lake has data; stop once a champion exists.

        Who calls this: :meth:`supervise`, every half second. Whenever the registry gives no answer
        it returns and the next call asks again; nothing is decided on a registry error.
        """
        if self.champion is not None:
            return
        trainer = self._trainer
        if trainer is not None:
            code = trainer.poll()
            if code is None:
                return
            trainer.stop(self.config.stop_timeout)
            self._trainer = None
            self.processes.pop("trainer", None)
            self._finished_training = (trainer, code)
        if self._finished_training is None and now < self._next_training_at:
            return
        if not self._look_up_champion():
            return
        if self.champion is not None:
            logger.info("bootstrap: %s@%s is version %s; inference serves it", MODEL_NAME, CHAMPION, self.champion)
            self._finished_training = None
            self._write_status()
            return
        if self._finished_training is not None:
            finished, code = self._finished_training
            self._finished_training = None
            why = (
                "the gate refused the candidate"
                if code == 0
                else f"training failed (exit code {code}; too little data?)"
            )
            logger.info(
                "bootstrap: attempt %d: %s, see %s; retrying with more data in %.0fs",
                self._training_attempts,
                why,
                finished.log_path,
                self.config.bootstrap_interval,
            )
            self._next_training_at = now + self.config.bootstrap_interval
            return
        if self._next_training_at == 0.0:  # first look: let the lake fill with labelled data first
            self._next_training_at = now + self.config.bootstrap_interval
            return
        self._training_attempts += 1
        self._trainer = ManagedProcess(self.trainer_spec(), self.log_dir, self.run_dir)
        self.processes["trainer"] = self._trainer
        self._trainer.start()

    def stop(self) -> None:
        """Stop every child (reverse start order), then the broker; waits for all of them.

        Who calls this: :meth:`run` on the way out, whatever happened (Ctrl-C, a failed start).
        """
        for name, process in reversed(list(self.processes.items())):
            if process.is_running():
                logger.info("stopping %s (pid %s)", name, process.pid)
            process.stop(self.config.stop_timeout)
        self.processes.clear()
        if self.kafka is not None:
            logger.info("stopping the local Kafka broker")
            self.kafka.stop()
            self.kafka = None
        status = self.run_dir / "stack.json"
        status.unlink(missing_ok=True)
        logger.info("QuoteWatch stack stopped")

    def _kafka_pid(self) -> int | None:
        state = self.kafka.status() if self.kafka is not None else None
        return state.pid if state is not None else None

    def pids(self) -> Iterator[int]:
        """The PIDs of the running children and the broker."""
        for process in self.processes.values():
            if process.pid is not None and process.is_running():
                yield process.pid
        kafka_pid = self._kafka_pid()
        if kafka_pid is not None:
            yield kafka_pid

    def _write_status(self) -> None:
        """``RUN_DIR/stack.json``: PIDs, ports, URLs and log files of the running stack."""
        status = {
            "supervisor_pid": os.getpid(),
            "kafka": self.config.kafka_bootstrap,
            "kafka_pid": self._kafka_pid(),
            "topic_prefix": self.config.topic_prefix,
            "ports": self.config.host_ports(),
            "mlflow": self.config.mlflow_url,
            "dashboard": self.config.dashboard_url,
            "lake": str(self.lake_dir.resolve()),
            "champion_version": self.champion,
            "processes": {
                name: {"pid": process.pid, "log": str(process.log_path), "restarts": process.restarts}
                for name, process in self.processes.items()
            },
        }
        path = self.run_dir / "stack.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(status, indent=2) + "\n")
        temporary.replace(path)
