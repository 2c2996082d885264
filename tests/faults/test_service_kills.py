"""SIGKILL each service in turn mid-stream and restart it: every offset exactly once downstream.

The whole pipeline runs as real processes (ingest from the local feed server, book, labeler,
inference, lake-sink) on the session broker. In each round every service is SIGKILLed in turn once
it is processing, then started again with the same settings (same instance id: the new process
fences its predecessor's transactions), and the next service is killed only once the restarted one
is processing again. At the end the input stops, every stage catches up, and
:func:`~tests.faults.support.verify_pipeline` checks every derived topic against the pure domain
functions of its input and every lake dataset against its topic.

What a SIGKILL of the ingest may lose is what its local queue held (never accepted); the next
connection's snapshots resync the books, and nothing downstream of ``md.events`` may differ.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import FaultReport
from tests.faults.support import STREAM_SERVICES, Pipeline, PipelineConfig, trials, verify_pipeline


@pytest.mark.timeout(1800)
def test_sigkill_each_service_in_turn_then_every_offset_exactly_once(
    make_settings: Any, tmp_path: Path, fault_report: FaultReport
) -> None:
    rounds = trials(subset=1, full=3)
    settings = make_settings()
    pipeline = Pipeline(PipelineConfig(settings.kafka_bootstrap_servers, settings.topic_prefix, tmp_path))
    kills: dict[str, int] = dict.fromkeys(STREAM_SERVICES, 0)
    try:
        pipeline.start()
        for _ in range(rounds):
            for name in STREAM_SERVICES:
                pipeline.wait_progress(name, 50)
                assert pipeline[name].kill() == -signal.SIGKILL
                kills[name] += 1
                pipeline[name].start()
                pipeline.wait_progress(name, 50, timeout=120)
        pipeline.finish()
        verdict = verify_pipeline(settings, pipeline.lake_dir)
        logs = {name: pipeline[name].log_path.read_text(errors="replace") for name in STREAM_SERVICES}
    finally:
        pipeline.close()
    rebuilt = sum(logs[name].count("rebuilding state from already-committed input") for name in ("book", "labeler"))
    repaired = logs["lake-sink"].count("skipping a chunk written before a crash") + logs["lake-sink"].count(
        "rewriting a chunk a crash left incomplete"
    )
    for name in STREAM_SERVICES:
        fault_report.add(
            f"SIGKILL {name} + restart",
            trials=kills[name],
            recovered=kills[name] if verdict.ok else 0,
            lost=verdict.lost,
            duplicated=verdict.duplicated,
            notes=(
                "whole pipeline checked: "
                + ", ".join(f"{k} {v}" for k, v in verdict.counts.items() if not k.startswith("lake"))
                + f"; state rebuilds after restarts {rebuilt}, lake chunk repairs {repaired}"
                if name == STREAM_SERVICES[0]
                else "(same run: the totals are the whole pipeline's)"
            ),
        )
    assert verdict.ok, verdict.problems
    assert verdict.counts["features"] > 0
    assert verdict.counts["labels"] > 0
