"""The inference stream task: feature vectors in, predictions and snapshots out; labels feed live metrics.

Who calls it: :class:`quotewatch.core.runtime.StreamProcessor` (``quotewatch run inference``),
one record at a time from one thread, over ``<prefix>.features`` and ``<prefix>.labels``.

For each ``FeatureVector`` x(t) it emits, in the same transaction:

- one ``Prediction`` from the champion (role CHAMPION), or from the built-in fallback (role
  FALLBACK) when no champion is loaded, the champion's feature spec is not the record's, or the
  champion gives no finite probability in [0, 1] for this vector (counted and logged);
- one more from the challenger (role CHALLENGER) when a challenger is loaded (shadow scoring:
  it never replaces the served p);
- one ``Snapshot`` of the symbol (every tick, or every SNAPSHOT_INTERVAL_MS of event time).

A prediction is a pure function of (feature record, model version), and the version is in the
record: ``ts_event`` = t, ``ts_init`` = the feature record's ``ts_init``. The fallback's version
``online-<n>`` names its state (n labels learnt, in the order they were consumed).

Each ``Label`` y(t) joins the predictions of (symbol, t) in the live-metrics tracker (rolling AUC,
Brier, balanced accuracy and base rate per model version, published in the snapshots) and is
learnt by the fallback from the feature vector it labels.

Topics are co-partitioned (same key = symbol, same partition count; the default range assignor
gives partition k of both topics to the same instance), so a symbol's labels reach the instance
that scored its features.

**Re-processing after an aborted transaction.** The processor then calls
:meth:`InferenceTask.reset` for every partition and hands the records since each partition's last
commit over again (so it does after a transient failure mid-batch). The state (live metrics, the
fallback, the last snapshot times, the warm-up sample) is shared by all symbols and partitions, so
it can neither be forgotten per partition nor rebuilt from a bounded stretch of input; instead
each record changes it **once**. The task keeps the outputs of every record processed since its
partition's last commit, keyed by (topic, partition, offset); the same record handed over again
gets those outputs back (or raises its error again, to be dead-lettered again) and changes
nothing. The committed outputs and the state are then exactly those of an uninterrupted run that
took the records in the order they were first processed. Cost: one dict entry per record
(references to outputs built anyway), dropped when a commit of its partition past it goes
through. (A commit covers only the partitions of its batch: records of another partition
processed in an aborted batch may come again after it.)
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from quotewatch.core import metrics
from quotewatch.core.clock import Clock
from quotewatch.core.errors import RetriableError
from quotewatch.core.records import FeatureVector, Label, LiveMetrics, ModelRole, Prediction, Snapshot
from quotewatch.core.runtime import InRecord, OutRecord
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market import features
from quotewatch.domain.ml.live_lift import LiftMonitor, live_lift
from quotewatch.domain.ml.live_metrics import LiveMetricsTracker, ModelKey
from quotewatch.domain.ml.models import (
    CHALLENGER_ROLE,
    CHAMPION_ROLE,
    FALLBACK_MODEL_NAME,
    FALLBACK_ROLE,
    OnlineFallback,
    feature_names_for,
    is_valid_probability,
    prediction_record,
)
from quotewatch.domain.ml.registry import LoadedModel
from quotewatch.services.inference.models import FeatureSample, ModelManager

logger = logging.getLogger(__name__)

FALLBACK_METRICS_VERSION = "online"
"""The fallback's live metrics cover all its states under one version."""
_UPDATES_FEATURE = "updates_1000ms"
PENDING_VECTORS_MAX = 10_000
"""Feature vectors kept for the fallback to learn from when their label arrives."""
NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class _Processed:
    """What one record gave: its outputs, or the error it raised."""

    identity: tuple[Any, ...]
    outputs: tuple[OutRecord, ...]
    error: Exception | None = None


def _identity(record: InRecord[FeatureVector | Label]) -> tuple[Any, ...]:
    # Features and labels both carry these: another record at the same offset (a topic deleted
    # and created again) is not taken for the one processed before.
    value = record.value
    return (value.symbol, value.ts_event, value.ts_init)


