"""Inference on the real broker with the real MLflow registry: hot swaps mid-stream, refused champions,
webhook nudges and live metrics, with the task running in the exactly-once StreamProcessor.

The stream is the synthetic market through the real pipeline (features and labels); models are
registered on the session's MLflow server under a name of the test's own.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import CommonSettings, InferenceSettings
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import ShutdownSignal, ensure_topics, make_admin, make_producer
from quotewatch.core.metrics import MODEL_RELOADS
from quotewatch.core.records import FeatureVector, Label, Prediction, Snapshot
from quotewatch.core.runtime import InRecord, OutRecord, StreamProcessor, StreamTask
from quotewatch.core.runtime import processor as processor_module
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.ml import evaluation as ev
from quotewatch.domain.ml.registry import make_client, parse_model_uri
from quotewatch.domain.ml.webhooks import ensure_webhook
from quotewatch.services.inference.models import FeatureSample, ModelManager
from quotewatch.services.inference.task import InferenceTask
from quotewatch.services.inference.webhook import WebhookReceiver
from tests.broker.services.inference.registry_models import (
    corrupt_artifact,
    expected_p,
    fitted_lr,
    nan_model,
    register,
    set_alias,
)
from tests.conftest import MlflowServerInfo
from tests.helpers import read_topic, wait_for
from tests.unit.services.trainer.market_data import kafka_partition, synthetic_ticks

SERVICE = "test-inference"


@dataclass
class Running:
    settings: InferenceSettings
    manager: ModelManager
    task: InferenceTask
    names: TopicNames


@pytest.fixture
def model_name() -> str:
    return f"qw-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def inference_settings(
    make_settings: Callable[..., Any], mlflow_server: MlflowServerInfo, model_name: str
) -> InferenceSettings:
    settings: InferenceSettings = make_settings(
        InferenceSettings,
        mlflow_tracking_uri=mlflow_server.tracking_uri,
        model_uri=f"models:/{model_name}@champion",
        challenger_uri=f"models:/{model_name}@challenger",
        model_poll_seconds=0.5,
        live_metrics_window=100_000,
    )
    ensure_topics(make_admin(settings), settings.topic_prefix)
    return settings


@contextmanager
def running(
    settings: InferenceSettings,
    poll_seconds: float | None = None,
    *,
    snapshot_interval_ms: int = 0,
    wrap: Callable[[InferenceTask], StreamTask] | None = None,
) -> Iterator[Running]:
    """The inference task in the exactly-once processor, on a thread; ``wrap`` stands between them."""
    clock = SystemClock()
    sample = FeatureSample()
    manager = ModelManager(
        service=SERVICE,
        tracking_uri=settings.mlflow_tracking_uri,
        champion_uri=parse_model_uri(settings.model_uri),
        challenger_uri=parse_model_uri(settings.challenger_uri),
        poll_seconds=poll_seconds or settings.model_poll_seconds,
        clock=clock,
        sample=sample,
    )
    names = TopicNames(settings.topic_prefix)
    task = InferenceTask(
        topics=names,
        manager=manager,
        sample=sample,
        clock=clock,
        live_metrics_window=settings.live_metrics_window,
        snapshot_interval_ms=snapshot_interval_ms,
    )
    shutdown = ShutdownSignal()
    processor = StreamProcessor(
        settings=settings,
        service=SERVICE,
        task=task if wrap is None else wrap(task),
        input_topics=[names.features, names.labels],
        serde=AvroSerde(),
        clock=clock,
        shutdown=shutdown,
        liveness=Liveness(SERVICE, clock, 30),
        batch_size=200,
        poll_timeout=0.01,
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            processor.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test below
            errors.append(exc)

    manager.check_now()
    manager.start()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield Running(settings, manager, task, names)
    finally:
        shutdown.set()
        thread.join(60)
        manager.stop()
        assert not thread.is_alive(), "processor did not stop"
        assert not errors, errors


def produce(
    settings: CommonSettings,
    topic: str,
    records: Sequence[FeatureVector | Label],
    per_second: float = 0.0,
    halfway: threading.Event | None = None,
) -> None:
    """Produce ``records`` (paced at ``per_second`` if given); set ``halfway`` when half are sent."""
    serde = AvroSerde()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 1})
    started = time.monotonic()
    for index, record in enumerate(records):
        producer.produce(
            topic,
            key=record.symbol.encode(),
            value=serde.encode(topic, record),
            partition=kafka_partition(record.symbol),
        )
        if halfway is not None and index == len(records) // 2:
            producer.flush(10)
            halfway.set()
        if per_second:
            producer.poll(0)
            delay = started + index / per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the input stream, not synchronising the test
    assert producer.flush(30) == 0


def counted_above(counter: Any, value: float) -> bool:
    return bool(counter._value.get() > value)


def champion_predictions(settings: InferenceSettings, expected: int) -> list[dict[str, Any]]:
    names = TopicNames(settings.topic_prefix)

    def enough() -> list[dict[str, Any]] | None:
        records = [r for r in read_topic(settings, names.predictions) if r["model_role"] != "CHALLENGER"]
        return records if len(records) >= expected else None

    return wait_for(enough, timeout=180, interval=1.0, message=f"{expected} served predictions")


def test_fallback_then_champion_then_a_second_champion_mid_stream_without_losing_a_tick(
    inference_settings: InferenceSettings, mlflow_server: MlflowServerInfo, model_name: str
) -> None:
    settings = inference_settings
    uri = mlflow_server.tracking_uri
    features, _ = synthetic_ticks(30)
    first, second, third = features[:200], features[200:400], features[400:]
    models = {"1": fitted_lr(seed=5), "2": fitted_lr(seed=6, c=0.05)}
    assert register(uri, model_name, models["1"]) == "1"
    assert register(uri, model_name, models["2"]) == "2"
    with running(settings) as run:
        assert run.manager.serving.champion is None, "no alias yet: the fallback serves"
        produce(settings, run.names.features, first)
        champion_predictions(settings, len(first))
        set_alias(uri, model_name, "champion", "1")
        wait_for(lambda: run.manager.serving.champion is not None, timeout=90, message="v1 loaded")
        produce(settings, run.names.features, second)
        champion_predictions(settings, len(first) + len(second))
        # The second promotion lands while the third part of the stream is flowing.
        halfway = threading.Event()
        pacer = threading.Thread(target=produce, args=(settings, run.names.features, third, 25.0, halfway))
        pacer.start()
        assert halfway.wait(60)
        promoted_at = time.monotonic_ns()
        set_alias(uri, model_name, "champion", "2")
        wait_for(
            lambda: run.manager.serving.champion is not None and run.manager.serving.champion.version == "2",
            timeout=90,
            message="v2 loaded",
        )
        assert run.manager.last_detection is not None
        role, version, detected_at = run.manager.last_detection
        assert (role, version) == ("CHAMPION", "2")
        detected_after = (detected_at - promoted_at) / 1e9
        pacer.join(60)
        served = champion_predictions(settings, len(features))
    # Seen at the next poll (plus one registry lookup); the pinned version then loads in the background.
    assert detected_after < settings.model_poll_seconds + 2.0
    by_tick = defaultdict(list)
    for record in served:
        by_tick[(record["symbol"], record["ts_event"])].append(record)
    assert set(by_tick) == {(f.symbol, f.ts_event) for f in features}, "no tick missing"
    assert all(len(records) == 1 for records in by_tick.values()), "no tick twice"
    roles = {(f.symbol, f.ts_event): by_tick[(f.symbol, f.ts_event)][0] for f in features}
    assert {roles[(f.symbol, f.ts_event)]["model_role"] for f in first} == {"FALLBACK"}
    assert {roles[(f.symbol, f.ts_event)]["model_version"] for f in second} == {"1"}
    third_versions = [roles[(f.symbol, f.ts_event)]["model_version"] for f in third]
    assert third_versions[0] == "1"
    assert third_versions[-1] == "2"
    for symbol in {f.symbol for f in third}:
        sequence = [roles[(f.symbol, f.ts_event)]["model_version"] for f in third if f.symbol == symbol]
        switch = sequence.index("2")
        assert set(sequence[:switch]) == {"1"}
        assert set(sequence[switch:]) == {"2"}, "one clean switch per partition"
    for feature in second + third:
        record = roles[(feature.symbol, feature.ts_event)]
        assert record["p_change"] == pytest.approx(
            expected_p(models[record["model_version"]], feature.values), abs=1e-12
        )
        assert record["ts_init"] == feature.ts_init


def test_bad_champions_are_refused_counted_and_the_previous_one_keeps_serving(
    inference_settings: InferenceSettings, mlflow_server: MlflowServerInfo, model_name: str
) -> None:
    settings = inference_settings
    uri = mlflow_server.tracking_uri
    features, _ = synthetic_ticks(30)
    good = register(uri, model_name, fitted_lr(seed=5))
    set_alias(uri, model_name, "champion", good)
    corrupt = register(uri, model_name, fitted_lr(seed=6))
    corrupt_artifact(uri, mlflow_server.artifacts_dir, model_name, corrupt)
    bad_versions = {
        "corrupt artifact": corrupt,
        "wrong feature spec": register(uri, model_name, fitted_lr(seed=5), feature_spec_id="qw-features-v0-retired"),
        "emits NaN": register(uri, model_name, nan_model()),
    }
    failures = MODEL_RELOADS.labels(SERVICE, "failure")
    chunk = len(features) // (len(bad_versions) + 1)
    with running(settings) as run:
        assert run.manager.serving.champion is not None
        produce(settings, run.names.features, features[:chunk])
        for index, (why, version) in enumerate(bad_versions.items(), start=1):
            before = failures._value.get()
            set_alias(uri, model_name, "champion", version)
            wait_for(partial(counted_above, failures, before), timeout=90, message=f"refusal: {why}")
            produce(settings, run.names.features, features[index * chunk : (index + 1) * chunk])
        served = champion_predictions(settings, (len(bad_versions) + 1) * chunk)
        assert run.manager.serving.champion is not None
        assert run.manager.serving.champion.version == good
    assert {(r["model_role"], r["model_version"]) for r in served} == {("CHAMPION", good)}
    assert len(served) == (len(bad_versions) + 1) * chunk


def test_a_registry_webhook_makes_inference_switch_without_waiting_for_the_poll(
    inference_settings: InferenceSettings, mlflow_server: MlflowServerInfo, model_name: str
) -> None:
    settings = inference_settings
    uri = mlflow_server.tracking_uri
    set_alias(uri, model_name, "champion", register(uri, model_name, fitted_lr(seed=5)))
    second = register(uri, model_name, fitted_lr(seed=6))
    secret = uuid.uuid4().hex
    with running(settings, poll_seconds=3600) as run:
        receiver = WebhookReceiver("127.0.0.1", 0, secret, model_name, SystemClock(), run.manager.nudge).start()
        try:
            ensure_webhook(make_client(uri), f"test-{model_name}", receiver.url("127.0.0.1"), secret)
            set_alias(uri, model_name, "champion", second)
            wait_for(
                lambda: run.manager.serving.champion is not None and run.manager.serving.champion.version == second,
                timeout=90,
                message="switch on the webhook (the poll interval is an hour)",
            )
            assert receiver.accepted >= 1
            assert receiver.rejected == 0
        finally:
            receiver.stop()


def test_live_metrics_equal_metrics_computed_offline_on_the_same_predictions_and_labels(
    inference_settings: InferenceSettings, mlflow_server: MlflowServerInfo, model_name: str
) -> None:
    settings = inference_settings
    uri = mlflow_server.tracking_uri
    features, labels = synthetic_ticks(30)
    set_alias(uri, model_name, "champion", register(uri, model_name, fitted_lr(seed=5)))
    set_alias(uri, model_name, "challenger", register(uri, model_name, fitted_lr(seed=6, c=0.05)))
    with running(settings) as run:
        produce(settings, run.names.features, features)
        produce(settings, run.names.labels, labels)
        ticks = {(f.symbol, f.ts_event) for f in features}
        matched = sum((label.symbol, label.t_event) in ticks for label in labels)
        wait_for(lambda: run.task.tracker.joined == 2 * matched, timeout=180, interval=0.2, message="labels joined")
        joined = run.task.tracker.joined
        wait_for(
            lambda: len(read_topic(settings, run.names.predictions)) >= 2 * len(features),
            timeout=60,
            message="all predictions",
        )
        # One more feature vector after the last join: its snapshot carries the final metrics.
        tail = synthetic_ticks(31)[0][len(features) :][:1]
        produce(settings, run.names.features, tail)
        wait_for(
            lambda: any(s["ts_event"] == tail[0].ts_event for s in read_topic(settings, run.names.snapshot)),
            timeout=120,
            interval=1.0,
            message="last snapshot",
        )
    snapshot = next(s for s in read_topic(settings, run.names.snapshot) if s["ts_event"] == tail[0].ts_event)
    predictions = read_topic(settings, run.names.predictions)
    label_of = {(label.symbol, label.t_event): label.label for label in labels}
    by_model: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for record in predictions:
        key = (record["symbol"], record["ts_event"])
        if key in label_of:
            by_model[(record["model_name"], record["model_version"], record["model_role"])].append(
                (label_of[key], record["p_change"])
            )
    live = {(m["model_name"], m["model_version"], m["model_role"]): m for m in snapshot["live_metrics"]}
    assert set(live) == set(by_model)
    assert {role for _, _, role in live} == {"CHAMPION", "CHALLENGER"}
    assert sum(m["n_labels"] for m in live.values()) == joined
    for model, pairs in by_model.items():
        offline = ev.score([y for y, _ in pairs], [p for _, p in pairs])
        assert live[model]["n_labels"] == offline.n
        assert live[model]["auc"] == pytest.approx(offline.roc_auc, abs=1e-12)
        assert live[model]["brier"] == pytest.approx(offline.brier, abs=1e-12)
        assert live[model]["balanced_accuracy"] == pytest.approx(offline.balanced_accuracy, abs=1e-12)
        assert live[model]["base_rate"] == pytest.approx(offline.base_rate, abs=1e-12)


class RecordingTask:
    """The inference task as the processor drives it, noting every record handed over, in order."""

    def __init__(self, task: InferenceTask) -> None:
        self.task = task
        self.handed_over: list[InRecord] = []

    def process(self, record: InRecord) -> Iterable[OutRecord]:
        self.handed_over.append(record)
        return self.task.process(record)

    def restart_offset(self, topic: str, partition: int) -> int | None:
        return self.task.restart_offset(topic, partition)

    def reset(self, topic: str, partition: int) -> None:
        self.task.reset(topic, partition)

    def distinct(self) -> list[InRecord]:
        """Each record once, in the order it was first handed over."""
        first: dict[tuple[str, int, int], InRecord] = {}
        for record in list(self.handed_over):
            first.setdefault((record.topic, record.partition, record.offset), record)
        return list(first.values())


def taken(recording: RecordingTask, count: int) -> bool:
    return len(recording.distinct()) >= count


class AbortingProducer:
    """The processor's transactional producer, except that the commits numbered in ``fail`` (from 1)
    fail as librdkafka reports an abortable transaction error: the processor aborts and rewinds."""

    def __init__(self, producer: Producer, fail: set[int]) -> None:
        self._producer = producer
        self._fail = fail
        self.commits = 0
        self.failed = 0

    def commit_transaction(self, timeout: float = -1) -> None:
        self.commits += 1
        if self.commits in self._fail:
            self.failed += 1
            error = KafkaError(KafkaError._TIMED_OUT, "injected: the transaction timed out", txn_requires_abort=True)
            raise KafkaException(error)
        self._producer.commit_transaction(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def test_an_aborted_transaction_changes_neither_the_outputs_nor_the_state(
    inference_settings: InferenceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an abort the processor hands the records since the last commit over again.

    Served by the fallback (no champion registered), whose version names the labels it learnt, with
    a snapshot every 500 ms of event time. The committed predictions and snapshots, and the state,
    must be those of a task that took each record once, in the order it first came.
    """
    settings = inference_settings
    names = TopicNames(settings.topic_prefix)
    features, labels = synthetic_ticks(30)
    arrivals = sorted(
        [(f.ts_event, 0, names.features, f) for f in features] + [(lb.ts_event, 1, names.labels, lb) for lb in labels],
        key=lambda event: (event[0], event[1]),
    )
    producers: list[AbortingProducer] = []

    def aborting_producer(*args: Any, **kwargs: Any) -> AbortingProducer:
        producers.append(AbortingProducer(make_producer(*args, **kwargs), fail={2, 3, 5, 8, 9, 12}))
        return producers[-1]

    monkeypatch.setattr(processor_module, "make_producer", aborting_producer)
    recordings: list[RecordingTask] = []

    def recording(task: InferenceTask) -> RecordingTask:
        recordings.append(RecordingTask(task))
        return recordings[-1]

    serde = AvroSerde()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 1})
    with running(settings, snapshot_interval_ms=500, wrap=recording) as run:
        # In chunks, each taken before the next is sent: batches mix features with the labels of
        # earlier ticks, as live.
        chunk = len(arrivals) // 15 + 1
        for start in range(0, len(arrivals), chunk):
            for _, _, topic, value in arrivals[start : start + chunk]:
                producer.produce(
                    topic,
                    key=value.symbol.encode(),
                    value=serde.encode(topic, value),
                    partition=kafka_partition(value.symbol),
                )
            assert producer.flush(30) == 0
            sent = min(start + chunk, len(arrivals))
            wait_for(partial(taken, recordings[0], sent), timeout=60, message=f"{sent} records taken")
        champion_predictions(settings, len(features))
        live = run.task
    (aborting,) = producers
    assert aborting.failed == 6, f"{aborting.commits} commits"
    handed_over = recordings[0].handed_over
    distinct = recordings[0].distinct()
    assert len(distinct) == len(arrivals)
    assert len(handed_over) > len(distinct), "records were handed over again"
    attempted = read_topic(settings, names.predictions, isolation="read_uncommitted")
    assert len(attempted) > len(features), "aborted transactions held predictions"

    reference = InferenceTask(
        topics=names,
        manager=ModelManager(
            service=SERVICE,
            tracking_uri=None,
            champion_uri=parse_model_uri(settings.model_uri),
            challenger_uri=None,
            poll_seconds=60,
            clock=SystemClock(),
            sample=FeatureSample(),
        ),
        sample=FeatureSample(),
        clock=SystemClock(),
        live_metrics_window=settings.live_metrics_window,
        snapshot_interval_ms=500,
    )
    expected: dict[tuple[str, str, int], Any] = {}
    for record in distinct:
        for out in reference.process(record):
            output = out.value
            assert isinstance(output, Prediction | Snapshot), out
            key = (out.topic, output.symbol, output.ts_event)
            assert key not in expected
            if isinstance(output, Prediction):
                assert out.topic == names.predictions
                expected[key] = (output.model_version, output.p_change)
            else:
                metrics = [(m.model_version, m.n_labels, m.brier) for m in output.live_metrics]
                expected[key] = (output.model_version, output.p_change, metrics)
    assert reference.fallback.learned > 100, "the fallback learnt from labels that came after their vector"
    committed: dict[tuple[str, str, int], Any] = {}
    for prediction in read_topic(settings, names.predictions):
        key = (names.predictions, prediction["symbol"], prediction["ts_event"])
        assert key not in committed, f"prediction {key} twice"
        committed[key] = (prediction["model_version"], prediction["p_change"])
    for snapshot in read_topic(settings, names.snapshot):
        key = (names.snapshot, snapshot["symbol"], snapshot["ts_event"])
        assert key not in committed, f"snapshot {key} twice"
        metrics = [(m["model_version"], m["n_labels"], m["brier"]) for m in snapshot["live_metrics"]]
        committed[key] = (snapshot["model_version"], snapshot["p_change"], metrics)
    assert len(committed) == len(expected)
    assert committed == expected
    assert live.fallback.learned == reference.fallback.learned
    # As JSON (NaN == NaN there): the live metrics of every model, field for field.
    assert json.dumps(msgspec.to_builtins(live.tracker.summary()), sort_keys=True) == json.dumps(
        msgspec.to_builtins(reference.tracker.summary()), sort_keys=True
    )
