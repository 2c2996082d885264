"""Peak RSS of every service during a 10-minute run at 5,000 level updates/s, and its growth after warm-up.

Every part runs as a real process on a fresh namespace: ``quotewatch feed serve --synthetic
--symbols BTC-USD --rate 5000`` (the local Coinbase-protocol server, Advanced Trade), ``quotewatch
run ingest`` reading it, ``book``, ``labeler``, ``inference`` (fallback model: no registry),
``lake-sink`` (a lake in the scratch directory, files cut every 10 s) and ``dashboard`` (waitress,
no browser attached). The resident set size of each process (``psutil``, the process alone) is
sampled every ``SAMPLE_SECONDS``.

Reported per service: the peak RSS over the whole run (value) next to its RSS at the end of the
warm-up (peer), and the **growth after warm-up**: the median of the last ``WINDOW_SECONDS`` of
samples minus the median of the first ``WINDOW_SECONDS`` after warm-up (medians, so a lake flush
or a GC cycle caught by one sample does not count as growth). Goal: at most ``GOAL_GROWTH_MB``.
The services must also keep up: each one's consumer lag (from /health) is in the notes, and the
run fails if any process exits.

``--quick``: 90 s (30 s warm-up) instead of 10 minutes (2 minutes warm-up), for a smoke run.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin
from quotewatch.local.kafka import free_port
from tests.benchmarks.harness import Context, Result

SUITE = "rss"
QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
RATE = 5000
SAMPLE_SECONDS = 3.0
GOAL_GROWTH_MB = 5.0
SERVICES = ("ingest", "book", "labeler", "inference", "lake-sink", "dashboard")


@dataclass
class Sampled:
    """One process and its RSS samples (seconds since start, bytes)."""

    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    metrics_port: int | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self, now: float) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode} during the run")
        self.samples.append((now, psutil.Process(self.process.pid).memory_info().rss))

    def health(self) -> dict[str, Any]:
        if not self.metrics_port:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/health", timeout=2) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as error:
            return dict(json.loads(error.read()))
        except (OSError, ValueError):
            return {}


def _start(name: str, argv: list[str], env: dict[str, str], logs: Path, metrics_port: int | None) -> Sampled:
    log = (logs / f"{name}.log").open("wb")
    process = subprocess.Popen([QUOTEWATCH, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    return Sampled(name, process, log, metrics_port)


def _wait_up(part: Sampled, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if part.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{part.name} did not come up ({url})")
        time.sleep(0.2)


def _median_mb(samples: list[tuple[float, int]], start: float, end: float) -> float:
    window = [rss for t, rss in samples if start <= t <= end]
    return statistics.median(window) / 2**20


def run(ctx: Context) -> list[Result]:
    duration, warmup, window = (90.0, 30.0, 20.0) if ctx.quick else (600.0, 120.0, 60.0)
    settings = CommonSettings(kafka_bootstrap_servers=ctx.broker(), topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    ensure_topics(make_admin(settings), settings.topic_prefix)
    logs = ctx.scratch / f"rss-{settings.topic_prefix}"
    logs.mkdir(parents=True, exist_ok=True)
    feed_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_", "TOPIC_PREFIX", "LAKE_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        TOPIC_PREFIX=settings.topic_prefix,
        SYMBOLS="BTC-USD",
        LOG_LEVEL="WARNING",
        COINBASE_WS_URL=f"ws://127.0.0.1:{feed_port}",
        MODEL_URI=f"models:/absent-{uuid.uuid4().hex[:6]}@champion",
        LAKE_URI=str(logs / "lake"),
        LAKE_FLUSH_SECONDS="10",
        DASH_HOST="127.0.0.1",
        DASH_DEBUG="false",
    )
    parts: list[Sampled] = []
    try:
        feed = _start(
            "feed-server",
            ["feed", "serve", "--synthetic", "--symbols", "BTC-USD", "--rate", str(RATE), "--port", str(feed_port)],
            {**env, "LOG_LEVEL": "WARNING"},
            logs,
            None,
        )
        parts.append(feed)
        for name in SERVICES:
            port = free_port()
            extra = (
                {"DASH_PORT": str(port), "METRICS_PORT": "0"} if name == "dashboard" else {"METRICS_PORT": str(port)}
            )
            part = _start(name, ["run", name], {**env, **extra}, logs, port)
            parts.append(part)
            _wait_up(part, f"http://127.0.0.1:{port}/health")
        started = time.monotonic()
        next_sample = started
        while True:
            now = time.monotonic() - started
            for part in parts:
                part.sample(now)
            if now >= duration:
                break
            next_sample += SAMPLE_SECONDS
            time.sleep(max(0.0, next_sample - time.monotonic()))  # the sampling period, not a synchronisation
        final = {part.name: part.health() for part in parts}
        updates = _updates_served(feed_port, parts)
    finally:
        for part in parts:
            if part.process.poll() is None:
                part.process.send_signal(signal.SIGTERM)
        for part in parts:
            try:
                part.process.wait(60)
            except subprocess.TimeoutExpired:
                part.process.kill()
                part.process.wait(10)
            part.log.close()
    results = []
    for part in parts:
        peak = max(rss for _, rss in part.samples) / 2**20
        at_warmup = _median_mb(part.samples, warmup - SAMPLE_SECONDS, warmup + SAMPLE_SECONDS)
        growth = _median_mb(part.samples, duration - window, duration) - _median_mb(
            part.samples, warmup, warmup + window
        )
        health = final.get(part.name) or {}
        state = (
            f"; at the end: {health.get('records_processed', 0):,} records processed, lag {health.get('lag', 0)}"
            if health
            else ""
        )
        results.append(
            Result(
                SUITE,
                f"{part.name}: peak RSS, {duration / 60:g} min at {RATE:,} updates/s",
                peak,
                "MiB",
                peer="RSS at the end of warm-up",
                peer_value=at_warmup,
                goal=f"growth after warm-up <= {GOAL_GROWTH_MB:g} MiB",
                met=growth <= GOAL_GROWTH_MB,
                notes=(
                    f"growth after warm-up {growth:+.1f} MiB (median of the last {window:g} s minus median of the "
                    f"first {window:g} s after a {warmup:g} s warm-up); {len(part.samples)} samples every "
                    f"{SAMPLE_SECONDS:g} s{state}" + (f"; {updates}" if part.name == "feed-server" else "")
                ),
            )
        )
    return results


def _updates_served(feed_port: int, parts: list[Sampled]) -> str:
    """What the ingest saw, from its /metrics: frames in (a check that the load was really there)."""
    ingest = next(part for part in parts if part.name == "ingest")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ingest.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return "ingest /metrics unavailable"
    frames = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("quotewatch_records_in_total{") and 'service="ingest"' in line
    )
    del feed_port
    return f"the ingest received {frames:,.0f} frames"
