"""Health means processing is advancing, not that the PID is alive.

:class:`Liveness` is updated by the processing loop; :class:`ObservabilityServer` serves
``/metrics`` (Prometheus) and ``/health`` (JSON; HTTP 200 when healthy, 503 when stalled) on
METRICS_HOST:METRICS_PORT.

A service is **stalled** when its loop has not turned for ``stall_seconds`` (a handler is stuck),
or when input is waiting (lag > 0) and no record was processed for ``stall_seconds``, or when the
loop has ended while the process lives.
"""

from __future__ import annotations

import json
import logging
import threading
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
    detail: dict[str, Any]


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

    def status(self) -> HealthStatus:
        now = self._clock.monotonic_ns()
        with self._lock:
            detail: dict[str, Any] = {
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
