"""Backtests in parallel: symbol-days at once, in local processes (``--workers N``) or on a Dask
cluster (``--dask-scheduler ADDRESS``), with the serial run's results.

**A partition** is one symbol's ticks of one UTC day: the ticks ``t`` (event time) of that symbol in
``[midnight, next midnight)``. A symbol's first partition also takes the warm-up ticks before
``--from`` (the serial run emits them too) and its last one stops at ``--to``, so a symbol's
partitions tile exactly the ticks the serial run emits. :func:`plan` lists them (symbols x days),
:func:`run_partition` runs one (in whatever process it is sent to), :func:`merge` puts their rows
back in the serial run's order. From the raw log (``--input raw``, the default) a partition holds
every symbol of its day: the normaliser must see the whole connection-wide log (its sequence
checks span every symbol) and is ~3/4 of the time per tick (docs/benchmarks.md), so splitting the
day by symbol would normalise it once per symbol; from stored events (``--input events``) each
symbol-day is its own partition and reads only its symbol's events.

**A partition's input** is what the serial run reads, from the CONNECTED record at or before its
day's start (less :data:`READ_MARGIN_NS`, for exchange clocks ahead of ours; the first day: at or
before ``--from``, as the serial run): the normaliser and the book start clean at a CONNECTED (its
snapshots reset the books and the feature state; the engine's "[A, B) + [B, C)" property,
:mod:`quotewatch.services.replay.engine`), so the symbol's state at midnight is the serial run's.
Events input reads the stored events and keeps the partition's symbol's. A capture or the
synthetic market has no index to start from: every partition reads it from its start (a
connection that spans days is re-read up to each day; with a topic or the lake only the day's
connection is).

**The end of a day.** The label of tick ``t`` is made when tick ``t + Δ`` closes, on the symbol's
first event after it. A partition reads :func:`~quotewatch.services.replay.engine.input_lookahead_ns`
past its end, then checks for each of its symbols that the tick ``end - TICK_MS + Δ`` closed (or
that the symbol is unsynced: no tick before it can be labelled any more); when not (the symbol
was silent across it), the partition runs again reading twice as far, until it did or the
partition reads as far as the serial run. Every label of the day is then the serial run's.

**Order.** Each row (BookTop, feature vector, label) carries the input position of the event that
made it (raw input: the raw record's offset, or its index in a capture or the synthetic log, and
the event's index among the events of that record; events input: ``(ts_init, partition, offset)``,
the order the serial run merges the partitions in) and its tick time (the rows one event makes are
in tick order; one event can close ticks on both sides of a midnight).
Sorted by that key, the union of the partitions is the serial run's emission order, so the feature
and label tables, the scores and every metric are the serial run's, bit for bit.

**Counts.** Input counts (raw records, events, rejects, bad events) are counted by the partition
that owns the record's ``ts_init`` (its day; the first and last day extend to the input's ends) and
only there, so they add up to the serial run's.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from quotewatch.core.config import BacktestSettings
from quotewatch.core.errors import ConfigError
from quotewatch.core.records import MarketEvent, RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.market.book_pipeline import SymbolPipeline
from quotewatch.services.replay import lake_source, sources
from quotewatch.services.replay.engine import (
    BacktestEngine,
    FeatureTable,
    LabelTable,
    PipelineCounts,
    input_lookahead_ns,
)
from quotewatch.services.replay.partitions import ParallelRun, Partition, PartitionResult, PartitionTask
from quotewatch.services.replay.sources import RawStart, ReplayError, SourceSpec, Window, format_time

logger = logging.getLogger(__name__)

DAY_NS = 86_400 * 10**9
READ_MARGIN_NS = 60 * 10**9
"""A partition's input starts at the CONNECTED at or before its midnight less this: an exchange
clock up to this far ahead of ours cannot have closed a tick of the day before that connection."""
_MS = 1_000_000
_INPUT_COUNTS = ("raw_records", "events", "rejected_raw", "bad_events")
"""Counted by the partition that owns the record's ts_init; the other counts by the tick's t."""


# -- planning ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceSurvey:
    """What planning needs to know of a source: its symbols and its time range (ts_init)."""

    symbols: tuple[str, ...]
    first_ns: int
    last_ns: int
    start: RawStart | None = None
    """The CONNECTED the serial run starts at (topic and lake sources)."""


def survey(settings: BacktestSettings, source: SourceSpec, window: Window) -> SourceSurvey:
    """The symbols subscribed in the source's connections that the window reads, and its time range.

    Raises:
        ReplayError: an empty source, or no CONNECTED record before the window (as the serial run).
    """
    if source.kind == "synthetic":
        from quotewatch.domain.simulation.synthetic import SyntheticConfig

        first = SyntheticConfig(symbols=settings.symbols, seed=source.seed).start_ns
        return SourceSurvey(tuple(settings.symbols), first, first + int(source.hours * 3_600 * 10**9))
    if source.kind == "capture":
        assert source.path is not None
        return _survey_raw(_survey_rows(sources.capture_raw_records(source.path, Window())), None)
    if source.kind == "lake":
        from quotewatch.core.lake import read_table

        start = lake_source.lake_raw_start(settings.lake_uri, source.prefix, window.start_ns)
        end_ns = window.end_ns + sources.LAKE_MARGIN_NS if window.end_ns is not None else None
        table = read_table(
            settings.lake_uri,
            TopicNames(source.prefix).md_raw,
            start_ns=start.ts_init - sources.LAKE_MARGIN_NS,
            end_ns=end_ns,
            columns=["ts_init", "kind", "symbols", "_offset"],
        )
        columns = (table.column(name).to_pylist() for name in ("ts_init", "kind", "symbols", "_offset"))
        rows = (
            (ts, kind, symbols) for ts, kind, symbols, offset in zip(*columns, strict=True) if offset >= start.offset
        )
        return _survey_raw(rows, start)
    start, _, records = sources.topic_raw_records(settings, source.prefix, window, AvroSerde())
    return _survey_raw(_survey_rows(sources.values_of(records, RawFrame)), start)


def _survey_rows(raws: Iterable[RawFrame]) -> Iterator[tuple[int, str, Sequence[str]]]:
    return ((raw.ts_init, raw.kind, raw.symbols) for raw in raws)


def _survey_raw(rows: Iterable[tuple[int, str, Sequence[str]]], start: RawStart | None) -> SourceSurvey:
    """The survey of raw records given as ``(ts_init, kind, symbols)``."""
    symbols: set[str] = set()
    first: int | None = None
    last: int | None = None
    for ts_init, kind, subscribed in rows:
        ts = int(ts_init)
        first = ts if first is None else min(first, ts)
        last = ts if last is None else max(last, ts)
        if kind == "CONNECTED":
            symbols.update(subscribed)
    if first is None or last is None:
        raise ReplayError("the source holds no record in the window")
    return SourceSurvey(tuple(sorted(symbols)), first, last, start)


def plan(settings: BacktestSettings, window: Window, survey: SourceSurvey, *, events: bool) -> list[Partition]:
    """The partitions of a backtest over ``window``: every UTC day of the window, for events input
    (``events``) once per symbol of the survey, for the raw log once with all of them (module doc)."""
    if not survey.symbols:
        raise ReplayError("no symbol subscribed in the window: nothing to partition")
    first_ns = window.start_ns if window.start_ns is not None else survey.first_ns
    last_ns = window.end_ns if window.end_ns is not None else survey.last_ns + 1
    days = list(range(first_ns // DAY_NS, max(first_ns, last_ns - 1) // DAY_NS + 1))
    lookahead = input_lookahead_ns(settings.delta_ms)
    serial_read_to = window.end_ns + lookahead if window.end_ns is not None else None
    interior_limit = serial_read_to if serial_read_to is not None else survey.last_ns + 1
    groups = [(symbol,) for symbol in sorted(survey.symbols)] if events else [tuple(sorted(survey.symbols))]
    out = []
    for symbols in groups:
        for index, day in enumerate(days):
            first_day, last_day = index == 0, index == len(days) - 1
            midnight = day * DAY_NS
            read_from = midnight - READ_MARGIN_NS
            if window.start_ns is not None:
                read_from = max(read_from, window.start_ns)
            out.append(
                Partition(
                    symbols=symbols,
                    day=format_time(midnight)[:10],
                    emit_from_ns=None if first_day else midnight,
                    emit_to_ns=window.end_ns if last_day else midnight + DAY_NS,
                    read_from_ns=window.start_ns if first_day else read_from,
                    read_limit_ns=serial_read_to if last_day else interior_limit,
                    count_from_ns=None if first_day else midnight,
                    count_to_ns=None if last_day else midnight + DAY_NS,
                )
            )
    return out


# -- one partition (in a worker process) -----------------------------------------------------------


class _RowKeys:
    """The input position of the event that made each row of one table (three int64 columns)."""

    def __init__(self) -> None:
        self.columns = (array("q"), array("q"), array("q"))

    def add(self, key: tuple[int, int, int], rows: int) -> None:
        first, second, third = self.columns
        for _ in range(rows):
            first.append(key[0])
            second.append(key[1])
            third.append(key[2])

    def matrix(self, t: NDArray[np.int64]) -> NDArray[np.int64]:
        """The order keys: the positions, then each row's tick time ``t`` (the rows in table order)."""
        columns = [np.frombuffer(column, dtype=np.int64) for column in self.columns]
        if columns[0].size != t.size:
            raise ValueError(f"{columns[0].size} order keys for {t.size} rows")
        return np.stack([*columns, t.astype(np.int64)], axis=1).reshape(-1, 4)


