"""The backtest engine: a raw log (or market events) in, features, labels and predictions out, in-process.

It chains exactly the functions the services run, in the same order per symbol:

- ingest (``INGEST_SOURCE=topic``): :class:`quotewatch.domain.venue.normaliser.Normaliser` per raw record;
- book: :class:`quotewatch.domain.market.book_pipeline.BookPipeline` per event (an unusable event still
  yields the ticks it closed, as the book service emits them before dead-lettering it);
- labeler: :class:`quotewatch.domain.market.labels.Labeler` per BookTop (a rejected BookTop leaves the
  state unchanged, as the labeler dead-letters it);
- inference: ``LoadedModel.predict``, i.e. :func:`quotewatch.domain.ml.models.positive_probability`
  (row-invariant, so scoring a whole window at once gives each tick the bits it gets alone in
  the service) and
  :func:`quotewatch.domain.ml.models.prediction_record`.

The services see a symbol's records in the same order (one partition per key) and their state is
per symbol, so the outputs are identical. Only the fallback model is not reproduced: it learns
from labels in the order inference happens to consume them.

**The window's end.** With ``end_ns`` (``--to``), the engine emits the ticks ``t < end_ns`` (their
BookTop, FeatureVector and Label records; a label is the record of its tick ``t_event``), and
its input may run past ``end_ns``: the label of tick ``t`` is made when tick ``t + Δ`` closes, i.e.
when the first event after ``t + Δ`` arrives. A backtest reads :func:`input_lookahead_ns` past
``--to`` (Δ plus :data:`~quotewatch.domain.market.book_pipeline.MAX_CARRIED_MS`, the 5 s that also
cover receive delay), so its ticks and labels are the live services' for every tick before
``--to``, and the rows of ``[A, C)`` are those of ``[A, B)`` plus those of ``[B, C)``. Only a
symbol without any event (CLOCK events included: live they come every tick) for more than those
5 s across ``--to + Δ`` could still lose a label there.

Memory: features are kept as compact columns (t, symbol, spec, a float64 matrix: ~210 bytes a
tick), labels likewise; full records only with ``keep_records`` (parity tests, small windows).
No I/O, no clock.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from quotewatch.core.records import BookTop, FeatureVector, Label, MarketEvent, ModelRole, Prediction, RawFrame
from quotewatch.domain.market.book_pipeline import MAX_CARRIED_MS, BookPipeline, MarketEventError, TickOutput
from quotewatch.domain.market.labels import Labeler, LabelInputError
from quotewatch.domain.ml.models import is_valid_probability, prediction_record
from quotewatch.domain.ml.registry import LoadedModel
from quotewatch.domain.venue.normaliser import Normaliser

SCORE_CHUNK_ROWS = 65_536
"""Rows scored per call (bounds the temporary matrices; results do not depend on it)."""
_NS_PER_MS = 1_000_000
_NO_END = 2**63  # past every int64 ts
_NO_START = -(2**63)  # at or before every int64 ts


def input_lookahead_ns(delta_ms: int) -> int:
    """How far past ``--to`` a backtest reads its input: Δ, then :data:`MAX_CARRIED_MS` (see the module doc)."""
    return (delta_ms + MAX_CARRIED_MS) * _NS_PER_MS


@dataclass
class PipelineCounts:
    """What went through the pipeline."""

    raw_records: int = 0
    events: int = 0
    rejected_raw: int = 0
    """Raw records or frames the normaliser rejected (the ingest dead-letters them)."""
    bad_events: int = 0
    """Events the book pipeline could not use (the book service dead-letters them)."""
    bad_tops: int = 0
    """BookTop records the labeler rejected."""
    ticks: int = 0
    """Ticks emitted (``start_ns <= t < end_ns``); ``raw_records`` and ``events`` count the whole input."""
    feature_vectors: int = 0
    labels: int = 0


@dataclass
class FeatureTable:
    """The feature vectors of a run as columns, in emission order."""

    t: NDArray[np.int64]
    symbol: NDArray[np.str_]
    spec_id: list[str]
    """Per row (in practice one spec throughout)."""
    values: NDArray[np.float64]
    """(rows, width) matrix; width 0 when there are no rows."""


@dataclass
class LabelTable:
    """The labels of a run as columns: y of tick ``t_event`` of ``symbol``."""

    t_event: NDArray[np.int64]
    symbol: NDArray[np.str_]
    label: NDArray[np.int64]
    synced: NDArray[np.bool_]
    """``Label.synced_over_horizon``: only these rows are evaluated (the synced-only rule)."""

    def synced_only(self) -> LabelTable:
        """The rows whose book was synced over the whole horizon: the labels metrics count."""
        keep = self.synced
        return LabelTable(self.t_event[keep], self.symbol[keep], self.label[keep], keep[keep])


@dataclass
class ModelScores:
    """One model's p for every feature row (NaN where it did not score the row, as inference falls back there)."""

    model: LoadedModel
    role: ModelRole
    p: NDArray[np.float64]
    spec_mismatches: int = 0
    invalid_outputs: int = 0

    @property
    def scored(self) -> NDArray[np.bool_]:
        return ~np.isnan(self.p)


