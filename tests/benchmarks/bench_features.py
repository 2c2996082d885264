"""Features: µs per grid tick, alone and as part of the whole book pipeline, on the recorded captures.

1. *features per tick*: :meth:`FeatureState.close_tick` (book features + all windows) over the real
   top-3 of every tick of the captures, fed the same counters as live.
2. *pipeline per tick*: :class:`BookPipeline` end to end (events -> order book -> ticks -> BookTop
   and FeatureVector dicts) over the normalised captures, divided by the ticks it emits. This is
   the per-tick cost a backtest pays on top of decoding its input: 864k ticks (one day of
   BTC-USD at 100 ms) in <= 30 s needs <= ~35 µs per tick all included.
"""

from __future__ import annotations

import time
from typing import Any

from quotewatch.core.records import MarketEvent
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.market.features import FEATURES, FeatureState
from quotewatch.domain.market.orderbook import OrderBook
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from tests.benchmarks.harness import Context, Result

TICK_MS = 100


def _events(ctx: Context) -> list[list[MarketEvent]]:
    return [Normaliser().process_all(read_capture(path).raw_frames())[0] for path in capture_files(ctx.shared_dir)]


def _pipeline_seconds(streams: list[list[MarketEvent]]) -> tuple[float, int, list[Any]]:
    started = time.perf_counter()
    ticks = 0
    tops = []
    for events in streams:
        pipeline = BookPipeline(TICK_MS)
        for position, event in enumerate(events):
            for output in pipeline.process(event, position):
                ticks += 1
                tops.append((output.book_top.ts_event, output.book_top.bids, output.book_top.asks))
    return time.perf_counter() - started, ticks, tops


def run(ctx: Context) -> list[Result]:
    streams = _events(ctx)
    repeat = 2 if ctx.quick else 5
    pipeline_best = float("inf")
    ticks = 0
    tops: list[Any] = []
    for _ in range(repeat):
        seconds, ticks, tops = _pipeline_seconds(streams)
        pipeline_best = min(pipeline_best, seconds)
    events = sum(len(stream) for stream in streams)

    # The feature computation alone, over the same ticks (levels as (price, size) tuples, as the
    # pipeline hands them over), with activity counters moving as live.
    levels = [
        (
            t,
            tuple((lv.price_e8, lv.size_e8) for lv in bids),
            tuple((lv.price_e8, lv.size_e8) for lv in asks),
        )
        for t, bids, asks in tops
    ]
    features_best = float("inf")
    for _ in range(repeat):
        state = FeatureState(TICK_MS)
        state.reset(levels[0][0])
        started = time.perf_counter()
        top = ((), ())
        for t, bids, asks in levels:
            state.on_update(t, 3, top, top)
            state.close_tick(t, bids, asks)
        features_best = min(features_best, time.perf_counter() - started)

    # Loading the full-depth snapshots (tens of thousands of levels) is a one-off per epoch that
    # a day-long backtest amortises; measure it apart to show the steady state too.
    snapshots = [e.snapshot for stream in streams for e in stream if e.snapshot is not None]
    load_best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for snapshot in snapshots:
            OrderBook(3).load(snapshot.bids, snapshot.asks)
        load_best = min(load_best, time.perf_counter() - started)
    per_tick_steady = max(0.0, pipeline_best - load_best) / ticks * 1e6
    per_tick_pipeline = pipeline_best / ticks * 1e6
    per_tick_features = features_best / len(levels) * 1e6
    return [
        Result(
            suite="features",
            name="feature computation per tick",
            value=per_tick_features,
            unit="µs/tick",
            goal="~10 µs",
            met=per_tick_features <= 10,
            notes=f"{len(levels):,} ticks of the recorded captures, {len(FEATURES)} values per tick.",
        ),
        Result(
            suite="features",
            name="book pipeline per tick (events -> BookTop + FeatureVector)",
            value=per_tick_pipeline,
            unit="µs/tick",
            goal="<= 35 µs (864k ticks in 30 s)",
            met=per_tick_pipeline <= 35,
            notes=f"{events:,} market events -> {ticks:,} ticks over the 3 captures "
            f"({events / ticks:.1f} events per tick; snapshot loads included).",
        ),
        Result(
            suite="features",
            name="book pipeline per tick, without the snapshot loads",
            value=per_tick_steady,
            unit="µs/tick",
            goal="<= 35 µs (864k ticks in 30 s)",
            met=per_tick_steady <= 35,
            notes=f"The same run minus the time to load its {len(snapshots)} full-depth snapshots "
            f"({load_best * 1e3:.0f} ms), i.e. the steady state of a long backtest.",
        ),
    ]
