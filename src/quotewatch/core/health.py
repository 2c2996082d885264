"""Health means processing is advancing, not that the PID is alive.

:class:`Liveness` is updated by the processing loop; :class:`ObservabilityServer` serves
``/metrics`` (Prometheus) and ``/health`` (JSON; HTTP 200 when healthy, 503 when stalled) on
METRICS_HOST:METRICS_PORT.

A service is **stalled** when its loop has not turned for ``stall_seconds`` (a handler is stuck),
or when input is waiting (lag > 0) and no record was processed for ``stall_seconds``, or when the
loop has ended while the process lives.

:class:`StuckWatchdog` turns a stuck loop into an exit: a process whose loop has not turned for
``STUCK_EXIT_SECONDS`` ends itself with :data:`EXIT_STUCK`, so whatever supervises it (``quotewatch
demo``, compose ``restart:``, Kubernetes) starts it again. Some hangs have no other way out: after
a broker restart librdkafka can block in ``send_offsets_to_transaction()`` far past its timeout
(librdkafka issue 5456), and docker compose does not restart an unhealthy container. Exiting is
safe for every service: the stream services' open transaction is aborted when the restarted
instance (same transactional id) fences it, and the lake sink commits only renamed files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from quotewatch.core.clock import Clock
from quotewatch.core.metrics import HEALTHY, LAST_PROGRESS

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthStatus:
    healthy: bool
    reason: str
    detail: dict[str, Any]  # not a topic record: health JSON


class Liveness:
    """Progress of one processing loop. Thread-safe: the loop writes, the health endpoint reads."""

    def __init__(self, service: str, clock: Clock, stall_seconds: float) -> None:
        self._service = service
        self._clock = clock
        self._stall_ns = int(stall_seconds * 1e9)
        self._lock = threading.Lock()
        started = clock.monotonic_ns()
        self._last_beat_ns = started
        self._last_progress_ns = started
        self._records = 0
        self._lag = 0
        self._positions: dict[str, int] = {}
        self._running = True
        self._stopped_reason = ""

    def beat(self) -> None:
        """The loop turned (called once per poll, with or without records)."""
        with self._lock:
            self._last_beat_ns = self._clock.monotonic_ns()

    def progressed(self, records: int, positions: dict[str, int] | None = None) -> None:
        """``records`` were processed; ``positions`` maps ``topic[partition]`` to the next offset."""
        now = self._clock.monotonic_ns()
        with self._lock:
            self._last_beat_ns = now
            self._last_progress_ns = now
            self._records += records
            if positions:
                self._positions.update(positions)
        LAST_PROGRESS.labels(self._service).set(self._clock.now_ns() / 1e9)

    def set_lag(self, lag: int) -> None:
        """Records waiting on the input partitions (high watermark minus position)."""
        with self._lock:
            self._lag = lag

    def stopped(self, reason: str) -> None:
        """The loop ended: the process is no longer processing, whatever its PID says."""
        with self._lock:
            self._running = False
            self._stopped_reason = reason

    def stuck_seconds(self) -> float:
        """Seconds since the loop last turned; 0 once the loop has ended (stopping is not stuck)."""
        now = self._clock.monotonic_ns()
        with self._lock:
            if not self._running:
                return 0.0
            return (now - self._last_beat_ns) / 1e9

    def status(self) -> HealthStatus:
        now = self._clock.monotonic_ns()
        with self._lock:
            detail: dict[str, Any] = {  # not a topic record: health JSON
                "service": self._service,
                "records_processed": self._records,
                "lag": self._lag,
                "seconds_since_loop": round((now - self._last_beat_ns) / 1e9, 3),
                "seconds_since_progress": round((now - self._last_progress_ns) / 1e9, 3),
                "positions": dict(self._positions),
            }
            if not self._running:
                status = HealthStatus(False, f"processing loop stopped: {self._stopped_reason}", detail)
            elif now - self._last_beat_ns > self._stall_ns:
                status = HealthStatus(False, "processing loop is stuck", detail)
            elif self._lag > 0 and now - self._last_progress_ns > self._stall_ns:
                status = HealthStatus(False, "input is waiting but no record was processed", detail)
            else:
                status = HealthStatus(True, "ok", detail)
        HEALTHY.labels(self._service).set(1 if status.healthy else 0)
        return status


class ObservabilityServer:
    """``/metrics`` and ``/health`` over HTTP on a daemon thread."""

    def __init__(self, host: str, port: int, liveness: Liveness | None) -> None:
        self._liveness = liveness
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest())
                elif self.path.startswith("/health"):
                    status = outer.health()
                    body = json.dumps({"healthy": status.healthy, "reason": status.reason, **status.detail})
                    self._reply(200 if status.healthy else 503, "application/json", body.encode())
                else:
                    self._reply(404, "text/plain", b"not found\n")

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http %s", format % args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="observability", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def health(self) -> HealthStatus:
        if self._liveness is None:
            return HealthStatus(True, "ok", {})
        return self._liveness.status()

    def start(self) -> ObservabilityServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


EXIT_STUCK = 70
"""Exit status of a process ended by :class:`StuckWatchdog` (EX_SOFTWARE)."""


def _exit_stuck() -> None:  # pragma: no cover - ends the process (tested in a subprocess)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_STUCK)  # the stuck thread never returns: a normal exit would wait for it


class StuckWatchdog:
    """Ends the process when the processing loop has not turned for ``exit_seconds``.

    Who runs it: :func:`~quotewatch.core.service.service_context`, for every service, unless
    ``STUCK_EXIT_SECONDS=0``. :meth:`check` is the whole decision (tests call it with a manual
    clock); the thread calls it every second or so.

    Args:
        on_stuck: what to do (default: log, then ``os._exit(EXIT_STUCK)``); injected by tests.
    """

    def __init__(self, liveness: Liveness, exit_seconds: float, on_stuck: Callable[[], None] | None = None) -> None:
        if exit_seconds <= 0:
            raise ValueError("exit_seconds must be positive (0 means: do not start a watchdog)")
        self._liveness = liveness
        self._exit_seconds = exit_seconds
        self._on_stuck = on_stuck or _exit_stuck
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stuck-watchdog", daemon=True)
        self.fired = False
        self._suspect = False

    def check(self) -> bool:
        """Fire (once) if the loop has been stuck for ``exit_seconds``; True if it fired now.

        Stuck must be seen on two checks in a row: a process resumed after a suspend (SIGSTOP, a
        paused VM) finds a stale beat at its first check, and its loop gets until the next one.
        """
        stuck = self._liveness.stuck_seconds()
        if self.fired or stuck < self._exit_seconds:
            self._suspect = False
            return False
        if not self._suspect:
            self._suspect = True
            return False
        self.fired = True
        logger.critical(
            "processing loop stuck for %.0f s (STUCK_EXIT_SECONDS=%g): exiting with status %d so the "
            "supervisor restarts the service",
            stuck,
            self._exit_seconds,
            EXIT_STUCK,
        )
        self._on_stuck()
        return True

    def _run(self) -> None:
        interval = min(1.0, self._exit_seconds / 10)
        while not self._stop.wait(interval):
            self.check()

    def start(self) -> StuckWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
