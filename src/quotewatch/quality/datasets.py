"""The data a quality report evaluates: every real capture found, and the synthetic market, as labelled ticks.

**Discovery** (:func:`discover`): every subdirectory of the data directory (``../shared/data``) is a
venue. Coinbase captures (``coinbase/*.jsonl`` and ``*.jsonl.gz`` with their receive-time sidecar,
:mod:`quotewatch.domain.venue.captures`) are evaluated; a venue this build has no parser for is
listed as present and not evaluated. Each capture's entry in the venue's ``SOURCES.md`` (its
``## N. `file` …`` section) is quoted in the report. No file name is written in the code.

**Ticks** (:func:`load`): the capture or the synthetic market goes through
:class:`quotewatch.services.replay.engine.BacktestEngine` (the services' own normaliser, book,
features and labeler), and the feature vectors are joined with their labels by the trainer's
:func:`quotewatch.services.trainer.training.build_training_set`.

**The synced-only rule.** A tick is evaluated only if it has a label flagged
``synced_over_horizon``: t and t + Δ are both emitted in the same sync epoch with both sides of the book: the book
was synced over the whole horizon (a GAP unsyncs the symbol and emits nothing until the next
snapshot, which starts a new epoch). :class:`Exclusions` counts every feature tick left out, by
reason, from the BookTop epochs and the GAP events of the run.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from quotewatch.core.records import MarketEvent, RawFrame
from quotewatch.domain.market.book_pipeline import TickOutput
from quotewatch.domain.venue.captures import capture_files, capture_stem, read_capture
from quotewatch.services.replay.engine import BacktestEngine
from quotewatch.services.replay.sources import Window, capture_raw_records, synthetic_raw_records
from quotewatch.services.trainer.training import TrainingSet, build_training_set

EVALUATED_VENUES = ("coinbase",)
"""Venues whose captures this build can parse (their protocol adapters exist)."""
NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Source:
    """One thing to evaluate: a real capture or the synthetic market."""

    name: str
    kind: str
    """``capture`` or ``synthetic``."""
    venue: str
    path: Path | None = None
    seed: int = 0
    hours: float = 0.0
    description: str = ""
    """Its SOURCES.md entry (heading and source line), or what the synthetic market is."""


@dataclass(frozen=True)
class Discovery:
    sources: list[Source]
    skipped_venues: list[str]
    """Venue directories present without a parser in this build (listed, not evaluated)."""


def discover(data_dir: Path) -> Discovery:
    """Every capture under ``data_dir/<venue>/`` (sorted), and the venues that cannot be evaluated."""
    sources: list[Source] = []
    skipped: list[str] = []
    if not data_dir.is_dir():
        return Discovery(sources, skipped)
    for venue_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if venue_dir.name not in EVALUATED_VENUES:
            skipped.append(venue_dir.name)
            continue
        notes = _sources_notes(venue_dir / "SOURCES.md")
        for path in capture_files(venue_dir):
            stem = capture_stem(path)
            sources.append(Source(stem, "capture", venue_dir.name, path=path, description=notes.get(path.name, "")))
    return Discovery(sources, skipped)


def synthetic_source(seed: int, hours: float, symbols: Iterable[str]) -> Source:
    names = ",".join(symbols)
    return Source(
        f"synthetic:{seed}:{hours:g}",
        "synthetic",
        "synthetic",
        seed=seed,
        hours=hours,
        description=f"the seeded synthetic market (`quotewatch.domain.simulation.synthetic`), {hours:g} h of {names}, "
        "Advanced Trade protocol: its latent order-flow pressure shows in the book before the quotes move",
    )


_HEADING = re.compile(r"^##\s+\d+\.\s+`(?P<file>[^`]+)`(?P<rest>.*)$")


def _sources_notes(path: Path) -> dict[str, str]:
    """File name -> "heading; **Source:** line" of each numbered section of a SOURCES.md."""
    if not path.is_file():
        return {}
    notes: dict[str, str] = {}
    current: str | None = None
    in_source = False
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _HEADING.match(line)
        stripped = line.strip()
        if match:
            current, in_source = match["file"], False
            notes[current] = f"`{current}`{match['rest']}".strip()
        elif line.startswith("## "):
            current, in_source = None, False
        elif current and stripped.startswith("- **Source:**"):
            in_source = True
            notes[current] += "; " + stripped[2:].replace("**Source:**", "source:").strip()
        elif current and in_source and stripped and not stripped.startswith("- ") and line.startswith("  "):
            notes[current] += " " + stripped  # the Source bullet's continuation lines
        else:
            in_source = False
    return notes


# -- ticks -----------------------------------------------------------------------------------------


class _LedgerEngine(BacktestEngine):
    """The backtest engine, also noting every emitted tick's (symbol, t, epoch, two-sided) and the GAP events."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tick_symbol: list[str] = []
        self.tick_t = array("q")
        self.tick_epoch = array("q")
        self.tick_two_sided = array("b")
        self.gaps: list[tuple[str, int, str]] = []
        """(symbol, ts_event, reason) of every GAP event."""

    def process_event(self, event: MarketEvent) -> None:
        if event.kind == "GAP":
            reason = event.gap.reason if event.gap is not None else "?"
            self.gaps.append((event.symbol, event.ts_event, reason))
        super().process_event(event)

    def _ticks(self, ticks: list[TickOutput]) -> None:
        for tick in ticks:
            top = tick.book_top
            self.tick_symbol.append(top.symbol)
            self.tick_t.append(top.ts_event)
            self.tick_epoch.append(top.epoch)
            self.tick_two_sided.append(tick.features is not None)
        super()._ticks(ticks)


