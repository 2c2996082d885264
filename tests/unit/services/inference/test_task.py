"""The inference task without a broker: predictions, shadow scoring, the fallback, snapshots, live metrics."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from msgspec.structs import replace
from prometheus_client import REGISTRY

from quotewatch.core.clock import FakeClock
from quotewatch.core.records import FeatureVector, Label, Prediction, Snapshot
from quotewatch.core.runtime import InRecord, OutRecord
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market import features as spec
from quotewatch.domain.ml import evaluation as ev
from quotewatch.domain.ml.live_lift import live_lift
from quotewatch.domain.ml.models import FALLBACK_MODEL_NAME, positive_probability
from quotewatch.services.inference.models import FeatureSample, ModelManager
from quotewatch.services.inference.task import InferenceTask
from tests.records import checked
from tests.unit.services.inference.conftest import FakeRegistry, loaded
from tests.unit.services.trainer.market_data import kafka_partition, synthetic_ticks

NAMES = TopicNames("qw")


def task_for(manager: ModelManager, sample: FeatureSample, **options: Any) -> InferenceTask:
    return InferenceTask(topics=NAMES, manager=manager, sample=sample, clock=FakeClock(), **options)


def feed(task: InferenceTask, topic: str, records: Sequence[FeatureVector | Label]) -> list[OutRecord]:
    outputs: list[OutRecord] = []
    for offset, value in enumerate(records):
        outputs.extend(task.process(InRecord(topic, 0, offset, value.symbol, value, 0)))
    return outputs


def predictions(outputs: list[OutRecord]) -> list[Prediction]:
    return [checked(out.value, Prediction) for out in outputs if out.topic == NAMES.predictions]


def snapshots(outputs: list[OutRecord]) -> list[Snapshot]:
    out = [out.value for out in outputs if out.topic == NAMES.snapshot]
    assert all(isinstance(value, Snapshot) for value in out)
    return out  # type: ignore[return-value]  # checked just above


@pytest.fixture(scope="module")
def ticks() -> tuple[list[FeatureVector], list[Label]]:
    return synthetic_ticks(60)


def test_without_a_champion_the_fallback_serves_and_learns_from_labels(
    make_manager: Callable[..., Any], ticks: Any
) -> None:
    features, labels = ticks
    manager, _, sample = make_manager()
    task = task_for(manager, sample)
    first = feed(task, NAMES.features, features[:100])
    preds = predictions(first)
    assert len(preds) == 100, "one prediction per feature vector"
    assert {(p.model_role, p.model_name, p.model_version) for p in preds} == {
        ("FALLBACK", FALLBACK_MODEL_NAME, "online-0")
    }
    assert {p.p_change for p in preds} == {0.5}
    for pred, vector in zip(preds, features[:100], strict=True):
        assert (pred.ts_event, pred.ts_init, pred.symbol) == (
            vector.ts_event,
            vector.ts_init,
            vector.symbol,
        )
        assert pred.feature_spec_id == spec.FEATURE_SPEC_ID
        assert pred.exchange == "coinbase"
    labelled = [
        label for label in labels if (label.symbol, label.t_event) in {(f.symbol, f.ts_event) for f in features[:100]}
    ]
    assert feed(task, NAMES.labels, labelled) == []
    assert task.fallback.learned == len(labelled)
    later = predictions(feed(task, NAMES.features, features[100:101]))
    assert later[0].model_version == f"online-{len(labelled)}"


def test_labels_not_synced_over_the_horizon_are_neither_learnt_nor_counted(
    make_manager: Callable[..., Any], ticks: Any
) -> None:
    features, labels = ticks
    manager, _, sample = make_manager()
    task = task_for(manager, sample)
    feed(task, NAMES.features, features[:100])
    keys = {(f.symbol, f.ts_event) for f in features[:100]}
    labelled = [label for label in labels if (label.symbol, label.t_event) in keys]
    unsynced = {id(label) for label in labelled[::3]}
    flagged = [msgspec.structs.replace(label, synced_over_horizon=id(label) not in unsynced) for label in labelled]
    feed(task, NAMES.labels, flagged)
    synced = len(labelled) - len(unsynced)
    assert task.fallback.learned == synced
    assert task.tracker.excluded_unsynced == len(unsynced)
    assert [(m.model_role, m.n_labels) for m in task.tracker.summary()] == [("FALLBACK", synced)]


def test_the_champion_scores_each_vector_and_the_challenger_in_shadow(
    registry: FakeRegistry, make_manager: Callable[..., Any], ticks: Any
) -> None:
    features, _ = ticks
    registry.versions.update({"1": loaded("1"), "2": loaded("2")})
    registry.aliases.update({"champion": "1", "challenger": "2"})
    manager, _, sample = make_manager()
    manager.check_now()
    task = task_for(manager, sample)
    outputs = feed(task, NAMES.features, features[:50])
    preds = predictions(outputs)
    champion = [p for p in preds if p.model_role == "CHAMPION"]
    challenger = [p for p in preds if p.model_role == "CHALLENGER"]
    assert len(champion) == len(challenger) == 50
    x = np.asarray([f.values for f in features[:50]])
    expected = positive_probability(registry.versions["1"].model, x)  # type: ignore[union-attr]
    for one, vector in enumerate(features[:50]):
        assert champion[one].p_change == pytest.approx(expected[one], abs=1e-12)
        assert (champion[one].model_name, champion[one].model_version) == ("quotewatch", "1")
        assert challenger[one].model_version == "2"
        assert champion[one].ts_event == challenger[one].ts_event == vector.ts_event
    snaps = snapshots(outputs)
    assert len(snaps) == 50
    assert snaps[-1].p_change == champion[-1].p_change
    assert snaps[-1].challenger_p_change == challenger[-1].p_change
    assert (snaps[-1].model_version, snaps[-1].model_role) == ("1", "CHAMPION")


def test_a_prediction_depends_only_on_the_record_and_the_version(
    registry: FakeRegistry, make_manager: Callable[..., Any], ticks: Any
) -> None:
    features, labels = ticks
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    runs: list[list[Prediction]] = []
    for _ in range(2):
        manager, _, sample = make_manager()
        manager.check_now()
        task = task_for(manager, sample)
        # Labels interleaved differently in each run change nothing for a registry model.
        feed(task, NAMES.labels, labels[: 40 * len(runs)])
        runs.append(predictions(feed(task, NAMES.features, features[:80])))
    assert runs[0] == runs[1]


def test_vectors_of_another_spec_or_an_invalid_output_fall_back_and_are_counted(
    registry: FakeRegistry, make_manager: Callable[..., Any], ticks: Any
) -> None:
    features, _ = ticks
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    manager, _, sample = make_manager()
    manager.check_now()
    task = task_for(manager, sample)
    other_spec = replace(features[0], feature_spec_id="qw-features-v0-old")
    with_nan = replace(features[1], values=(math.nan, *features[1].values[1:]))
    preds = predictions(feed(task, NAMES.features, [other_spec, with_nan, features[2]]))
    assert [p.model_role for p in preds] == ["FALLBACK", "FALLBACK", "CHAMPION"]
    assert task.spec_mismatches == 1
    assert task.invalid_outputs == 1, "sklearn refuses NaN input: that vector is scored by the fallback"


def test_a_bad_label_is_refused_for_the_dead_letter_topic(make_manager: Callable[..., Any], ticks: Any) -> None:
    _, labels = ticks
    manager, _, sample = make_manager()
    task = task_for(manager, sample)
    with pytest.raises(ValueError, match="is not 0 or 1"):
        feed(task, NAMES.labels, [replace(labels[0], label=2)])
    with pytest.raises(ValueError, match="does not consume"):
        task.process(InRecord("qw.book.top3", 0, 0, "BTC-USD", labels[0], 0))


def test_snapshots_carry_features_book_metrics_rate_and_lag(
    registry: FakeRegistry, make_manager: Callable[..., Any], ticks: Any
) -> None:
    features, labels = ticks
    registry.versions["1"] = loaded("1")
    registry.aliases["champion"] = "1"
    manager, _, sample = make_manager()
    manager.check_now()
    task = task_for(manager, sample, consumer_lag=lambda: 42, lift_every_ms=1, lift_resamples=50)
    btc = [f for f in features if f.symbol == "BTC-USD"]
    outputs = feed(task, NAMES.features, btc[:200])
    btc_labels = [label for label in labels if label.symbol == "BTC-USD"][:150]
    feed(task, NAMES.labels, btc_labels)
    last_snapshot = snapshots(feed(task, NAMES.features, btc[200:201]))[0]
    vector = btc[200]
    assert last_snapshot.feature_names == spec.FEATURE_NAMES
    assert last_snapshot.feature_values == vector.values
    assert last_snapshot.bids == vector.bids
    assert last_snapshot.asks == vector.asks
    assert last_snapshot.updates_per_second == vector.values[spec.FEATURE_INDEX["updates_1000ms"]]
    assert last_snapshot.consumer_lag == 42
    assert last_snapshot.feed_state == vector.feed_state
    (metrics,) = last_snapshot.live_metrics
    preds = {(p.symbol, p.ts_event): p.p_change for p in predictions(outputs)}
    joined = [(lb.label, preds[(lb.symbol, lb.t_event)]) for lb in btc_labels if (lb.symbol, lb.t_event) in preds]
    assert len(joined) > 100
    expected = ev.score([y for y, _ in joined], [p for _, p in joined])
    assert metrics.n_labels == len(joined)
    assert (metrics.model_version, metrics.model_role) == ("1", "CHAMPION")
    assert metrics.auc == pytest.approx(expected.roc_auc)
    assert metrics.brier == pytest.approx(expected.brier)
    assert metrics.balanced_accuracy == pytest.approx(expected.balanced_accuracy)
    assert metrics.base_rate == pytest.approx(expected.base_rate)
    # The champion's live lift over the rolling frequency, recomputed at the last label (LIFT_EVERY_MS=1 ms).
    rows = [(lb.symbol, lb.t_event, lb.label, preds[(lb.symbol, lb.t_event)]) for lb in btc_labels]
    lift = live_lift(*map(list, zip(*rows, strict=True)), delta_ms=500, tick_ms=100, resamples=50)
    assert lift.rows == len(joined)
    assert (metrics.lift, metrics.lift_low, metrics.lift_high) == (lift.lift.estimate, lift.lift.low, lift.lift.high)
    assert metrics.lift is not None
    assert metrics.lift_rows == len(joined)
    assert metrics.lift_flagged == task.lift.flagged
    assert (metrics.lift_below_zero_since_ns is not None) == (metrics.lift < 0)
    gauge = REGISTRY.get_sample_value(
        "quotewatch_champion_live_lift", {"service": "inference", "statistic": "estimate"}
    )
    assert gauge == metrics.lift
    flag = REGISTRY.get_sample_value("quotewatch_champion_lift_below_zero", {"service": "inference"})
    assert flag == float(metrics.lift_flagged)


def test_snapshot_interval_is_in_event_time(make_manager: Callable[..., Any], ticks: Any) -> None:
    features, _ = ticks
    manager, _, sample = make_manager()
    task = task_for(manager, sample, snapshot_interval_ms=500)
    btc = [f for f in features if f.symbol == "BTC-USD"][:50]
    snaps = snapshots(feed(task, NAMES.features, btc))
    assert [s.ts_event for s in snaps] == [f.ts_event for f in btc[::5]]


def test_the_warm_up_batch_comes_from_the_stream(make_manager: Callable[..., Any], ticks: Any) -> None:
    features, _ = ticks
    manager, _, sample = make_manager()
    task = task_for(manager, sample)
    feed(task, NAMES.features, features[:40])
    spec_id, batch = sample.spec_and_batch()
    assert spec_id == spec.FEATURE_SPEC_ID
    assert batch.shape == (32 + 4, len(spec.FEATURE_NAMES))
    assert tuple(batch[31].tolist()) == features[39].values


# -- re-processing after an aborted transaction -------------------------------------------------------

Coordinates = tuple[str, int, int]


def arrivals(seconds: int = 60) -> list[InRecord]:
    """Feature vectors and labels as inference consumes them live: in event time, a label Δ after its
    tick; each symbol on its Kafka partition, offsets counting per (topic, partition)."""
    features, labels = synthetic_ticks(seconds)
    events = sorted(
        [(f.ts_event, 0, NAMES.features, f) for f in features] + [(lb.ts_event, 1, NAMES.labels, lb) for lb in labels],
        key=lambda event: (event[0], event[1]),
    )
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    records = []
    for _, _, topic, value in events:
        partition = kafka_partition(value.symbol)
        records.append(InRecord(topic, partition, offsets[(topic, partition)], value.symbol, value, 0))
        offsets[(topic, partition)] += 1
    return records


class Processor:
    """The calls :class:`quotewatch.core.runtime.StreamProcessor` makes on its task, without a broker.

    A batch: ``process`` per record (an exception dead-letters it), then, while committing,
    ``restart_offset`` for each partition in the batch. When the transaction aborts, ``_rewind``
    calls ``reset`` for every assigned partition and the records since the last commit come again.
    Only the outputs of committed batches are kept, per input record.
    """

    def __init__(self, task: InferenceTask, assigned: list[tuple[str, int]]) -> None:
        self.task = task
        self.assigned = assigned
        self.committed: dict[Coordinates, list[Any]] = {}
        self.handed_over = 0

    def batch(self, records: list[InRecord], *, aborts: bool = False) -> None:
        outputs: dict[Coordinates, list[Any]] = {}
        for record in records:
            self.handed_over += 1
            try:
                produced = [(out.topic, out.key, canonical(out.value)) for out in self.task.process(record)]
            except ValueError as exc:
                produced = [("dead letter", type(exc).__name__, str(exc))]
            outputs[(record.topic, record.partition, record.offset)] = produced
        for topic, partition in sorted({(record.topic, record.partition) for record in records}):
            self.task.restart_offset(topic, partition)
        if aborts:
            for topic, partition in self.assigned:
                self.task.reset(topic, partition)
            return
        for coordinates, produced in outputs.items():
            assert coordinates not in self.committed, f"{coordinates} committed twice"
            self.committed[coordinates] = produced


def canonical(value: Any) -> str:
    """A record's value for comparison (NaN compares equal to NaN here)."""
    return json.dumps(msgspec.to_builtins(value), sort_keys=True, default=str)


