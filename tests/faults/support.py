"""What the fault tests share: trial counts, real service processes, the running pipeline, and the
one check every pipeline fault ends with (every offset exactly once downstream).

- :func:`trials`: a few trials per fault in ``make test``, the full count with ``QUOTEWATCH_FAULTS=full``
  (``make faults``).
- :class:`ServiceProcess`: one ``quotewatch run <service>`` process with its own log file and its
  ``/health`` + ``/metrics`` endpoint on a free METRICS_PORT; SIGKILL, SIGSTOP/SIGCONT, restart.
- :class:`Pipeline`: the local feed server (synthetic market, in a thread: it stands in for
  Coinbase) and ingest, book, labeler, inference and lake-sink as real processes on one topic
  namespace.
- :func:`verify_pipeline`: after the input stopped and every service caught up, compares each
  derived topic with the pure domain functions applied to its input topic (book.top3 and features
  from md.events, labels from book.top3, one served prediction per feature tick), every lake
  dataset with its topic (offsets and content), and md.raw with itself (frame indexes contiguous
  per connection); returns the records lost and duplicated, with the details.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, TopicPartition

from quotewatch.core import lake
from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import consumer_config, make_admin, query_watermarks
from quotewatch.core.lake import LAKE_TOPICS
from quotewatch.core.records import BookTop, FeatureVector, Label, MarketEvent, Prediction, RawFrame, Record
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.labels import Labeler
from quotewatch.domain.simulation.synthetic import SyntheticConfig
from quotewatch.local.kafka import free_port
from quotewatch.services.feed_server.server import FeedServer, RunningFeedServer, SyntheticSource
from tests.helpers import R, committed_past, wait_for

QUOTEWATCH = str(Path(sys.executable).with_name("quotewatch"))
FULL = os.environ.get("QUOTEWATCH_FAULTS", "").strip().lower() == "full"
TICK_MS = 100
DELTA_MS = 500
SYMBOLS = ("BTC-USD", "ETH-USD")
STREAM_SERVICES = ("ingest", "book", "labeler", "inference", "lake-sink")
# Settings a developer's shell may carry that must not leak into the processes under test.
_SETTING_PREFIXES = (
    "KAFKA_",
    "TOPIC_PREFIX",
    "LAKE_",
    "MODEL_",
    "MLFLOW_",
    "METRICS_",
    "SYMBOLS",
    "COINBASE_",
    "INGEST_",
    "DASH_",
    "CHALLENGER_URI",
    "HEALTH_",
    "TICK_MS",
    "DELTA_MS",
    "FEED",
    "INSTANCE_ID",
    "WEBHOOK_",
    "QUOTEWATCH_CONFIG_FILE",
)


def trials(subset: int, full: int) -> int:
    """How many trials of a fault to run: ``full`` under ``make faults``, ``subset`` in ``make test``."""
    return full if FULL else subset


def clean_environment() -> dict[str, str]:
    """The test process's environment without any QuoteWatch setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_SETTING_PREFIXES)}


# -- one service process ---------------------------------------------------------------------------


@dataclass
class Health:
    """One /health probe: HTTP status (None: no answer in time) and the JSON body."""

    status: int | None
    body: dict[str, Any]

    @property
    def healthy(self) -> bool:
        return self.status == 200