@dataclass
class Exclusions:
    """Feature ticks left out of the evaluation by the synced-only rule, by reason; and time spent unsynced."""

    feature_ticks: int
    labelled: int
    reasons: Counter[str] = field(default_factory=Counter)
    gaps: Counter[str] = field(default_factory=Counter)
    """GAP events by reason (a connection's start counts one per symbol: RECONNECT)."""
    unsynced_seconds: float = 0.0
    """Event time between a GAP and the next snapshot of its symbol, summed (no tick is emitted then)."""

    @property
    def excluded(self) -> int:
        return self.feature_ticks - self.labelled

    @property
    def share(self) -> float:
        return self.excluded / self.feature_ticks if self.feature_ticks else 0.0


PAST_THE_END = "t + Δ is past the end of the data"
RESYNC = "a gap and a resync (new epoch) inside [t, t + Δ]"
UNSYNCED = "the book is unsynced at t + Δ (a gap, no snapshot yet)"
ONE_SIDED = "one side of the book is empty at t + Δ"
SKIPPED = "t + Δ fell in a silence of more than 5 s (ticks not emitted)"


def exclusions(engine: _LedgerEngine, labelled: set[tuple[str, int]], delta_ms: int) -> Exclusions:
    """Why each two-sided tick without a label has none (see :data:`PAST_THE_END` and the other reasons)."""
    delta = delta_ms * NS_PER_MS
    symbols = np.array(engine.tick_symbol, dtype=str)
    t = np.frombuffer(engine.tick_t, dtype=np.int64)
    epoch = np.frombuffer(engine.tick_epoch, dtype=np.int64)
    two_sided = np.frombuffer(engine.tick_two_sided, dtype=np.int8).astype(bool)
    end = engine.end_ns
    result = Exclusions(feature_ticks=0, labelled=0)
    for symbol in np.unique(symbols):
        rows = np.flatnonzero(symbols == symbol)
        times, epochs, sides = t[rows], epoch[rows], two_sided[rows]
        inside = times < end if end is not None else np.ones(times.size, dtype=bool)
        for index in np.flatnonzero(sides & inside):
            result.feature_ticks += 1
            when = int(times[index])
            if (symbol, when) in labelled:
                result.labelled += 1
                continue
            target = when + delta
            at = int(np.searchsorted(times, target))
            if at < times.size and times[at] == target:
                reason = RESYNC if epochs[at] != epochs[index] else ONE_SIDED
            elif at >= times.size:
                reason = PAST_THE_END
            elif epochs[at] != epochs[index]:
                reason = UNSYNCED
            else:
                reason = SKIPPED
            result.reasons[reason] += 1
    epochs_of = {symbol: np.unique(epoch[symbols == symbol]) for symbol in np.unique(symbols)}
    for symbol, when, reason in engine.gaps:
        result.gaps[reason] += 1
        starts = epochs_of.get(symbol, np.empty(0, dtype=np.int64))
        later = starts[starts >= when]
        if later.size:
            result.unsynced_seconds += (int(later.min()) - when) / 1e9
    return result


@dataclass
class Dataset:
    """One source's labelled feature ticks (the trainer's :class:`TrainingSet`), with what was left out."""

    source: Source
    data: TrainingSet | None
    exclusions: Exclusions
    symbols: tuple[str, ...]
    span_seconds: float
    problem: str = ""
    """Why there is nothing to evaluate at all (empty), else empty."""

    @property
    def positives(self) -> int:
        return int(self.data.y.sum()) if self.data is not None else 0

    @property
    def rows(self) -> int:
        return int(self.data.y.size) if self.data is not None else 0


def change_events(y: NDArray[np.int64], symbols: NDArray[np.str_]) -> int:
    """Runs of consecutive positive labels per symbol: about one per best-quote change."""
    total = 0
    for symbol in np.unique(symbols):
        labels = y[symbols == symbol]
        total += int(np.count_nonzero(np.diff(np.concatenate(([0], labels))) == 1))
    return total


def load(source: Source, *, tick_ms: int, delta_ms: int, symbols: tuple[str, ...]) -> Dataset:
    """Run ``source`` through the services' pipeline and join its feature vectors with their labels."""
    if source.kind == "capture":
        assert source.path is not None
        raws: Iterable[RawFrame] = capture_raw_records(source.path, Window())
        names: tuple[str, ...] = read_capture(source.path).symbols
    else:
        raws = synthetic_raw_records(source.seed, source.hours, symbols, tick_ms, Window())
        names = symbols
    engine = _LedgerEngine(tick_ms, delta_ms)
    engine.run_raw(raws)
    features, labels = engine.feature_table(), engine.label_table().synced_only()
    labelled = set(zip(labels.symbol.tolist(), labels.t_event.tolist(), strict=True))
    excluded = exclusions(engine, labelled, delta_ms)
    span = (int(features.t.max()) - int(features.t.min())) / 1e9 if features.t.size else 0.0
    if features.t.size == 0 or labels.t_event.size == 0:
        return Dataset(source, None, excluded, names, span, problem="no labelled feature tick")
    feature_frame = pd.DataFrame(
        {
            "symbol": features.symbol,
            "ts_event": features.t,
            "feature_spec_id": features.spec_id,
            "values": list(features.values),
        }
    )
    label_frame = pd.DataFrame({"symbol": labels.symbol, "t_event": labels.t_event, "label": labels.label})
    return Dataset(source, build_training_set(feature_frame, label_frame), excluded, names, span)