def run_partition(task: PartitionTask) -> PartitionResult:
    """Run one partition; re-run it reading further while its last label is not settled (module doc).

    Who calls it: :func:`run_parallel`, in a worker process (local pool or Dask worker).
    """
    part = task.partition
    settings = task.settings
    began = time.perf_counter()
    lookahead = input_lookahead_ns(settings.delta_ms)
    runs = 0
    while True:
        read_to = part.read_limit_ns
        if part.emit_to_ns is not None and (read_to is None or part.emit_to_ns + lookahead < read_to):
            read_to = part.emit_to_ns + lookahead
        runs += 1
        result, settled = _run_once(task, read_to)
        if settled or read_to == part.read_limit_ns:
            result.runs = runs
            result.seconds = time.perf_counter() - began
            return result
        logger.info(
            "%s: the last label of the day is not settled %s past its end; reading twice as far",
            part.describe(),
            f"{lookahead / 1e9:g} s",
        )
        lookahead *= 2


def _run_once(task: PartitionTask, read_to: int | None) -> tuple[PartitionResult, bool]:
    part, settings = task.partition, task.settings
    engine = BacktestEngine(
        settings.tick_ms,
        settings.delta_ms,
        keep_records=task.keep_records,
        end_ns=part.emit_to_ns,
        start_ns=part.emit_from_ns,
    )
    window = Window(part.read_from_ns, read_to)
    counts = PipelineCounts()
    seen: set[str] = set()
    keys = (_RowKeys(), _RowKeys(), _RowKeys())  # BookTops, feature vectors, labels
    symbols = frozenset(part.symbols)
    engine_counts = engine.counts

    def process(event: MarketEvent, key: tuple[int, int, int]) -> None:
        owned = part.counts_input(event.ts_init)
        if owned:
            seen.add(event.symbol)
        if event.symbol not in symbols:
            return
        ticks, vectors, labels, bad = (
            engine_counts.ticks,
            engine_counts.feature_vectors,
            engine_counts.labels,
            engine_counts.bad_events,
        )
        engine.process_event(event)
        if owned:
            counts.events += 1
            counts.bad_events += engine_counts.bad_events - bad
        keys[0].add(key, engine_counts.ticks - ticks)
        keys[1].add(key, engine_counts.feature_vectors - vectors)
        keys[2].add(key, engine_counts.labels - labels)

    if task.events:
        for (ts_init, partition, offset), event in _keyed_events(settings, task.source, window):
            process(event, (ts_init, partition, offset))
    else:
        normalise = engine.normaliser.process
        for position, raw in _keyed_raws(settings, task.source, window):
            out = normalise(raw)
            if part.counts_input(raw.ts_init):
                counts.raw_records += 1
                counts.rejected_raw += len(out.rejects)
            for index, event in enumerate(out.events):
                process(event, (position, index, 0))
    for name in ("ticks", "feature_vectors", "labels", "bad_tops"):
        setattr(counts, name, getattr(engine_counts, name))
    settled = part.emit_to_ns is None or all(
        _settled(engine.book.pipelines.get(symbol), part.emit_to_ns, settings) for symbol in symbols
    )
    features, labels = engine.feature_table(), engine.label_table()
    top_t = np.fromiter((top.ts_event for top in engine.book_tops), dtype=np.int64, count=len(engine.book_tops))
    result = PartitionResult(
        partition=part,
        counts=counts,
        features=features,
        labels=labels,
        feature_keys=keys[1].matrix(features.t),
        label_keys=keys[2].matrix(labels.t_event),
        top_keys=keys[0].matrix(top_t) if task.keep_records else np.empty((0, 4), dtype=np.int64),
        symbols_seen=seen,
        read_to_ns=read_to,
        runs=1,
        seconds=0.0,
        book_tops=engine.book_tops,
        feature_records=engine.feature_records,
        label_records=engine.label_records,
    )
    return result, settled


