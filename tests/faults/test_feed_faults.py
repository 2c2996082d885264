"""Feed faults, many times in a row: connection drops, silence, sequence gaps, malformed frames, slow frames.

One session per fault kind: the local feed server (synthetic market, Advanced protocol, in a thread)
and ``quotewatch run ingest`` as a real process. Every connection of the session but the last is
hit by the fault (the server's fault plan is switched per connection: N faulted connections, then
a clean one), so the ingest resyncs N times in a row.

The reference is the synthetic market itself: it is deterministic in its seed, start time and batch
windows, so a replica advanced to the batch window of any event in ``md.events`` holds the exact
book the server held then. For each symbol the book rebuilt from ``md.events`` is compared with
the replica at every snapshot (right after each resync), at every 25th update and at the last
update before each gap: "every book matches the reference after resync", and it matched up to the
fault too. The gaps (by reason) and reconnects are counted from ``md.events`` and from the
ingest's own ``/metrics``; ``md.raw`` must hold every frame received once, in order, per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.core.kafka import ensure_topics, make_admin
from quotewatch.core.records import DeadLetter, Gap, MarketEvent, RawFrame
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig, SyntheticMarket
from quotewatch.local.kafka import free_port
from quotewatch.services.feed_server.server import FaultPlan, FeedServer, RunningFeedServer, SyntheticSource
from tests.faults.conftest import FaultReport
from tests.faults.support import SYMBOLS, Rec, ServiceProcess, metric_value, read_all, trials
from tests.helpers import wait_for
from tests.records import body, checked
from tests.unit.domain.venue.test_normaliser_golden import EventBook

AFTER = 30
"""Frames sent on a connection before its fault (the subscription answer and snapshots come first)."""

KINDS: dict[str, tuple[FaultPlan, str]] = {
    "connection drop": (FaultPlan(drop_after=AFTER, connections=0), "RECONNECT"),
    "silence": (FaultPlan(silent_after=AFTER, connections=0), "RECONNECT"),
    "sequence gap": (FaultPlan(skip_sequence_after=AFTER, connections=0), "SEQUENCE_JUMP"),
    "malformed frame": (FaultPlan(malformed_after=AFTER, connections=0), "PARSE_ERROR"),
    # Held back longer than HEARTBEAT_TIMEOUT_SECONDS (1.5 s): the ingest must take it for dead.
    "slow frames": (FaultPlan(delay_after=AFTER, delay_ms=2500, delay_frames=1, connections=0), "RECONNECT"),
}
CHECK_EVERY = 25


@dataclass
class SymbolCheck:
    """The replay of one symbol's events against a replica of its market."""

    checkpoints: int = 0
    mismatches: list[str] = field(default_factory=list)
    epochs: int = 0
    epochs_verified: int = 0


