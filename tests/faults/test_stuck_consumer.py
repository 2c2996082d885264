"""A stuck consumer (processing stopped while the process lives) is reported by its health check in bounded time.

The whole pipeline runs as real processes on the session broker. Each stream service in turn is
frozen with SIGSTOP: its PID stays alive (a process-level check would say "up"), but nothing in it
runs. A health check as an orchestrator runs it (GET /health on METRICS_PORT, 2 s timeout, every
0.5 s) must report it unhealthy within ``DETECT_WITHIN`` seconds; after SIGCONT the same check must
see it healthy again and the service must resume processing. At the end every offset is checked
exactly once downstream (freezing a service must cost nothing either).

The other stuck case, a processing loop blocked inside a call while the process and its /health
thread live, is the broker outage's (``test_broker_outage.py``): /health answers 503 "processing
loop is stuck" there, and the probe restarts the service.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.support import (
    STREAM_SERVICES,
    Pipeline,
    PipelineConfig,
    ServiceProcess,
    trials,
    verify_pipeline,
)
from tests.helpers import wait_for

PROBE_TIMEOUT = 2.0
DETECT_WITHIN = 5.0


def reported(service: ServiceProcess, healthy: bool) -> bool:
    """Does one health check (GET /health, ``PROBE_TIMEOUT``) report ``service`` as ``healthy``?"""
    return service.health(PROBE_TIMEOUT).healthy is healthy


@pytest.mark.timeout(1800)
def test_a_frozen_service_is_reported_unhealthy_within_seconds_and_recovers(
    make_settings: Any, tmp_path: Path, fault_report: FaultReport
) -> None:
    rounds = trials(subset=1, full=4)
    settings = make_settings()
    pipeline = Pipeline(PipelineConfig(settings.kafka_bootstrap_servers, settings.topic_prefix, tmp_path))
    detected: dict[str, list[float]] = {name: [] for name in STREAM_SERVICES}
    recovered: dict[str, int] = dict.fromkeys(STREAM_SERVICES, 0)
    try:
        pipeline.start()
        for _ in range(rounds):
            for name in STREAM_SERVICES:
                service = pipeline[name]
                pipeline.wait_progress(name, 30)
                assert service.health(PROBE_TIMEOUT).healthy
                service.signal(signal.SIGSTOP)
                frozen_at = time.monotonic()
                wait_for(
                    partial(reported, service, healthy=False),
                    timeout=30,
                    interval=0.5,
                    message=f"the health check to report {name} frozen",
                )
                detected[name].append(time.monotonic() - frozen_at)
                assert service.alive, "the frozen process lives"
                service.signal(signal.SIGCONT)
                wait_for(
                    partial(reported, service, healthy=True),
                    timeout=60,
                    interval=0.5,
                    message=f"{name} healthy again",
                )
                pipeline.wait_progress(name, 30)
                recovered[name] += 1
        pipeline.finish()
        verdict = verify_pipeline(settings, pipeline.lake_dir)
    finally:
        pipeline.close()
    for name in STREAM_SERVICES:
        times = detected[name]
        fault_report.add(
            f"stuck consumer: {name} frozen (SIGSTOP)",
            trials=len(times),
            recovered=recovered[name] if verdict.ok else 0,
            lost=verdict.lost if name == STREAM_SERVICES[0] else 0,
            duplicated=verdict.duplicated if name == STREAM_SERVICES[0] else 0,
            notes=f"/health reported it after {max(times):.1f} s at most (probe timeout {PROBE_TIMEOUT:.0f} s)"
            + ("; whole pipeline checked exactly once (totals on this row)" if name == STREAM_SERVICES[0] else ""),
        )
    assert verdict.ok, verdict.problems
    for name, times in detected.items():
        assert len(times) == rounds
        assert max(times) <= DETECT_WITHIN, f"{name}: reported after {max(times):.1f} s"
