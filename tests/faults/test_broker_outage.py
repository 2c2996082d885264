"""The broker stopped for 10 s mid-stream and restarted: no record lost, none duplicated, in any lake dataset.

This test starts its **own** Apache Kafka broker (:class:`~quotewatch.local.kafka.LocalKafka` on a
free port, in the test's temporary directory) and stops that one: never the shared broker or the
session's. The whole pipeline runs against it as real processes (ingest from the local feed server,
book, labeler, inference, lake-sink). Mid-stream the broker is stopped (SIGTERM, a clean broker
shutdown), stays down for ``OUTAGE_SECONDS`` while the feed keeps flowing into the ingest, and is
started again on the same port and data directory. Once every service is processing again (and
after the last outage the input stopped and every stage caught up),
:func:`~tests.faults.support.verify_pipeline` checks every derived topic against the pure
functions of its input and every lake dataset against its topic, offset by offset and record by
record.

Meanwhile the test acts as the supervisor production has (``quotewatch demo``, compose
``restart: unless-stopped``, Kubernetes ``restartPolicy: Always``): a service that exits is started
again, and nothing else is done for it. A service that hangs must end itself: after a broker
restart the transactional services may block in ``send_offsets_to_transaction`` past its timeout
(librdkafka issue 5456); their stuck watchdog (``STUCK_EXIT_SECONDS``, short here) turns that into
an exit with status 70. The restarts and their exit codes are in the report.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.local.kafka import LocalKafka, free_port
from tests.faults.conftest import FaultReport
from tests.faults.support import STREAM_SERVICES, Pipeline, PipelineConfig, trials, verify_pipeline

OUTAGE_SECONDS = 10.0
STALL_SECONDS = 10.0
"""HEALTH_STALL_SECONDS of the services: /health turns 503 when the loop has not turned for this long."""
STUCK_EXIT_SECONDS = 30.0
"""STUCK_EXIT_SECONDS of the services: a loop that has not turned for this long ends the process."""
RESTART_EXITED_ONLY = math.inf
"""As ``liveness_grace``: restart services that exit, never one that is only unhealthy."""


@pytest.mark.timeout(1800)
def test_broker_down_for_10s_mid_stream_loses_and_duplicates_nothing(tmp_path: Path, fault_report: FaultReport) -> None:
    outages = trials(subset=1, full=3)
    kafka = LocalKafka(tmp_path / "kafka")
    port = free_port()
    bootstrap = kafka.start(port=port, timeout=180).bootstrap_servers
    prefix = f"outage{uuid.uuid4().hex[:8]}"
    settings = CommonSettings(kafka_bootstrap_servers=bootstrap, topic_prefix=prefix)
    pipeline = Pipeline(
        PipelineConfig(
            bootstrap,
            prefix,
            tmp_path / "run",
            common_env={"HEALTH_STALL_SECONDS": str(STALL_SECONDS), "STUCK_EXIT_SECONDS": str(STUCK_EXIT_SECONDS)},
        )
    )
    (tmp_path / "run").mkdir()
    restarts_of_broker = 0
    try:
        pipeline.start()
        for _ in range(outages):
            for name in STREAM_SERVICES:
                pipeline.wait_progress(name, 50)
            assert kafka.stop(), "the test's broker was running"
            down_until = time.monotonic() + OUTAGE_SECONDS
            while time.monotonic() < down_until:  # the outage itself
                time.sleep(0.25)
            kafka.start(port=port, timeout=180)
            restarts_of_broker += 1
            for name in STREAM_SERVICES:
                pipeline.wait_progress(name, 50, timeout=240, liveness_grace=RESTART_EXITED_ONLY)
        pipeline.finish()
        verdict = verify_pipeline(settings, pipeline.lake_dir)
        aborted = sum(
            pipeline[name].log_path.read_text(errors="replace").count("transaction aborted")
            for name in ("book", "labeler", "inference")
        )
        restarts = sorted(f"{name} {count}x ({why})" for (name, why), count in pipeline.restarts.items())
    finally:
        pipeline.close()
        kafka.stop()
    lake_rows = {k.removeprefix("lake "): v for k, v in verdict.counts.items() if k.startswith("lake ")}
    fault_report.add(
        f"broker stopped {OUTAGE_SECONDS:.0f} s mid-stream, restarted",
        trials=restarts_of_broker,
        recovered=restarts_of_broker if verdict.ok else 0,
        lost=verdict.lost,
        duplicated=verdict.duplicated,
        notes=(
            f"own broker; restarts by the supervisor (exit 70 = the stuck watchdog): {'; '.join(restarts) or 'none'}; "
            f"{aborted} transactions aborted and redone; "
            f"lake rows checked by offset and content: {lake_rows}"
        ),
    )
    assert verdict.ok, verdict.problems
    assert all(lake_rows.get(suffix, 0) > 0 for suffix in ("md.raw", "md.events", "features", "labels"))
