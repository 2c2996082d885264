"""Ingest: parse -> normalise -> Avro encode per core (no broker), the writer into the broker, and the
synthetic market's generation capacity.

- ``normalise+encode``: the ingest writer's CPU work for each raw record, in one thread (= per
  core): ``Normaliser.process`` (orjson + exact decimal parsing + gaps/status) and the Avro encoding
  of the RawFrame and of every MarketEvent. Inputs: each recorded capture and 60 s of the synthetic
  market in each protocol. "level updates" = level changes in UPDATE events (snapshot levels are
  counted separately in the notes). Peer: the same frames parsed naively (stdlib ``json`` +
  ``decimal.Decimal`` per price/size, no encoding), i.e. what a straightforward parser costs.
- ``writer -> broker``: the ingest's :class:`~quotewatch.services.ingest.writer.RawWriter` writing raw +
  events to the real broker with the idempotent producer, flushed. Peer: producing only the raw
  frames (the normaliser's and the events' share is the difference).
- ``synthetic market``: generation + Coinbase-protocol encoding of the feed server's market.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import time
import uuid
from decimal import Decimal
from typing import Any

from quotewatch.core.clock import SystemClock
from quotewatch.core.config import IngestSettings
from quotewatch.core.health import Liveness
from quotewatch.core.kafka import DeliveryTracker, ensure_topics, flush_or_fail, make_admin, make_producer
from quotewatch.core.records import RawFrame
from quotewatch.core.serde import AvroSerde
from quotewatch.domain.simulation.synthetic import SyntheticConfig, SyntheticMarket, batch_frames, synthetic_raw_frames
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from quotewatch.services.ingest.writer import IngestStats, QueueItem, RawWriter
from tests.benchmarks.harness import Context, Result

SUITE = "ingest"
GOAL_UPDATES = 150_000
GOAL_SYNTHETIC = 20_000


def _inputs(ctx: Context) -> list[tuple[str, list[RawFrame]]]:
    inputs = []
    for path in capture_files(ctx.shared_dir):
        capture = read_capture(path)
        inputs.append((path.name.split("_cryptofeed")[0].split("_gdax")[0], list(capture.raw_frames())))
    seconds = 10 if ctx.quick else 60
    for feed in ("coinbase-advanced", "coinbase-exchange"):
        config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=1, rate=2000)
        frames = list(synthetic_raw_frames(feed, config, seconds * 1_000_000_000))
        inputs.append((f"synthetic {feed.removeprefix('coinbase-')} {seconds}s", frames))
    return inputs


def _normalise_and_encode(raws: list[RawFrame], serde: AvroSerde) -> tuple[float, int, int]:
    normaliser = Normaliser()
    updates = snapshot_levels = 0
    started = time.perf_counter()
    for raw in raws:
        serde.encode("qw.md.raw", raw)
        for event in normaliser.process(raw).events:
            serde.encode("qw.md.events", event)
            if event.update is not None:
                updates += len(event.update.changes)
            elif event.snapshot is not None:
                snapshot_levels += len(event.snapshot.bids) + len(event.snapshot.asks)
    return time.perf_counter() - started, updates, snapshot_levels


def _naive(raws: list[RawFrame]) -> float:
    """The peer: stdlib json + Decimal for every price and size, no normalising, no encoding."""
    started = time.perf_counter()
    for raw in raws:
        if raw.kind != "FRAME":
            continue
        message = json.loads(raw.text)
        if message.get("type") == "l2update":
            [(side, Decimal(p), Decimal(s)) for side, p, s in message["changes"]]
        elif message.get("type") == "snapshot":
            [(Decimal(p), Decimal(s)) for p, s in message["bids"] + message["asks"]]
        elif message.get("channel") == "l2_data":
            for event in message["events"]:
                [(u["side"], Decimal(u["price_level"]), Decimal(u["new_quantity"])) for u in event["updates"]]
    return time.perf_counter() - started


def _best(fn: Any, repeat: int) -> Any:
    best = None
    for _ in range(repeat):
        result = fn()
        if best is None or result[0] < best[0]:
            best = result
    return best


def _cpu(ctx: Context) -> list[Result]:
    serde = AvroSerde()
    results = []
    repeat = 1 if ctx.quick else 3
    for name, raws in _inputs(ctx):
        seconds, updates, snapshot_levels = _best(lambda raws=raws: _normalise_and_encode(raws, serde), repeat)
        naive = min(_naive(raws) for _ in range(repeat))
        frames = sum(1 for r in raws if r.kind == "FRAME")
        synthetic = name.startswith("synthetic")
        results.append(
            Result(
                suite=SUITE,
                name=f"normalise+encode level updates/s per core: {name}",
                value=updates / seconds,
                unit="updates/s",
                peer="stdlib json + Decimal (parse only)",
                peer_value=updates / naive,
                goal=f">= {GOAL_UPDATES:,} updates/s" if synthetic else None,
                met=(updates / seconds >= GOAL_UPDATES) if synthetic else None,
                notes=(
                    f"{frames:,} frames -> {frames / seconds:,.0f} frames/s; {updates:,} level updates and "
                    f"{snapshot_levels:,} snapshot levels ({(updates + snapshot_levels) / seconds:,.0f} levels/s "
                    "counting snapshots); includes the Avro encoding of every RawFrame and MarketEvent. "
                    f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
                ),
            )
        )
    return results


def _broker(ctx: Context) -> list[Result]:
    bootstrap = ctx.broker()
    seconds = 10 if ctx.quick else 30
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=2, rate=2000)
    raws = list(synthetic_raw_frames("coinbase-advanced", config, seconds * 1_000_000_000))
    items = [QueueItem(r.kind, r.text, r.connection_id, r.frame_index, r.ts_init, 0) for r in raws]
    updates = sum(len(e.update.changes) for e in Normaliser().process_all(raws)[0] if e.update is not None)
    timings = {}
    for mode in ("writer", "raw only"):
        settings = IngestSettings(
            kafka_bootstrap_servers=bootstrap,
            topic_prefix=f"bench{uuid.uuid4().hex[:8]}",
            symbols="BTC-USD,ETH-USD",
            metrics_port=0,
        )
        ensure_topics(make_admin(settings), settings.topic_prefix)
        delivery = DeliveryTracker()
        producer = make_producer(settings, "bench-ingest", on_delivery=delivery)
        serde = AvroSerde()
        clock = SystemClock()
        writer = RawWriter(
            settings=settings,
            feed="coinbase-advanced",
            groups=[settings.symbols],
            serde=serde,
            producer=producer,
            delivery=delivery,
            clock=clock,
            items=queue.Queue(),
            liveness=Liveness("bench", clock, 30),
            stats=IngestStats(),
            on_resync=lambda connection, reason, symbols: None,
        )
        raw_topic = f"{settings.topic_prefix}.md.raw"
        started = time.perf_counter()
        if mode == "writer":
            for item in items:
                writer.write(item)
        else:
            for raw in raws:
                producer.produce(raw_topic, serde.encode(raw_topic, raw), b"coinbase-advanced")
                producer.poll(0)
        flush_or_fail(producer, 60)
        delivery.raise_if_failed()
        timings[mode] = time.perf_counter() - started
    frames = sum(1 for r in raws if r.kind == "FRAME")
    return [
        Result(
            suite=SUITE,
            name="writer -> broker (raw + events, flushed): level updates/s",
            value=updates / timings["writer"],
            unit="updates/s",
            peer="raw frames only",
            peer_value=updates / timings["raw only"],
            notes=(
                f"{seconds}s of the synthetic market (advanced, 2 symbols, {len(raws):,} raw records, "
                f"{frames:,} frames): "
                f"{frames / timings['writer']:,.0f} frames/s through RawWriter.write with the idempotent producer "
                f"(acks=all), to {bootstrap}."
            ),
        )
    ]


def _synthetic(ctx: Context) -> list[Result]:
    seconds = 5 if ctx.quick else 20
    out = []
    for feed in ("coinbase-advanced", "coinbase-exchange"):
        market = SyntheticMarket(SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=3, rate=20_000))
        sequence = itertools.count()
        started = time.perf_counter()
        end = market.config.start_ns + seconds * 1_000_000_000
        while market.now_ns < end:
            for batch in market.advance(market.now_ns + market.config.batch_ns):
                for _ in batch_frames(feed, market, batch, sequence.__next__):
                    pass
        elapsed = time.perf_counter() - started
        rate = market.level_updates / elapsed
        out.append(
            Result(
                suite=SUITE,
                name=f"synthetic market generate+encode ({feed.removeprefix('coinbase-')}): level updates/s",
                value=rate,
                unit="updates/s",
                goal=f">= {GOAL_SYNTHETIC:,} updates/s",
                met=rate >= GOAL_SYNTHETIC,
                notes=(
                    f"{market.level_updates:,} level updates and {market.trades:,} trades of 2 symbols in "
                    f"{elapsed:.2f}s of one core (event time {seconds}s at a configured 20k/s per symbol)."
                ),
            )
        )
    return out


def run(ctx: Context) -> list[Result]:
    return _cpu(ctx) + _synthetic(ctx) + _broker(ctx)