def window_end(ts: int, config: SyntheticConfig) -> int:
    """The end of the batch window an event at ``ts`` belongs to (windows are (end - batch, end])."""
    windows = -(-(ts - config.start_ns) // config.batch_ns)
    return config.start_ns + windows * config.batch_ns


def check_symbol(symbol: str, events: list[MarketEvent], config: SyntheticConfig) -> SymbolCheck:
    """Rebuild ``symbol``'s book from its events and compare it with the replica market at checkpoints."""
    replica = SyntheticMarket(replace(config, symbols=(symbol,)))
    book = EventBook()
    result = SymbolCheck()
    epoch_ok = True
    updates_in_epoch = 0

    def compare(event: MarketEvent, why: str) -> bool:
        replica.advance(window_end(event.ts_event, config))
        result.checkpoints += 1
        if book.as_dict() != replica.book(symbol):
            result.mismatches.append(f"{symbol} {why} at ts_event {event.ts_event}")
            return False
        return True

    last_update: MarketEvent | None = None
    for event in events:
        kind = event.kind
        if kind == "GAP":
            if book.synced:  # an epoch ends: check where it got to
                if last_update is not None:
                    epoch_ok &= compare(last_update, "last update before a gap")
                result.epochs_verified += epoch_ok
            book.apply(event)
            last_update = None
            continue
        book.apply(event)
        if kind == "SNAPSHOT":
            result.epochs += 1
            epoch_ok = compare(event, "snapshot after a resync")
            updates_in_epoch = 0
        elif kind == "UPDATE" and book.synced:
            last_update = event
            updates_in_epoch += 1
            if updates_in_epoch % CHECK_EVERY == 0:
                epoch_ok &= compare(event, f"update {updates_in_epoch} of an epoch")
    if book.synced:
        if last_update is not None:
            epoch_ok &= compare(last_update, "last update of the run")
        result.epochs_verified += epoch_ok
    return result


def fault_fired(kind: str, stats: Any) -> bool:
    """Did the server inject ``kind`` on the connection with these stats?"""
    return {
        "connection drop": stats.dropped,
        "silence": stats.silent,
        "sequence gap": bool(stats.skipped_sequences),
        "malformed frame": stats.malformed_sent > 0,
        "slow frames": stats.delayed > 0,
    }[kind]


async def _switch_plans(server: FeedServer, plan: FaultPlan, faulted: int) -> None:
    """On the server's loop: connections 1..``faulted`` get ``plan``, later ones none.

    A connection takes its plan when it is accepted, and the ingest holds one connection at a
    time, so switching the plan right after connection k arrived decides connection k + 1.
    """
    seen = 0
    while True:
        count = len(server.connections)
        if count != seen:
            seen = count
            server.faults = plan if count + 1 <= faulted else FaultPlan()
        await asyncio.sleep(0.002)


@pytest.mark.timeout(1800)  # 100 trials under make faults; a few seconds each in make test
@pytest.mark.parametrize("kind", list(KINDS))
def test_feed_faults_every_book_matches_the_reference_after_resync(
    kind: str, make_settings: Any, tmp_path: Path, fault_report: FaultReport
) -> None:
    count = trials(subset=3, full=100)
    plan, gap_reason = KINDS[kind]
    settings: CommonSettings = make_settings(symbols=SYMBOLS)
    names = TopicNames(settings.topic_prefix)
    ensure_topics(make_admin(settings), settings.topic_prefix)
    server = FeedServer(
        "advanced",
        SyntheticSource(SyntheticConfig(symbols=SYMBOLS, seed=23, rate=600.0)),
        faults=plan,
        heartbeat_interval=0.25,
    )
    running = RunningFeedServer(server).start()
    switcher = asyncio.run_coroutine_threadsafe(_switch_plans(server, plan, count), running.loop)
    ingest = ServiceProcess(
        "ingest",
        ["run", "ingest"],
        {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "TOPIC_PREFIX": settings.topic_prefix,
            "SYMBOLS": ",".join(SYMBOLS),
            "COINBASE_WS_URL": running.url,
            "FEED": "coinbase-advanced",
            "HEARTBEAT_TIMEOUT_SECONDS": "1.5",
            "BACKOFF_INITIAL_SECONDS": "0.2",
            "BACKOFF_MAX_SECONDS": "1.0",
            "METRICS_PORT": str(free_port()),
        },
        tmp_path,
    )
    try:
        ingest.start()

        def clean_connection_streaming() -> bool:
            ingest.assert_alive()
            connections = running.call(lambda: list(server.connections))
            return len(connections) > count and connections[count].book_updates_sent >= 40

        wait_for(clean_connection_streaming, timeout=30 + 8 * count, interval=0.2, message=f"{count} faults")
        metrics = ingest.metrics()
        assert ingest.stop() == 0, ingest.log_tail()
        connections = running.call(lambda: list(server.connections))
        market = server.market
        assert market is not None
        config = market.config
    finally:
        switcher.cancel()
        with contextlib.suppress(Exception):
            running.stop()
        ingest.close()

    fired = [c for c in connections[:count] if c.faulted and fault_fired(kind, c)]
    assert not connections[count].faulted
    events = read_all(settings, names.md_events)
    raw = read_all(settings, names.md_raw)
    by_symbol: dict[str, list[MarketEvent]] = defaultdict(list)
    for record in events:
        by_symbol[checked(record.value, MarketEvent).symbol].append(checked(record.value, MarketEvent))
    checks = {symbol: check_symbol(symbol, by_symbol[symbol], config) for symbol in SYMBOLS}
    gaps: Counter[str] = Counter(
        body(e, Gap).reason for symbol_events in by_symbol.values() for e in symbol_events if e.kind == "GAP"
    )
    raw_frames = [checked(r.value, RawFrame) for r in raw]
    connected = [frame for frame in raw_frames if frame.kind == "CONNECTED"]
    lost, duplicated = frame_log_faults(raw)
    dead_letters = read_all(settings, names.dlq)
    reconnects = int(metric_value(metrics, "quotewatch_reconnects_total", service="ingest"))
    # A trial recovered when the epoch its resync started was verified for every symbol.
    recovered = min(c.epochs_verified for c in checks.values()) - 1  # the first epoch is the session start
    mismatches = [m for c in checks.values() for m in c.mismatches]
    fault_report.add(
        f"feed: {kind}",
        trials=len(fired),
        recovered=max(0, min(recovered, len(fired))) if not mismatches else 0,
        lost=lost,
        duplicated=duplicated,
        notes=(
            f"gaps {dict(gaps)}; reconnects {reconnects} (/metrics), {len(connected)} connections; "
            f"{sum(c.checkpoints for c in checks.values())} book checkpoints vs the replica market"
            + (f"; {len(dead_letters)} dead letters" if dead_letters else "")
        ),
    )
    assert len(fired) == count, f"the server injected {len(fired)} of {count} faults"
    assert not mismatches, mismatches[:10]
    assert gaps[gap_reason] >= count, gaps
    assert len(connected) == count + 1, "one connection per fault, then the clean one"
    assert reconnects >= count, "every lost connection counted (a back-off adds one)"
    for symbol, check in checks.items():
        assert check.epochs == count + 1, f"{symbol}: a snapshot after every resync"
        assert check.epochs_verified == count + 1, f"{symbol}: every epoch checked and equal to the market"
    assert (lost, duplicated) == (0, 0)
    if kind == "malformed frame":
        refs = {(frame.connection_id, frame.frame_index): frame for frame in raw_frames}
        assert len(dead_letters) == count
        for record in dead_letters:
            letter = checked(record.value, DeadLetter)
            assert letter.source_topic == names.md_raw
            connection_id, frame_index = letter.source_ref.rsplit(":", 1)
            assert refs[(connection_id, int(frame_index))].text.encode() == letter.source_value
    else:
        assert dead_letters == []


def frame_log_faults(raw: list[Rec]) -> tuple[int, int]:
    """(frames missing, frames logged twice) in ``md.raw``, over every connection."""
    indexes: dict[str, Counter[int]] = defaultdict(Counter)
    for record in raw:
        frame = checked(record.value, RawFrame)
        if frame.kind == "FRAME":
            indexes[frame.connection_id][frame.frame_index] += 1
    lost = sum(max(seen) + 1 - len(seen) for seen in indexes.values())
    duplicated = sum(count - 1 for seen in indexes.values() for count in seen.values())
    return lost, duplicated
