"""The units of a parallel backtest: a partition (a symbol-day), its task, its result and the merged run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from quotewatch.core.config import BacktestSettings
from quotewatch.core.records import BookTop, FeatureVector, Label
from quotewatch.services.replay.engine import (
    FeatureTable,
    LabelTable,
    PipelineCounts,
)
from quotewatch.services.replay.sources import RawStart, SourceSpec


@dataclass(frozen=True, slots=True)
class Partition:
    """One symbol-day (raw input: one day of every symbol) of a backtest: which ticks it emits, what it
    reads, which input it counts."""

    symbols: tuple[str, ...]
    day: str
    """The UTC date (``YYYY-MM-DD``) of its ticks."""
    emit_from_ns: int | None
    """First tick time it emits (None: from the warm-up on, as the serial run)."""
    emit_to_ns: int | None
    """Ticks before this (None: to the end)."""
    read_from_ns: int | None
    """Its input starts at the CONNECTED at or before this ts_init (None: at the source's start)."""
    read_limit_ns: int | None
    """Its input never goes past this ts_init (None: the source's end): where the serial run stops."""
    count_from_ns: int | None
    count_to_ns: int | None

    def describe(self) -> str:
        return f"{','.join(self.symbols)} {self.day}"

    def counts_input(self, ts_init: int) -> bool:
        return (self.count_from_ns is None or ts_init >= self.count_from_ns) and (
            self.count_to_ns is None or ts_init < self.count_to_ns
        )


@dataclass(frozen=True, slots=True)
class PartitionTask:
    """Everything a worker process needs to run one partition (pickled to it)."""

    settings: BacktestSettings
    source: SourceSpec
    partition: Partition
    events: bool = False
    """Read the stored market events instead of the raw log."""
    keep_records: bool = False
    """Also return the BookTop, FeatureVector and Label records (``--records``, ``--lake-out``)."""


@dataclass
class PartitionResult:
    """What one partition made: its rows with their order keys, and its counts."""

    partition: Partition
    counts: PipelineCounts
    features: FeatureTable
    labels: LabelTable
    feature_keys: NDArray[np.int64]
    """(rows, 4): the order key of each feature row: the event's input position (3 columns), the tick time."""
    label_keys: NDArray[np.int64]
    top_keys: NDArray[np.int64]
    symbols_seen: set[str]
    """Symbols of the events it read in the input it counts (a check that the plan missed none)."""
    read_to_ns: int | None
    """How far it read (after its re-runs for a silent symbol)."""
    runs: int
    seconds: float
    book_tops: list[BookTop] = field(default_factory=list)
    feature_records: list[FeatureVector] = field(default_factory=list)
    label_records: list[Label] = field(default_factory=list)


@dataclass
class ParallelRun:
    """The partitions merged in the serial run's order: what :class:`~.engine.BacktestEngine` would hold.

    Satisfies :class:`~quotewatch.services.replay.engine.PipelineRun`, so scoring, the report and
    the record files take it as they take an engine.
    """

    counts: PipelineCounts
    features: FeatureTable
    labels: LabelTable
    partitions: list[Partition]
    start: RawStart | None
    book_tops: list[BookTop] = field(default_factory=list)
    feature_records: list[FeatureVector] = field(default_factory=list)
    label_records: list[Label] = field(default_factory=list)
    partition_seconds: float = 0.0
    """Sum of the partitions' own run times (the work done; the wall time is less with workers)."""

    def feature_table(self) -> FeatureTable:
        return self.features

    def label_table(self) -> LabelTable:
        return self.labels