class PipelineRun(Protocol):
    """What a backtest's pipeline hands to scoring, the report and the record files: a
    :class:`BacktestEngine`, or the merged partitions of a parallel run
    (:class:`quotewatch.services.replay.partitions.ParallelRun`)."""

    counts: PipelineCounts
    book_tops: list[BookTop]
    feature_records: list[FeatureVector]
    label_records: list[Label]

    def feature_table(self) -> FeatureTable: ...

    def label_table(self) -> LabelTable: ...


@dataclass
class BacktestEngine:
    """Runs the services' pure pipeline over a log in one process.

    Args:
        tick_ms, delta_ms: the grid step and the label horizon (TICK_MS, DELTA_MS).
        keep_records: also keep every MarketEvent, BookTop, FeatureVector and Label record.
        end_ns: emit only ticks ``t < end_ns`` (and their labels); None: every tick.
        start_ns: emit only ticks ``t >= start_ns`` (and their labels); None: from the first tick.
            Earlier ticks still feed the labeler (a parallel backtest's partition starts mid-stream,
            :mod:`quotewatch.services.replay.parallel`).
    """

    tick_ms: int
    delta_ms: int
    keep_records: bool = False
    end_ns: int | None = None
    start_ns: int | None = None
    counts: PipelineCounts = field(default_factory=PipelineCounts)
    events: list[MarketEvent] = field(default_factory=list)
    book_tops: list[BookTop] = field(default_factory=list)
    feature_records: list[FeatureVector] = field(default_factory=list)
    label_records: list[Label] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.normaliser = Normaliser()
        self.book = BookPipeline(self.tick_ms)
        self.labeler = Labeler(self.delta_ms, self.tick_ms)
        self._t = array("q")
        self._symbol_index: array[int] = array("i")
        self._symbols: dict[str, int] = {}
        self._spec_index: array[int] = array("i")
        self._specs: dict[str, int] = {}
        self._values = array("d")
        self._width: int | None = None
        self._label_t = array("q")
        self._label_symbol: array[int] = array("i")
        self._label_y = array("b")
        self._label_synced = array("b")

    # -- feeding -------------------------------------------------------------------------------

    def run_raw(self, raws: Iterable[RawFrame]) -> BacktestEngine:
        """Normalise and process every raw record, in log order."""
        normalise = self.normaliser.process
        process_event = self.process_event
        counts = self.counts
        for raw in raws:
            counts.raw_records += 1
            out = normalise(raw)
            if out.rejects:
                counts.rejected_raw += len(out.rejects)
            for event in out.events:
                process_event(event)
        return self

    def run_events(self, events: Iterable[MarketEvent]) -> BacktestEngine:
        """Process MarketEvent records (each symbol's in its stream order)."""
        process_event = self.process_event
        for event in events:
            process_event(event)
        return self

    def process_event(self, event: MarketEvent) -> None:
        """One MarketEvent through the book pipeline, the labeler and the feature columns."""
        self.counts.events += 1
        if self.keep_records:
            self.events.append(event)
        try:
            ticks = self.book.process(event)
        except MarketEventError as exc:
            self.counts.bad_events += 1
            ticks = exc.outputs
        if ticks:
            self._ticks(ticks)

    def _ticks(self, ticks: list[TickOutput]) -> None:
        # Hot path (once per tick): attributes bound to locals.
        counts = self.counts
        label_of = self.labeler.process
        keep = self.keep_records
        symbol_id = self._symbol_id
        end = _NO_END if self.end_ns is None else self.end_ns
        start = _NO_START if self.start_ns is None else self.start_ns
        for tick in ticks:
            top = tick.book_top
            # Outside [start, end) the ticks still go to the labeler (they label the ticks inside).
            inside = start <= top.ts_event < end
            if inside:
                counts.ticks += 1
                if keep:
                    self.book_tops.append(top)
            try:
                label = label_of(top)
            except LabelInputError:
                counts.bad_tops += int(inside)
                label = None
            if label is not None and start <= label.t_event < end:
                counts.labels += 1
                self._label_t.append(label.t_event)
                self._label_symbol.append(symbol_id(label.symbol))
                self._label_y.append(label.label)
                self._label_synced.append(label.synced_over_horizon)
                if keep:
                    self.label_records.append(label)
            vector = tick.features
            if vector is not None and inside:
                counts.feature_vectors += 1
                values = vector.values
                if self._width is None:
                    self._width = len(values)
                elif len(values) != self._width:
                    raise ValueError(f"feature vectors changed width from {self._width} to {len(values)}")
                self._t.append(vector.ts_event)
                self._symbol_index.append(symbol_id(vector.symbol))
                spec = vector.feature_spec_id
                spec_index = self._specs.get(spec)
                if spec_index is None:
                    spec_index = self._specs[spec] = len(self._specs)
                self._spec_index.append(spec_index)
                self._values.extend(values)
                if keep:
                    self.feature_records.append(vector)

    def _symbol_id(self, symbol: str) -> int:
        index = self._symbols.get(symbol)
        if index is None:
            index = self._symbols[symbol] = len(self._symbols)
        return index

    # -- results -------------------------------------------------------------------------------

    def feature_table(self) -> FeatureTable:
        names = np.array(list(self._symbols), dtype=np.str_) if self._symbols else np.array([], dtype=np.str_)
        width = self._width or 0
        values = np.frombuffer(self._values, dtype=np.float64).reshape(-1, width) if width else np.empty((0, 0))
        specs = list(self._specs)
        return FeatureTable(
            t=np.frombuffer(self._t, dtype=np.int64).copy(),
            symbol=names[np.frombuffer(self._symbol_index, dtype=np.int32)] if len(self._t) else names[:0],
            spec_id=[specs[i] for i in self._spec_index],
            values=values.copy(),
        )

    def label_table(self) -> LabelTable:
        names = np.array(list(self._symbols), dtype=np.str_) if self._symbols else np.array([], dtype=np.str_)
        return LabelTable(
            t_event=np.frombuffer(self._label_t, dtype=np.int64).copy(),
            symbol=names[np.frombuffer(self._label_symbol, dtype=np.int32)] if len(self._label_t) else names[:0],
            label=np.frombuffer(self._label_y, dtype=np.int8).astype(np.int64),
            synced=np.frombuffer(self._label_synced, dtype=np.int8).astype(np.bool_),
        )