class ServiceProcess:
    """``quotewatch <argv>`` as a real process, restartable, with its log and metrics port."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.metrics_port = int(env.get("METRICS_PORT") or 0)
        self.env = {**clean_environment(), "PYTHONUNBUFFERED": "1", **env}
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        """time.monotonic() of the last start."""
        self._log: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"\n=== start {self.starts + 1}: quotewatch {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            [QUOTEWATCH, *self.argv], env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.log_path.parent
        )
        self.starts += 1
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def assert_alive(self) -> bool:
        """True, or fail the test at once (with the log's tail) when the process has exited."""
        if not self.alive:
            code = self.process.returncode if self.process is not None else None
            raise AssertionError(f"{self.name} exited with {code}; log tail:\n{self.log_tail()}")
        return True

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit status (-9)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a running process must exit on its own within ``timeout``); None if it was not running."""
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout:.0f}s; log tail:\n{self.log_tail()}"
            ) from None

    def close(self) -> None:
        """Kill whatever still runs (test teardown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def health(self, timeout: float = 2.0) -> Health:
        """GET /health like an orchestrator's probe: no answer within ``timeout`` counts as unhealthy."""
        url = f"http://127.0.0.1:{self.metrics_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return Health(response.status, json.loads(response.read()))
        except urllib.error.HTTPError as error:
            try:
                return Health(error.code, json.loads(error.read()))
            except ValueError:
                return Health(error.code, {})
        except (OSError, ValueError):
            return Health(None, {})

    def records_processed(self) -> int:
        return int(self.health().body.get("records_processed", -1))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{want}"' in head for key, want in labels.items()):
            total += float(value)
    return total


# -- the pipeline --------------------------------------------------------------------------------------


@dataclass
class PipelineConfig:
    bootstrap_servers: str
    prefix: str
    workdir: Path
    services: tuple[str, ...] = STREAM_SERVICES
    rate: float = 300.0
    """Synthetic level updates per second per symbol."""
    mlflow_tracking_uri: str | None = None
    model_uri: str | None = None
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per service: environment on top of the pipeline's."""
    common_env: dict[str, str] = field(default_factory=dict)
    """Every service: environment on top of the pipeline's."""


class Pipeline:
    """The feed server and the stream services as processes on one namespace."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.settings = CommonSettings(
            kafka_bootstrap_servers=config.bootstrap_servers, topic_prefix=config.prefix, symbols=SYMBOLS
        )
        self.names = TopicNames(config.prefix)
        self.lake_dir = config.workdir / "lake"
        self.feed = RunningFeedServer(
            FeedServer(
                "advanced",
                SyntheticSource(SyntheticConfig(symbols=SYMBOLS, seed=11, rate=config.rate)),
                heartbeat_interval=0.25,
            )
        )
        self.services: dict[str, ServiceProcess] = {}
        self.restarts: Counter[tuple[str, str]] = Counter()
        """(service, why) of every restart by :meth:`liveness_probe`."""
        self._unhealthy_since: dict[str, float] = {}

    def _env(self, name: str) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.config.bootstrap_servers,
            "TOPIC_PREFIX": self.config.prefix,
            "SYMBOLS": ",".join(SYMBOLS),
            "METRICS_PORT": str(free_port()),
            "TICK_MS": str(TICK_MS),
            "DELTA_MS": str(DELTA_MS),
            "LOG_LEVEL": "INFO",
        }
        if name == "ingest":
            env.update(
                {
                    "COINBASE_WS_URL": self.feed.url,
                    "FEED": "coinbase-advanced",
                    "HEARTBEAT_TIMEOUT_SECONDS": "1.5",
                    "BACKOFF_INITIAL_SECONDS": "0.2",
                    "BACKOFF_MAX_SECONDS": "1.0",
                }
            )
        elif name == "lake-sink":
            env.update({"LAKE_URI": str(self.lake_dir), "LAKE_FLUSH_SECONDS": "1", "LAKE_FLUSH_BYTES": "200000"})
        elif name == "inference":
            if self.config.mlflow_tracking_uri:
                env["MLFLOW_TRACKING_URI"] = self.config.mlflow_tracking_uri
            model = self.config.model_uri or f"models:/absent-{uuid.uuid4().hex[:6]}@champion"
            env.update({"MODEL_URI": model, "CHALLENGER_URI": model.replace("@champion", "@challenger")})
            env["MODEL_POLL_SECONDS"] = "0.5"
        env.update(self.config.common_env)
        env.update(self.config.extra_env.get(name, {}))
        return env

    def start(self) -> Pipeline:
        from quotewatch.core.kafka import ensure_topics

        ensure_topics(make_admin(self.settings), self.config.prefix)
        self.feed.start()
        for name in self.config.services:
            service = ServiceProcess(name, ["run", name], self._env(name), self.config.workdir)
            self.services[name] = service.start()
        for service in self.services.values():
            wait_for(partial(_healthy, service), timeout=120, interval=0.2, message=f"{service.name}'s /health")
        return self

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    def wait_progress(self, name: str, more: int, timeout: float = 90.0, liveness_grace: float | None = None) -> None:
        """Wait until ``name`` has processed ``more`` records beyond what it reports now.

        With ``liveness_grace``, act as an orchestrator meanwhile (see :meth:`liveness_probe`);
        records processed by a restarted process count from zero.
        """
        service = self.services[name]
        start = max(0, service.records_processed())

        def progressed() -> bool:
            nonlocal start
            if liveness_grace is not None and name in self.liveness_probe(liveness_grace):
                start = 0
            if liveness_grace is not None and not service.alive:
                return False  # exited: restarted at the next probe
            return service.assert_alive() and service.records_processed() >= start + more

        wait_for(progressed, timeout=timeout, interval=0.2, message=f"{name} to process {more} more records")

    def restarts_since(self, before: Counter[tuple[str, str]]) -> list[str]:
        """``service (why)`` of each restart since :attr:`restarts` was ``before``."""
        return [f"{name} ({why})" for (name, why), n in sorted((self.restarts - before).items()) for _ in range(n)]

    def liveness_probe(self, grace: float, startup: float = 30.0) -> list[str]:
        """Do what an orchestrator (Kubernetes: restartPolicy Always + a liveness probe on /health)
        does: start again a service that exited, and restart (SIGKILL, start) one whose /health has
        said "unhealthy" for ``grace`` seconds in a row. Returns the services restarted now.

        A process started less than ``startup`` seconds ago is left to start (a startup probe's job).
        """
        restarted = []
        now = time.monotonic()
        for name, service in self.services.items():
            if not service.alive:
                assert service.process is not None
                self.restarts[(name, f"exited with {service.process.returncode}")] += 1
                service.start()
                restarted.append(name)
                continue
            if now - service.started_at < startup:
                continue
            health = service.health()
            if health.healthy:
                self._unhealthy_since.pop(name, None)
                continue
            since = self._unhealthy_since.setdefault(name, now)
            if now - since >= grace:
                service.kill()
                service.start()
                self.restarts[(name, f"/health: {health.body.get('reason', 'no answer')}")] += 1
                self._unhealthy_since.pop(name, None)
                restarted.append(name)
        return restarted

    def finish(self, timeout: float = 240.0) -> None:
        """End the input (SIGTERM the ingest), wait until every stage committed all of its input,
        then SIGTERM the other services; each must exit 0."""
        codes: dict[str, int | None] = {}
        if "ingest" in self.services:
            codes["ingest"] = self.services["ingest"].stop()
        stages = [
            ("book", [self.names.md_events]),
            ("labeler", [self.names.book_top3]),
            ("inference", [self.names.features, self.names.labels]),
            ("lake-sink", [spec.name(self.config.prefix) for spec in LAKE_TOPICS]),
        ]
        for name, inputs in stages:
            if name not in self.services:
                continue
            service = self.services[name]
            group = f"{self.config.prefix}.{name}"
            ends = {topic: last_data_offsets(self.settings, topic) for topic in inputs}
            wait_for(
                partial(_alive_and_committed, service, self.settings, group, ends),
                timeout=timeout,
                interval=0.5,
                message=f"{name} to commit all of its input",
            )
        for name, service in self.services.items():
            if name != "ingest":
                codes[name] = service.stop()
        bad = {name: code for name, code in codes.items() if code not in (0, None)}
        assert not bad, f"services did not exit cleanly: {bad}; " + "; ".join(
            f"{n}: {self.services[n].log_tail(1500)}" for n in bad
        )

    def close(self) -> None:
        for service in self.services.values():
            service.close()
        with contextlib.suppress(RuntimeError):  # never started
            self.feed.stop()


def _healthy(service: ServiceProcess) -> bool:
    return service.assert_alive() and service.health().healthy


def _alive_and_committed(
    service: ServiceProcess, settings: CommonSettings, group: str, ends: Mapping[str, Mapping[int, int]]
) -> bool:
    lasts = {(topic, p): last for topic, by_partition in ends.items() for p, last in by_partition.items()}
    return service.assert_alive() and committed_past(settings, group, lasts)


# -- reading topics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    """One committed record: coordinates, raw bytes, and the decoded value (None: it does not decode)."""

    topic: str
    partition: int
    offset: int
    key: str | None
    raw: bytes
    value: Record | None


def read_all(settings: CommonSettings, topic: str, timeout: float = 120.0) -> list[Rec]:
    """Every committed record of ``topic`` up to its end offsets at the time of the call, in
    partition/offset order; undecodable records are kept with ``value=None``."""
    serde = AvroSerde()
    consumer = Consumer(consumer_config(settings, f"faults-{uuid.uuid4().hex[:8]}", "faults-reader"))
    out: list[Rec] = []
    try:
        partitions = sorted(make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: query_watermarks(consumer, TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            messages = consumer.consume(1000, 0.2)
            if not messages:
                # Transaction markers are never delivered: a position at the end counts as done.
                for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                    if tp.offset >= ends[tp.partition] - 1:
                        pending.discard(tp.partition)
                continue
            for message in messages:
                if message.error():
                    continue
                partition, offset = message.partition() or 0, message.offset() or 0
                if offset < ends[partition]:
                    raw = message.value() or b""
                    try:
                        value: Record | None = serde.decode(raw, topic)
                    except Exception:  # noqa: BLE001 - a poison record is kept undecoded
                        value = None
                    key = message.key()
                    out.append(Rec(topic, partition, offset, key.decode() if key else None, raw, value))
                if offset + 1 >= ends[partition]:
                    pending.discard(partition)
        assert not pending, f"did not reach the end of {topic} partitions {pending}"
    finally:
        consumer.close()
    return sorted(out, key=lambda r: (r.partition, r.offset))


def last_data_offsets(settings: CommonSettings, topic: str) -> dict[int, int]:
    """Per partition, the offset of the last committed record (-1 for an empty partition)."""
    last: dict[int, int] = {}
    for record in read_all(settings, topic):
        last[record.partition] = max(last.get(record.partition, -1), record.offset)
    return last


# -- the exactly-once check ------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What :func:`verify_pipeline` found."""

    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, lost: int = 0, duplicated: int = 0, mismatched: int = 0) -> None:
        self.lost += lost
        self.duplicated += duplicated
        if lost or duplicated or mismatched:
            self.problems.append(f"{what}: {lost} lost, {duplicated} duplicated, {mismatched} differ")

    @property
    def ok(self) -> bool:
        return not self.problems


def _compare(
    verdict: Verdict, what: str, expected: Iterable[tuple[Any, Any]], actual: Iterable[tuple[Any, Any]]
) -> None:
    """Expected vs actual (key, value) records: missing keys are lost, repeated keys duplicated."""
    want = dict(expected)
    seen: Counter[Any] = Counter()
    got: dict[Any, Any] = {}
    for key, value in actual:
        seen[key] += 1
        got[key] = value
    lost = sum(1 for key in want if key not in got)
    duplicated = sum(count - 1 for count in seen.values() if count > 1)
    extra = sum(1 for key in got if key not in want)
    mismatched = sum(1 for key, value in want.items() if key in got and repr(got[key]) != repr(value))
    verdict.add(what, lost=lost, duplicated=duplicated + extra, mismatched=mismatched)
    verdict.counts[what] = len(want)


def _plain(value: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if not k.startswith("_")}


def verify_pipeline(
    settings: CommonSettings,
    lake_dir: Path | None,
    *,
    services: Iterable[str] = STREAM_SERVICES,
    poison: Iterable[tuple[str, int, int]] = (),
) -> Verdict:
    """Every offset exactly once downstream (see the module docstring). ``poison`` = (topic, partition,
    offset) of records injected on purpose: they must be in no output and in no lake file."""
    services = set(services)
    names = TopicNames(settings.topic_prefix)
    verdict = Verdict()
    poisoned = set(poison)
    topics = {spec.suffix: read_all(settings, spec.name(settings.topic_prefix)) for spec in LAKE_TOPICS}

    def decoded(suffix: str) -> list[Rec]:
        out = []
        for record in topics[suffix]:
            if record.value is None:
                if (record.topic, record.partition, record.offset) not in poisoned:
                    verdict.add(f"{record.topic}[{record.partition}]@{record.offset} does not decode", mismatched=1)
                continue
            out.append(record)
        return out

    def decoded_as(suffix: str, cls: type[R]) -> list[tuple[int, R]]:
        """``(offset, value)`` of the records of ``suffix`` that decode, each checked to be a ``cls``."""
        out: list[tuple[int, R]] = []
        for record in decoded(suffix):
            if not isinstance(record.value, cls):
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                verdict.add(f"{where} is a {type(record.value).__name__}, not a {cls.__name__}", mismatched=1)
                continue
            out.append((record.offset, record.value))
        return out

    # md.raw: each connection's frames are logged once each, in order, with no hole.
    frames: dict[str, list[int]] = defaultdict(list)
    for _, raw in decoded_as("md.raw", RawFrame):
        if raw.kind == "FRAME":
            frames[raw.connection_id].append(raw.frame_index)
    for connection, indexes in frames.items():
        counts = Counter(indexes)
        holes = (max(indexes) + 1) - len(counts)
        verdict.add(f"md.raw frames of {connection}", lost=holes, duplicated=sum(c - 1 for c in counts.values()))
    verdict.counts["md.raw frames"] = sum(len(v) for v in frames.values())

    events = decoded_as("md.events", MarketEvent)
    verdict.counts["md.events"] = len(events)
    if "book" in services:
        pipeline = BookPipeline(TICK_MS)
        expected_tops: list[BookTop] = []
        expected_features: list[FeatureVector] = []
        for offset, event in events:
            for tick in pipeline.process(event, offset):
                expected_tops.append(tick.book_top)
                if tick.features is not None:
                    expected_features.append(tick.features)
        _compare(
            verdict,
            "book.top3",
            (((r.symbol, r.ts_event), r) for r in expected_tops),
            (((r.symbol, r.ts_event), r) for _, r in decoded_as("book.top3", BookTop)),
        )
        _compare(
            verdict,
            "features",
            (((r.symbol, r.ts_event), r) for r in expected_features),
            (((r.symbol, r.ts_event), r) for _, r in decoded_as("features", FeatureVector)),
        )
    if "labeler" in services:
        labeler = Labeler(DELTA_MS, TICK_MS)
        expected_labels = []
        for offset, top in decoded_as("book.top3", BookTop):
            label = labeler.process(top, offset)
            if label is not None:
                expected_labels.append(label)
        _compare(
            verdict,
            "labels",
            (((r.symbol, r.t_event), r) for r in expected_labels),
            (((r.symbol, r.t_event), r) for _, r in decoded_as("labels", Label)),
        )
    if "inference" in services:
        served = [p for _, p in decoded_as("predictions", Prediction) if p.model_role != "CHALLENGER"]
        _compare(
            verdict,
            "predictions (served)",
            (((f.symbol, f.ts_event), f.ts_init) for _, f in decoded_as("features", FeatureVector)),
            (((p.symbol, p.ts_event), p.ts_init) for p in served),
        )
    if "lake-sink" in services and lake_dir is not None:
        serde = AvroSerde()
        infos = {info.topic: info for info in lake.lake_info(str(lake_dir))}
        for suffix, records in topics.items():
            topic = f"{settings.topic_prefix}.{suffix}"
            wanted = {(r.partition, r.offset): r for r in records if r.value is not None}
            if not wanted and topic not in infos:
                continue
            table = lake.open_dataset(str(lake_dir), topic).to_table()
            rows = table.to_pylist()
            seen = Counter((row["_partition"], row["_offset"]) for row in rows)
            lost = sum(1 for key in wanted if key not in seen)
            duplicated = sum(c - 1 for c in seen.values() if c > 1) + sum(1 for key in seen if key not in wanted)
            mismatched = 0
            for row in rows:
                found = wanted.get((row["_partition"], row["_offset"]))
                if found is None:
                    continue
                value = serde.decode_datum(found.raw, topic)  # the Avro datum: what the lake row holds
                if repr({k: row[k] for k in value}) != repr(value) or row["_key"] != found.key:
                    mismatched += 1
            verdict.add(f"lake {topic}", lost=lost, duplicated=duplicated, mismatched=mismatched)
            info = infos.get(topic)
            if info is not None and not info.healthy:
                verdict.add(f"lake {topic} coverage (holes/overlaps/incomplete chunks)", mismatched=1)
            verdict.counts[f"lake {suffix}"] = len(rows)
    del names
    return verdict
