"""The broker stopped for 10 s mid-stream and restarted, N times in a row (5 in ``make test``, 20 in
``make faults``): every outage recovered from, no record lost, none duplicated, in any topic or lake dataset.

This test starts its **own** Apache Kafka broker (:class:`~quotewatch.local.kafka.LocalKafka` on a
free port, in the test's temporary directory) and stops that one: never the shared broker or the
session's. The whole pipeline runs against it as real processes (ingest from the local feed server,
book, labeler, inference, lake-sink). Mid-stream the broker is stopped (SIGTERM, a clean broker
shutdown), stays down for ``OUTAGE_SECONDS`` while the feed keeps flowing into the ingest, and is
started again on the same port and data directory. An outage is recovered when every service has
processed 50 more records and the read_committed checker (:mod:`tests.faults.checker`, reading every
topic throughout) has been given new records on every topic; the seconds that took, the restarts
meanwhile and the checker's findings (lost, duplicated) in what was delivered from that outage to the
next are the outage's row in the per-outage table of docs/faults.md. After the last outage the input
stops, every stage catches up, the checker compares what it was given with the topics, and
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
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.local.kafka import LocalKafka, free_port
from tests.faults.checker import CHECKED_TOPICS, CheckerReport, ReadCommittedChecker, wait_recovered
from tests.faults.conftest import FaultReport
from tests.faults.support import (
    DELTA_MS,
    FULL,
    STREAM_SERVICES,
    TICK_MS,
    Pipeline,
    PipelineConfig,
    Verdict,
    trials,
    verify_pipeline,
)

OUTAGE_SECONDS = 10.0
STALL_SECONDS = 10.0
"""HEALTH_STALL_SECONDS of the services: /health turns 503 when the loop has not turned for this long."""
STUCK_EXIT_SECONDS = 30.0
"""STUCK_EXIT_SECONDS of the services: a loop that has not turned for this long ends the process."""
RECOVERY_TIMEOUT = 240.0
"""An outage not recovered from in this long (counted from the broker's return) fails the test."""
RESTART_EXITED_ONLY = math.inf
"""As ``liveness_grace``: restart services that exit, never one that is only unhealthy."""


@dataclass
class Outage:
    """One outage: when it ended, what it cost."""

    number: int
    recovered: bool = False
    seconds: float | None = None
    """From the broker's stop until every service processed 50 more records and the checker was
    given new records on every topic (None: not recovered)."""
    after_restart: float | None = None
    """The same, counted from the broker's return."""
    lost: int = 0
    duplicated: int = 0
    restarts: list[str] = field(default_factory=list)


def outage_table(outages: list[Outage], mode: str) -> str:
    """The per-outage table of docs/faults.md."""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"{len(outages)} outages of {OUTAGE_SECONDS:.0f} s in a row, {date}, {mode} "
        f"(`STUCK_EXIT_SECONDS={STUCK_EXIT_SECONDS:.0f}`); lost / duplicated per outage are the read_committed "
        "checker's findings in the records delivered from that outage to the next one.",
        "",
        "| outage | recovered | seconds to recover (from stop / from restart) | records lost | records duplicated "
        "| restarts by the supervisor |",
        "|---|---|---|---|---|---|",
    ]
    for o in outages:
        seconds = "–" if o.seconds is None or o.after_restart is None else f"{o.seconds:.1f} / {o.after_restart:.1f}"
        lines.append(
            f"| {o.number} | {'yes' if o.recovered else 'NO'} | {seconds} | {o.lost} | {o.duplicated} "
            f"| {', '.join(o.restarts) or 'none'} |"
        )
    return "\n".join(lines)


@pytest.mark.timeout(7200)
def test_broker_down_for_10s_mid_stream_loses_and_duplicates_nothing(tmp_path: Path, fault_report: FaultReport) -> None:
    count = trials(subset=5, full=20)
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
    outages: list[Outage] = []
    marks: list[tuple[int, int]] = []
    """The checker's (lost, duplicated) at the start of each outage, then at the end."""
    verdict: Verdict | None = None
    report: CheckerReport | None = None
    try:
        pipeline.start()
        checker = ReadCommittedChecker(settings, TICK_MS, DELTA_MS).start()
        for name in STREAM_SERVICES:
            pipeline.wait_progress(name, 50)
        for number in range(1, count + 1):
            outage = Outage(number)
            outages.append(outage)
            marks.append(checker.tally())
            seen = {suffix: checker.delivered(suffix) for suffix in CHECKED_TOPICS}
            restarts_before = Counter(pipeline.restarts)
            stopped_at = time.monotonic()
            assert kafka.stop(), "the test's broker was running"
            down_until = stopped_at + OUTAGE_SECONDS
            while time.monotonic() < down_until:  # the outage itself
                time.sleep(0.25)
            kafka.start(port=port, timeout=180)
            back_at = time.monotonic()
            try:
                wait_recovered(pipeline, checker, seen, RECOVERY_TIMEOUT, RESTART_EXITED_ONLY)
                outage.recovered = True
                outage.seconds, outage.after_restart = time.monotonic() - stopped_at, time.monotonic() - back_at
            except AssertionError as exc:
                outage.restarts.append(f"not recovered in {RECOVERY_TIMEOUT:.0f} s: {str(exc).splitlines()[0]}")
            outage.restarts[:0] = pipeline.restarts_since(restarts_before)
            if not outage.recovered:
                break
        if all(o.recovered for o in outages):
            pipeline.finish()
            verdict = verify_pipeline(settings, pipeline.lake_dir)
            report = checker.finish()
            marks.append((report.gaps + report.vanished + report.undelivered, report.duplicates + report.out_of_order))
        else:
            marks.append(checker.tally())
        aborted = sum(
            pipeline[name].log_path.read_text(errors="replace").count("transaction aborted")
            for name in ("book", "labeler", "inference")
        )
        restarts = sorted(f"{name} {n}x ({why})" for (name, why), n in pipeline.restarts.items())
    finally:
        pipeline.close()
        kafka.stop()
    for i, outage in enumerate(outages):
        # Outage i's window: from its start to the next one's (the first from the beginning).
        before = marks[i] if i else (0, 0)
        outage.lost, outage.duplicated = marks[i + 1][0] - before[0], marks[i + 1][1] - before[1]
    fault_report.detail("outages", outage_table(outages, "`make faults`" if FULL else "`make test` subset"))
    recovered = sum(o.recovered for o in outages)
    assert recovered == count, f"{recovered}/{count} outages recovered: {[o.restarts for o in outages]}"
    assert verdict is not None
    assert report is not None
    lake_rows = {k.removeprefix("lake "): v for k, v in verdict.counts.items() if k.startswith("lake ")}
    fault_report.add(
        f"broker stopped {OUTAGE_SECONDS:.0f} s mid-stream, restarted",
        trials=len(outages),
        recovered=recovered if verdict.ok and report.ok else 0,
        lost=verdict.lost + marks[-1][0],
        duplicated=verdict.duplicated + marks[-1][1],
        seconds=max((o.seconds for o in outages if o.seconds is not None), default=None),
        notes=(
            f"own broker; each outage in the table below; restarts by the supervisor (exit 70 = the stuck "
            f"watchdog): {'; '.join(restarts) or 'none'}; {aborted} transactions aborted and redone; "
            f"read_committed checker: {report.summary()}; "
            f"lake rows checked by offset and content: {lake_rows}"
        ),
    )
    assert verdict.ok, verdict.problems
    assert report.ok, report.violations
    assert all(lake_rows.get(suffix, 0) > 0 for suffix in ("md.raw", "md.events", "features", "labels"))