def _settled(pipeline: SymbolPipeline | None, end_ns: int, settings: BacktestSettings) -> bool:
    """Can no more row of a tick before ``end_ns`` come from this symbol's later input?

    True once the tick ``end - TICK_MS + Δ`` closed (the last label before the end was made, or
    never will be), or the symbol is unsynced (its open ticks close unsynced and a new epoch labels
    none of the old one's), or it had no event at all (no tick, no open label).
    """
    if pipeline is None or not pipeline.synced:
        return True
    last_needed = end_ns - settings.tick_ms * _MS + settings.delta_ms * _MS
    return pipeline.next_tick_ns is not None and pipeline.next_tick_ns > last_needed


def _keyed_raws(settings: BacktestSettings, source: SourceSpec, window: Window) -> Iterator[tuple[int, RawFrame]]:
    """The raw records the serial run reads (from the CONNECTED at or before the window), with their log positions."""
    if source.kind == "topic":
        _, _, records = sources.topic_raw_records(settings, source.prefix, window, AvroSerde())
        return ((record.offset, raw) for record, raw in sources.typed_records(records, RawFrame))
    if source.kind == "lake":
        _, _, records = lake_source.lake_raw_records(settings.lake_uri, source.prefix, window)
        return ((record.offset, raw) for record, raw in sources.typed_records(records, RawFrame))
    # A capture or the synthetic market is read from its start: the index is the position in the log.
    if source.kind == "capture":
        assert source.path is not None
        return enumerate(sources.capture_raw_records(source.path, window))
    return enumerate(
        sources.synthetic_raw_records(source.seed, source.hours, settings.symbols, settings.tick_ms, window)
    )