class InferenceTask:
    """Scores feature vectors with the serving models; joins labels for live metrics."""

    def __init__(
        self,
        *,
        topics: TopicNames,
        manager: ModelManager,
        sample: FeatureSample,
        clock: Clock,
        live_metrics_window: int = 1000,
        join_buffer_max: int = 100_000,
        snapshot_interval_ms: int = 0,
        consumer_lag: Callable[[], int] | None = None,
        delta_ms: int = 500,
        tick_ms: int = 100,
        lift_every_ms: int = 10_000,
        lift_alarm_ms: int = 1_800_000,
        lift_resamples: int = 200,
        service: str = "inference",
    ) -> None:
        self._topics = topics
        self._manager = manager
        self._sample = sample
        self._clock = clock
        self._tracker = LiveMetricsTracker(window=live_metrics_window, buffer_max=join_buffer_max)
        self._fallback = OnlineFallback()
        self._delta_ms, self._tick_ms, self._lift_resamples = delta_ms, tick_ms, lift_resamples
        self._lift = LiftMonitor(lift_every_ms, lift_alarm_ms)
        self._lift_model: ModelKey | None = None
        self._service = service
        self._pending_vectors: OrderedDict[tuple[str, int], tuple[float, ...]] = OrderedDict()
        # A vector waits ~Δ for its label; ticks that never get one (an epoch's last Δ) age out.
        # ~1 kB each as a list of floats: bounded well below the join buffer.
        self._vectors_max = min(join_buffer_max, PENDING_VECTORS_MAX)
        self._snapshot_interval_ns = snapshot_interval_ms * NS_PER_MS
        self._last_snapshot: dict[str, int] = {}
        self._consumer_lag = consumer_lag
        self._lag = 0
        self._lag_read_ns = -(10**18)
        self._names_cache: dict[tuple[str, int], tuple[str, ...]] = {}
        # What each record handed over since its partition's last commit gave, per partition and
        # offset, for re-processing after an aborted transaction (see the module docstring).
        self._uncommitted: dict[tuple[str, int], dict[int, _Processed]] = {}
        self._batch_last: dict[tuple[str, int], int] = {}  # last offset per partition in this batch
        self._committing: dict[tuple[str, int], int] = {}  # offset being committed, per partition
        self._batch_over = False
        self.spec_mismatches = 0
        self.invalid_outputs = 0

    @property
    def tracker(self) -> LiveMetricsTracker:
        return self._tracker

    @property
    def fallback(self) -> OnlineFallback:
        return self._fallback

    # -- StreamTask ---------------------------------------------------------------------------------

    def process(self, record: InRecord[FeatureVector | Label]) -> Iterable[OutRecord]:
        if self._batch_over:
            self._start_batch()
        partition = (record.topic, record.partition)
        self._batch_last[partition] = record.offset
        kept = self._uncommitted.setdefault(partition, {})
        identity = _identity(record)
        done = kept.get(record.offset)
        if done is None or done.identity != identity:
            try:
                outputs = tuple(self._process(record))
            except RetriableError:
                raise  # not the record's fault: it is processed afresh when it comes again
            except Exception as exc:
                kept[record.offset] = _Processed(identity, (), exc)
                raise
            kept[record.offset] = done = _Processed(identity, outputs)
        elif done.error is not None:
            raise done.error
        return done.outputs

    def restart_offset(self, topic: str, partition: int) -> int | None:
        """None: nothing before the committed offset is re-read.

        Predictions need no state (a version and a record); the live metrics and the fallback start
        afresh after a restart rather than re-reading the labels' history. Who calls it: the
        processor, for each partition of a batch it is about to commit.
        """
        last = self._batch_last.get((topic, partition))
        if last is not None:
            self._committing[(topic, partition)] = last + 1
        self._batch_over = True
        return None

    def reset(self, topic: str, partition: int) -> None:
        """Keep the state: every record already processed has changed it once, and only once.

        Who calls it: the processor, on a rebalance (after the last batch was committed: nothing is
        handed over again, the state carries on) and after an aborted transaction (the records since
        each partition's last commit are handed over again: :meth:`process` gives their outputs back
        unchanged). What was kept for a partition goes when a later commit of it goes through (at
        most a batch stays behind for a partition given away). Buffers are keyed by (symbol, t) and
        bounded; entries of a partition given away age out.
        """
        self._committing.clear()  # the commit may not have gone through
        self._batch_over = True

    def _start_batch(self) -> None:
        """Called at the first record after a commit or a reset: drop what commits made obsolete.

        A commit went through when ``restart_offset`` was called for it and no ``reset`` came after
        it. It covers only the partitions of its batch, up to their last offset in it: records of
        other partitions, or further records of the same partition, processed in an aborted batch
        are still to come again.
        """
        for partition, end in self._committing.items():
            kept = self._uncommitted.get(partition)
            if kept and min(kept) < end:
                self._uncommitted[partition] = {offset: done for offset, done in kept.items() if offset >= end}
        self._committing.clear()
        self._batch_last.clear()
        self._batch_over = False

    def _process(self, record: InRecord[FeatureVector | Label]) -> Iterable[OutRecord]:
        value = record.value
        if record.topic == self._topics.features and isinstance(value, FeatureVector):
            return self._on_features(value)
        if record.topic == self._topics.labels and isinstance(value, Label):
            self._on_label(value)
            return ()
        raise ValueError(f"inference does not consume {type(value).__name__} records of {record.topic}")

    # -- features -> predictions + snapshot -----------------------------------------------------------

    def _on_features(self, value: FeatureVector) -> list[OutRecord]:
        symbol, t, spec = value.symbol, value.ts_event, value.feature_spec_id
        values = value.values
        self._sample.observe(spec, values)
        serving = self._manager.serving
        x = np.asarray(values, dtype=np.float64).reshape(1, -1)
        outputs: list[OutRecord] = []
        scored: list[tuple[ModelKey, float]] = []
        champion = serving.champion
        served = self._score(champion, CHAMPION_ROLE, spec, x)
        if champion is None or served is None:
            p, model_name, role = self._fallback.predict(values), FALLBACK_MODEL_NAME, FALLBACK_ROLE
            version = self._fallback.version
            scored.append((ModelKey(model_name, FALLBACK_METRICS_VERSION, role), p))
        else:
            p, model_name, version, role = served, champion.name, champion.version, CHAMPION_ROLE
            scored.append((ModelKey(model_name, version, role), p))
        outputs.append(
            OutRecord(self._topics.predictions, symbol, self._prediction(value, p, model_name, version, role))
        )
        challenger_p = self._score(serving.challenger, CHALLENGER_ROLE, spec, x)
        if challenger_p is not None:
            challenger = serving.challenger
            assert challenger is not None
            scored.append((ModelKey(challenger.name, challenger.version, CHALLENGER_ROLE), challenger_p))
            outputs.append(
                OutRecord(
                    self._topics.predictions,
                    symbol,
                    self._prediction(value, challenger_p, challenger.name, challenger.version, CHALLENGER_ROLE),
                )
            )
        self._tracker.add_predictions(symbol, t, scored)
        self._pending_vectors[(symbol, t)] = values
        while len(self._pending_vectors) > self._vectors_max:
            self._pending_vectors.popitem(last=False)
        last = self._last_snapshot.get(symbol)
        if last is None or t - last >= self._snapshot_interval_ns:
            self._last_snapshot[symbol] = t
            outputs.append(
                OutRecord(
                    self._topics.snapshot,
                    symbol,
                    self._snapshot(value, p, model_name, version, role, challenger_p),
                )
            )
        return outputs

    def _score(self, model: LoadedModel | None, role: ModelRole, spec: str, x: np.ndarray) -> float | None:
        """The model's p for one vector, or None when it cannot score it (no model, other spec, bad output)."""
        if model is None:
            return None
        if model.feature_spec_id != spec or x.shape[1] != len(model.feature_names):
            self.spec_mismatches += 1
            if self.spec_mismatches == 1 or self.spec_mismatches % 10_000 == 0:
                logger.warning(
                    "feature spec mismatch: %s v%s (%s, %d features) cannot score vectors of %s (%d values)",
                    model.name,
                    model.version,
                    model.feature_spec_id,
                    len(model.feature_names),
                    spec,
                    x.shape[1],
                    extra={"role": role, "count": self.spec_mismatches},
                )
            return None
        try:
            p = float(model.predict(x)[0])
        except Exception as exc:  # noqa: BLE001 - a model failing on one vector must not dead-letter it
            p = math.nan
            reason: object = f"{type(exc).__name__}: {exc}"
        else:
            reason = p
        if not is_valid_probability(p):
            self.invalid_outputs += 1
            if self.invalid_outputs == 1 or self.invalid_outputs % 10_000 == 0:
                logger.warning(
                    "%s v%s gave no valid probability (%s); the fallback scores this vector",
                    model.name,
                    model.version,
                    reason,
                    extra={"role": role, "count": self.invalid_outputs},
                )
            return None
        return p

    @staticmethod
    def _prediction(value: FeatureVector, p: float, model_name: str, version: str, role: ModelRole) -> Prediction:
        # The backtest builds its records with the same pure function (replay parity).
        return prediction_record(value, p, model_name, version, role)

    def _feature_names(self, spec: str, width: int) -> tuple[str, ...]:
        key = (spec, width)
        names = self._names_cache.get(key)
        if names is None:
            names = self._names_cache[key] = tuple(feature_names_for(spec, width))
        return names

    def _snapshot(
        self,
        value: FeatureVector,
        p: float,
        model_name: str,
        version: str,
        role: ModelRole,
        challenger_p: float | None,
    ) -> Snapshot:
        spec, values = value.feature_spec_id, value.values
        updates = 0.0
        if spec == features.FEATURE_SPEC_ID and len(values) == len(features.FEATURE_NAMES):
            # Price-level changes in the last 1000 ms of event time: the market's updates per second.
            updates = float(values[features.FEATURE_INDEX[_UPDATES_FEATURE]])
        return Snapshot(
            ts_event=value.ts_event,
            ts_init=value.ts_init,
            exchange=value.exchange,
            symbol=value.symbol,
            bids=value.bids,
            asks=value.asks,
            feature_spec_id=spec,
            feature_names=self._feature_names(spec, len(values)),
            feature_values=values,
            p_change=p,
            model_name=model_name,
            model_version=version,
            model_role=role,
            challenger_p_change=challenger_p,
            live_metrics=self._live_metrics(),
            feed_state=value.feed_state,
            updates_per_second=updates if math.isfinite(updates) else 0.0,
            consumer_lag=self._read_lag(),
        )

    def _read_lag(self) -> int:
        if self._consumer_lag is None:
            return 0
        now = self._clock.monotonic_ns()
        if now - self._lag_read_ns >= 1_000_000_000:
            self._lag_read_ns = now
            self._lag = int(self._consumer_lag())
        return self._lag

    # -- labels -> live metrics + fallback learning --------------------------------------------------

    def _on_label(self, value: Label) -> None:
        symbol, t, label = value.symbol, value.t_event, value.label
        if label not in (0, 1):
            raise ValueError(f"label {label} of {symbol} at t={t} is not 0 or 1")
        synced = value.synced_over_horizon
        self._tracker.add_label(symbol, t, label, synced)
        vector = self._pending_vectors.pop((symbol, t), None)
        if vector is not None and synced:  # the synced-only rule: the fallback learns only from synced labels
            self._fallback.learn(vector, label)
        if synced:
            self._update_lift(value.ts_event)

    def _update_lift(self, now_ns: int) -> None:
        """Recompute the champion's live lift when due (at most once per LIFT_EVERY_MS of label event time)."""
        champion = self._tracker.champion()
        if champion is None:
            return
        if champion != self._lift_model:
            self._lift.reset()
            self._lift_model = champion
        if not self._lift.due(now_ns):
            return
        symbols, t, y, p = self._tracker.window_rows(champion)
        lift = live_lift(
            symbols, t, y, p, delta_ms=self._delta_ms, tick_ms=self._tick_ms, resamples=self._lift_resamples
        )
        self._lift.record(now_ns, lift)
        for statistic, number in (("estimate", lift.lift.estimate), ("low", lift.lift.low), ("high", lift.lift.high)):
            metrics.CHAMPION_LIVE_LIFT.labels(self._service, statistic).set(math.nan if number is None else number)
        metrics.CHAMPION_LIFT_BELOW_ZERO.labels(self._service).set(int(self._lift.flagged))

    @property
    def lift(self) -> LiftMonitor:
        """The champion's live lift and its alarm."""
        return self._lift

    def _live_metrics(self) -> tuple[LiveMetrics, ...]:
        """The tracker's summary, the champion's entry carrying the live lift and its alarm."""
        summary = self._tracker.summary()
        last = self._lift.last
        if last is None or self._lift_model is None:
            return summary
        key = self._lift_model
        return tuple(
            msgspec.structs.replace(
                entry,
                lift=last.lift.estimate,
                lift_low=last.lift.low,
                lift_high=last.lift.high,
                lift_rows=last.rows,
                lift_below_zero_since_ns=self._lift.negative_since_ns,
                lift_flagged=self._lift.flagged,
            )
            if (entry.model_name, entry.model_version, entry.model_role)
            == (key.model_name, key.model_version, key.model_role)
            else entry
            for entry in summary
        )