def assigned_partitions(records: list[InRecord]) -> list[tuple[str, int]]:
    return sorted({(record.topic, record.partition) for record in records})


def state(task: InferenceTask, probe: list[float]) -> dict[str, Any]:
    return {
        "fallback": (task.fallback.version, task.fallback.predict(probe)),
        "joined": task.tracker.joined,
        "live_metrics": canonical(task.tracker.summary()),
        "spec_mismatches": task.spec_mismatches,
    }


def fresh_processor(records: list[InRecord], make_manager: Callable[..., Any], **options: Any) -> Processor:
    """A task of its own (``options`` as for :func:`task_for`) over the partitions of ``records``."""
    manager, _, sample = make_manager()
    return Processor(task_for(manager, sample, **options), assigned_partitions(records))


def uninterrupted(records: list[InRecord], snapshot_interval_ms: int, make_manager: Callable[..., Any]) -> Processor:
    """The same records, each processed once, one committed batch each, by a task of its own."""
    processor = fresh_processor(records, make_manager, snapshot_interval_ms=snapshot_interval_ms)
    for record in records:
        processor.batch([record])
    return processor


def assert_as_uninterrupted(processor: Processor, reference: Processor, records: list[InRecord]) -> None:
    """The committed outputs and the task's state are those of the uninterrupted ``reference``."""
    assert processor.committed == reference.committed, "the committed outputs are those of an uninterrupted run"
    probe = records[0].value.values
    assert state(processor.task, probe) == state(reference.task, probe)