def _keyed_events(
    settings: BacktestSettings, source: SourceSpec, window: Window
) -> Iterator[tuple[tuple[int, int, int], MarketEvent]]:
    """The market events the serial run reads, with their merge keys ``(ts_init, partition, offset)``."""
    if source.kind == "topic":
        _, _, records = sources.topic_event_records(settings, source.prefix, window, AvroSerde())
    elif source.kind == "lake":
        _, _, records = lake_source.lake_event_records(settings.lake_uri, source.prefix, window)
    else:
        raise ConfigError(f"--input events needs a topic or lake source; {source.describe()} is a raw log")
    return (((event.ts_init, r.partition, r.offset), event) for r, event in sources.typed_records(records, MarketEvent))


# -- the driver ----------------------------------------------------------------------------------------


def run_parallel(
    settings: BacktestSettings,
    source: SourceSpec,
    window: Window,
    *,
    events: bool = False,
    keep_records: bool = False,
    workers: int = 1,
    dask_scheduler: str | None = None,
) -> ParallelRun:
    """Plan the partitions, run them on ``workers`` local processes or the Dask cluster at
    ``dask_scheduler``, and merge them (see the module doc).

    Raises:
        ConfigError: events input from a raw-only source; no Dask cluster at the address.
        ReplayError: the window cannot be read, or events of a symbol the plan did not have.
    """
    if events and source.kind not in ("topic", "lake"):
        raise ConfigError(f"--input events needs a topic or lake source; {source.describe()} is a raw log")
    found = survey(settings, source, window)
    partitions = plan(settings, window, found, events=events)
    tasks = [PartitionTask(settings, source, part, events, keep_records) for part in partitions]
    logger.info(
        "backtest in %d partitions (%d symbols, %d days)",
        len(tasks),
        len(found.symbols),
        len({part.day for part in partitions}),
        extra={"workers": workers, "dask_scheduler": dask_scheduler},
    )
    results = _run_on_dask(dask_scheduler, tasks) if dask_scheduler else _run_on_processes(workers, tasks)
    seen = set().union(*(result.symbols_seen for result in results))
    missing = seen - set(found.symbols)
    if missing:
        raise ReplayError(
            f"events of {sorted(missing)} are in the window but in no CONNECTED record's symbols: "
            "the partitions would miss them (run the backtest without --workers)"
        )
    merged = merge(results)
    merged.start = found.start
    return merged


def _log_done(result: PartitionResult) -> None:
    logger.info(
        "partition %s done: %d ticks in %.1f s%s",
        result.partition.describe(),
        result.counts.ticks,
        result.seconds,
        f" ({result.runs} runs)" if result.runs > 1 else "",
    )