def score_model(features: FeatureTable, model: LoadedModel, role: ModelRole) -> ModelScores:
    """``model``'s p for every feature row it can score, as inference scores them.

    Inference scores a vector with a model only when the vector's spec is the model's and the
    width matches its feature names, and serves p only when it is finite in [0, 1]; elsewhere the
    fallback answers. Those rows stay NaN here and are counted.
    """
    rows = features.values.shape[0]
    p = np.full(rows, np.nan)
    # spec ids are Avro strings (never null), so str.__eq__ always answers a bool here.
    matches = np.fromiter(map(model.feature_spec_id.__eq__, features.spec_id), dtype=bool, count=rows)
    if rows and features.values.shape[1] != len(model.feature_names):
        matches[:] = False
    index = np.flatnonzero(matches)
    for start in range(0, index.size, SCORE_CHUNK_ROWS):
        chunk = index[start : start + SCORE_CHUNK_ROWS]
        p[chunk] = model.predict(features.values[chunk])
    valid = np.isfinite(p) & (p >= 0.0) & (p <= 1.0)
    invalid = int(matches.sum() - (valid & matches).sum())
    p[~valid] = np.nan
    return ModelScores(model, role, p, spec_mismatches=int(rows - matches.sum()), invalid_outputs=invalid)


def prediction_records(engine: PipelineRun, scores: ModelScores) -> list[Prediction]:
    """The Prediction records inference would write for the kept feature records (needs ``keep_records``)."""
    if len(engine.feature_records) != scores.p.size:
        raise ValueError("prediction records need an engine run with keep_records=True")
    model = scores.model
    out = []
    for vector, p in zip(engine.feature_records, scores.p.tolist(), strict=True):
        if is_valid_probability(p):
            out.append(prediction_record(vector, p, model.name, model.version, scores.role))
    return out