@pytest.mark.parametrize("batch_size", [1, 500], ids=["live batches of 1", "catch-up batches of 500"])
@pytest.mark.parametrize("snapshot_interval_ms", [0, 500])
def test_records_handed_over_again_after_an_aborted_transaction_give_the_outputs_and_state_of_an_uninterrupted_run(
    make_manager: Callable[..., Any], batch_size: int, snapshot_interval_ms: int
) -> None:
    records = arrivals()
    reference = uninterrupted(records, snapshot_interval_ms, make_manager)
    processor = fresh_processor(records, make_manager, snapshot_interval_ms=snapshot_interval_ms)
    batches = [records[start : start + batch_size] for start in range(0, len(records), batch_size)]
    aborted = set(range(1, len(batches), max(1, len(batches) // 6)))
    for index, batch in enumerate(batches):
        if index in aborted:
            processor.batch(batch, aborts=True)
            if index % 2:
                processor.batch(batch, aborts=True)  # the transaction of the re-processing aborts too
        processor.batch(batch)
    assert processor.handed_over > len(records), "records were handed over again"
    assert processor.task.fallback.learned > 100, "the fallback learnt from the labels"
    assert_as_uninterrupted(processor, reference, records)


def test_a_rebalance_after_a_commit_keeps_the_state(make_manager: Callable[..., Any]) -> None:
    """reset() after a commit that went through (a rebalance): nothing comes again, nothing is lost."""
    records = arrivals(20)
    reference = uninterrupted(records, 500, make_manager)
    processor = fresh_processor(records, make_manager, snapshot_interval_ms=500)
    half = len(records) // 2
    processor.batch(records[:half])
    for topic, partition in processor.assigned:  # revoked, then assigned again
        processor.task.reset(topic, partition)
    processor.batch(records[half:])
    assert_as_uninterrupted(processor, reference, records)


def test_after_an_abort_the_records_may_come_back_in_another_order_with_new_ones(
    make_manager: Callable[..., Any],
) -> None:
    """Each record changes the state once, in the order it was first processed; a new record comes after."""
    records = arrivals(30)
    first, aborted, rest = records[:600], records[600:900], records[900:]
    more, rest = rest[:100], rest[100:]
    # Re-read from the committed offsets: the consumer may serve the partitions in another order.
    again = sorted(aborted + more, key=lambda record: (record.topic != NAMES.labels, record.partition))
    processor = fresh_processor(records, make_manager, snapshot_interval_ms=500)
    processor.batch(first)
    processor.batch(aborted, aborts=True)
    processor.batch(again)
    processor.batch(rest)
    reference = uninterrupted(
        first + aborted + [record for record in again if record in more] + rest, 500, make_manager
    )
    assert_as_uninterrupted(processor, reference, records)


def test_records_of_an_aborted_batch_may_come_again_after_commits_of_other_partitions(
    make_manager: Callable[..., Any],
) -> None:
    """A commit covers only the partitions of its batch, up to their last offset in it.

    The aborted batch held labels, served first, and the features they label (so the fallback did
    not learn them: their vectors came later). Then the consumer serves the features (their batch
    commits), half the labels (cut inside a partition), then the rest: every label of the aborted
    batch comes again after a commit went through, and must not be learnt now.
    """
    records = arrivals(30)
    first, aborted, rest = records[:600], records[600:900], records[900:]
    aborted = sorted(aborted, key=lambda record: record.topic != NAMES.labels)
    features_again = [record for record in aborted if record.topic == NAMES.features]
    labels_again = [record for record in aborted if record.topic == NAMES.labels]
    half = len(labels_again) // 2
    processor = fresh_processor(records, make_manager, snapshot_interval_ms=500)
    processor.batch(first)
    processor.batch(aborted, aborts=True)
    processor.batch(features_again)
    processor.batch(labels_again[:half])
    processor.batch(labels_again[half:] + rest)
    reference = uninterrupted(first + aborted + rest, 500, make_manager)
    assert_as_uninterrupted(processor, reference, records)


def test_a_record_dead_lettered_in_an_aborted_batch_is_refused_again_and_changes_nothing(
    make_manager: Callable[..., Any],
) -> None:
    records = arrivals(20)
    label_at = next(i for i, record in enumerate(records) if record.topic == NAMES.labels)
    bad = records[label_at]
    records[label_at] = InRecord(bad.topic, bad.partition, bad.offset, bad.key, replace(bad.value, label=2), 0)
    reference = uninterrupted(records, 0, make_manager)
    processor = fresh_processor(records, make_manager)
    processor.batch(records[: label_at + 50], aborts=True)
    processor.batch(records[: label_at + 50])
    processor.batch(records[label_at + 50 :])
    assert processor.committed[(bad.topic, bad.partition, bad.offset)] == [
        ("dead letter", "ValueError", f"label 2 of {bad.value.symbol} at t={bad.value.t_event} is not 0 or 1")
    ]
    assert_as_uninterrupted(processor, reference, records)