def _run_on_processes(workers: int, tasks: Sequence[PartitionTask]) -> list[PartitionResult]:
    if workers <= 1:
        results = []
        for task in tasks:
            results.append(run_partition(task))
            _log_done(results[-1])
        return results
    # spawn: the parent may hold threads (Kafka clients, tqdm) that a fork would copy mid-state.
    context = multiprocessing.get_context("spawn")
    done: dict[int, PartitionResult] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_partition, task): index for index, task in enumerate(tasks)}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            _log_done(done[futures[future]])
    return [done[index] for index in range(len(tasks))]


def _run_on_dask(address: str, tasks: Sequence[PartitionTask]) -> list[PartitionResult]:
    """The partitions as Dask tasks on the cluster at ``address`` (its workers need quotewatch installed)."""
    from distributed import Client

    try:
        client = Client(address, timeout=30)
    except OSError as exc:
        raise ConfigError(f"no Dask scheduler answers at {address}: {exc}") from exc
    with client:
        futures = client.map(run_partition, list(tasks), pure=False, key=[_task_key(task) for task in tasks])
        results: list[PartitionResult] = client.gather(futures)
    for result in results:
        _log_done(result)
    return results


def _task_key(task: PartitionTask) -> str:
    return f"quotewatch-backtest-{'-'.join(task.partition.symbols)}-{task.partition.day}-{uuid.uuid4().hex[:8]}"


# -- merging ----------------------------------------------------------------------------------------


def merge(results: Sequence[PartitionResult]) -> ParallelRun:
    """The partitions' rows in the serial run's order (by their order keys) and their counts added up.

    Raises:
        ValueError: two partitions made a row of the same event (a planning bug), or feature
            vectors of different widths (as the serial engine refuses them).
    """
    counts = PipelineCounts()
    for result in results:
        for item in fields(PipelineCounts):
            setattr(counts, item.name, getattr(counts, item.name) + getattr(result.counts, item.name))

    def order(keys: Sequence[NDArray[np.int64]], what: str) -> NDArray[np.intp]:
        stacked = np.concatenate([*keys, np.empty((0, 4), dtype=np.int64)])
        permutation = np.lexsort(stacked.T[::-1])
        ordered = stacked[permutation]
        if ordered.shape[0] > 1 and not np.any(np.diff(ordered, axis=0) != 0, axis=1).all():
            raise ValueError(f"two partitions emitted {what} of the same event")
        return permutation

    feature_order = order([r.feature_keys for r in results], "feature vectors")
    label_order = order([r.label_keys for r in results], "labels")
    top_order = order([r.top_keys for r in results], "book tops")

    widths = {r.features.values.shape[1] for r in results if r.features.t.size}
    if len(widths) > 1:
        raise ValueError(f"feature vectors of different widths {sorted(widths)}")
    with_rows = [r.features.values for r in results if r.features.t.size]
    values = np.concatenate(with_rows)[feature_order] if with_rows else np.empty((0, 0))
    spec_ids = [spec for r in results for spec in r.features.spec_id]
    features = FeatureTable(
        t=_concat([r.features.t for r in results], np.int64)[feature_order],
        symbol=_concat([r.features.symbol for r in results], np.str_)[feature_order],
        spec_id=[spec_ids[i] for i in feature_order.tolist()],
        values=values,
    )
    labels = LabelTable(
        t_event=_concat([r.labels.t_event for r in results], np.int64)[label_order],
        symbol=_concat([r.labels.symbol for r in results], np.str_)[label_order],
        label=_concat([r.labels.label for r in results], np.int64)[label_order],
        synced=_concat([r.labels.synced for r in results], np.bool_)[label_order],
    )
    return ParallelRun(
        counts=counts,
        features=features,
        labels=labels,
        partitions=[r.partition for r in results],
        start=None,
        book_tops=_reorder([record for r in results for record in r.book_tops], top_order),
        feature_records=_reorder([record for r in results for record in r.feature_records], feature_order),
        label_records=_reorder([record for r in results for record in r.label_records], label_order),
        partition_seconds=sum(r.seconds for r in results),
    )


def _concat(parts: Sequence[NDArray[Any]], dtype: Any) -> NDArray[Any]:
    return np.concatenate([*parts, np.empty(0, dtype=dtype)]).astype(dtype, copy=False)


_RecordT = TypeVar("_RecordT")


def _reorder(records: list[_RecordT], permutation: NDArray[np.intp]) -> list[_RecordT]:
    if not records:
        return records
    if len(records) != permutation.size:
        raise ValueError("records and their order keys differ in number")
    return [records[i] for i in permutation.tolist()]
