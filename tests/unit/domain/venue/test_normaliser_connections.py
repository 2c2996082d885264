"""The normaliser with several connections interleaved in one log, per-product failures, and control frames.

The ingest may spread its products over several connections (``PRODUCTS_PER_CONNECTION``); their
records interleave in the one raw log. Each connection keeps its own sequence check, sync state and
event times; a replay from the CONNECTED records of the live connections reproduces the events.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from quotewatch.core.records import FeedStatus, Gap, MarketEvent, RawFrame, RawKind
from quotewatch.domain.venue.normaliser import Normaliser, control_text
from tests.records import body

T0 = 1_786_309_548_000_000_000
MS = 1_000_000


class Clock:
    """ts_init for every record of the log, strictly increasing."""

    def __init__(self) -> None:
        self.ts = T0

    def tick(self) -> int:
        self.ts += MS
        return self.ts


class Conn:
    """Records of one connection (its own frame indexes and Advanced sequence numbers)."""

    def __init__(self, clock: Clock, connection_id: str, symbols: list[str]) -> None:
        self.clock = clock
        self.connection_id = connection_id
        self.symbols = symbols
        self.index = 0
        self.sequence = 0

    def record(self, kind: RawKind, text: str, frame_index: int = -1, ts_event: int | None = None) -> RawFrame:
        ts = self.clock.tick()
        return RawFrame(
            ts_event=ts if ts_event is None else ts_event,
            ts_init=ts,
            exchange="coinbase",
            feed="coinbase-advanced",
            symbols=tuple(self.symbols),
            connection_id=self.connection_id,
            frame_index=frame_index,
            kind=kind,
            text=text,
        )

    def connected(self) -> RawFrame:
        return self.record("CONNECTED", control_text("CONNECTING", "test"))

    def disconnected(self) -> RawFrame:
        return self.record("DISCONNECTED", control_text("RECONNECTING", "dropped"))

    def frame(self, message: dict[str, Any], *, sequence: int | None = None) -> RawFrame:
        message = {"sequence_num": self.sequence if sequence is None else sequence, **message}
        self.sequence = message["sequence_num"] + 1
        record = self.record("FRAME", json.dumps(message), frame_index=self.index)
        self.index += 1
        return record

    def l2(self, kind: str, *symbols: str, ms: int = 0, sequence: int | None = None, bad: str = "") -> RawFrame:
        events = []
        for symbol in symbols:
            quantity = "x1" if symbol == bad else "1"
            update = {"side": "bid", "event_time": _at(ms), "price_level": "10", "new_quantity": quantity}
            events.append({"type": kind, "product_id": symbol, "updates": [update]})
        return self.frame({"channel": "l2_data", "timestamp": _at(ms + 1), "events": events}, sequence=sequence)


def _at(ms: int) -> str:
    return f"2026-08-09T21:05:{48 + ms // 1000:02d}.{ms % 1000:03d}Z"


def _gaps(events: list[MarketEvent]) -> list[tuple[str, str]]:
    return [(e.symbol, body(e, Gap).reason) for e in events if e.kind == "GAP"]


def _two_connections() -> tuple[Clock, Conn, Conn]:
    clock = Clock()
    return clock, Conn(clock, "a1", ["BTC-USD", "ETH-USD"]), Conn(clock, "b1", ["SOL-USD", "XRP-USD"])


def test_interleaved_connections_keep_their_own_sequence_check_and_sync_state() -> None:
    _, a, b = _two_connections()
    normaliser = Normaliser()
    records = [
        a.connected(),
        b.connected(),
        a.l2("snapshot", "BTC-USD", "ETH-USD", ms=10),
        b.l2("snapshot", "SOL-USD", "XRP-USD", ms=20),
        a.l2("update", "BTC-USD", ms=30),  # a's sequence 1, b's 1 next: no jump on either
        b.l2("update", "SOL-USD", ms=40),
        a.l2("update", "ETH-USD", ms=50),
    ]
    events, rejects = normaliser.process_all(records)
    assert rejects == []
    assert _gaps(events) == [(s, "RECONNECT") for s in ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD")]
    assert normaliser.synced == {"BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD"}
    assert normaliser.connection_ids == {"a1", "b1"}

    # b skips a sequence number: only b's products get a GAP, and only b is resynced.
    out = normaliser.process(b.l2("update", "XRP-USD", ms=60, sequence=5))
    assert _gaps(out.events) == [("SOL-USD", "SEQUENCE_JUMP"), ("XRP-USD", "SEQUENCE_JUMP")]
    assert "on b1" in (out.resync or "")
    assert normaliser.synced == {"BTC-USD", "ETH-USD"}

    # b drops and reconnects: its new connection replaces it; a is untouched.
    out = normaliser.process(b.disconnected())
    assert {e.symbol for e in out.events} == {"SOL-USD", "XRP-USD"}
    b2 = Conn(b.clock, "b2", b.symbols)
    out = normaliser.process(b2.connected())
    assert _gaps(out.events) == [("SOL-USD", "RECONNECT"), ("XRP-USD", "RECONNECT")]
    assert normaliser.connection_ids == {"a1", "b2"}
    normaliser.process(b2.l2("snapshot", "SOL-USD", "XRP-USD", ms=70))
    out = normaliser.process(a.l2("update", "BTC-USD", ms=80))  # a's sequence carries on: no gap
    assert _gaps(out.events) == []
    assert normaliser.synced == {"BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD"}


def test_gap_times_are_per_connection() -> None:
    """A GAP for lost changes is at the symbol's last good event on its own connection."""
    _, a, b = _two_connections()
    normaliser = Normaliser()
    normaliser.process_all([a.connected(), b.connected(), a.l2("snapshot", "BTC-USD", ms=100)])
    normaliser.process(b.l2("snapshot", "SOL-USD", ms=900))  # b's exchange time runs ahead of a's
    out = normaliser.process(a.l2("update", "BTC-USD", ms=950, sequence=7))
    (gap,) = [e for e in out.events if e.kind == "GAP"]
    assert (gap.symbol, gap.ts_event) == ("BTC-USD", T0 + 100 * MS)


def test_a_replay_from_the_live_connections_connected_records_gives_the_same_events() -> None:
    """Any start at or before the earliest CONNECTED of the connections live at a point gives, from
    that point on, the events of the whole log."""
    clock, a, b = _two_connections()
    rng = random.Random(11)
    records = [a.connected(), b.connected()]
    records += [a.l2("snapshot", "BTC-USD", "ETH-USD"), b.l2("snapshot", "SOL-USD", "XRP-USD")]
    generation = itertools.count(2)
    for ms in range(100, 3000, 37):
        conn = rng.choice([a, b])
        roll = rng.random()
        if roll < 0.04:  # a reconnect of this connection
            records.append(conn.disconnected())
            fresh = Conn(clock, f"{conn.connection_id[0]}{next(generation)}", conn.symbols)
            records += [fresh.connected(), fresh.l2("snapshot", *fresh.symbols, ms=ms)]
            if conn is a:
                a = fresh
            else:
                b = fresh
            continue
        if roll < 0.08:
            records.append(conn.l2("update", conn.symbols[0], ms=ms, sequence=conn.sequence + 3))
            continue
        if roll < 0.15:
            records.append(conn.record("CLOCK", "tick", ts_event=T0 + ms * MS))
            continue
        records.append(conn.l2("update", rng.choice(conn.symbols), ms=ms))
    full = Normaliser()
    outputs = [full.process(r).events for r in records]
    connected_at = {r.connection_id: i for i, r in enumerate(records) if r.kind == "CONNECTED"}
    checked = 0
    live: dict[str, str] = {}
    for point, record in enumerate(records):
        if record.kind == "CONNECTED":
            for symbol in record.symbols:
                live[symbol] = record.connection_id
        start = min(connected_at[c] for c in set(live.values()))
        replay = Normaliser()
        replayed = [replay.process(r).events for r in records[start:]]
        assert replayed[point - start :] == outputs[point:], f"replay from {start} differs after {point}"
        checked += 1
    assert checked == len(records) > 80


def test_a_multi_product_frame_with_one_bad_event_applies_the_others_and_gaps_only_the_bad_product() -> None:
    _, a, _ = _two_connections()
    normaliser = Normaliser()
    normaliser.process_all([a.connected(), a.l2("snapshot", "BTC-USD", "ETH-USD", ms=10)])
    out = normaliser.process(a.l2("update", "BTC-USD", "ETH-USD", ms=20, bad="ETH-USD"))
    assert [(e.symbol, e.kind) for e in out.events] == [("BTC-USD", "UPDATE"), ("ETH-USD", "GAP")]
    assert body(out.events[1], Gap).reason == "PARSE_ERROR"
    assert out.events[1].ts_event == T0 + 10 * MS  # ETH-USD's last good event
    assert [(r.error_type, r.symbol, r.source_ref) for r in out.rejects] == [("InvalidField", "ETH-USD", "a1:1")]
    assert out.resync is None  # BTC-USD stays on its connection...
    assert out.resync_symbols == ["ETH-USD"]  # ...ETH-USD alone is resubscribed
    assert normaliser.synced == {"BTC-USD"}
    # A fresh snapshot of ETH-USD (the resubscription's) syncs it again, on the same connection.
    normaliser.process(a.l2("snapshot", "ETH-USD", ms=30))
    assert normaliser.synced == {"BTC-USD", "ETH-USD"}


def test_odd_control_frames_are_used_and_noticed_never_rejected() -> None:
    _, a, _ = _two_connections()
    normaliser = Normaliser()
    normaliser.process(a.connected())
    ack = {
        "channel": "subscriptions",
        "client_id": "",
        "timestamp": "",
        "events": [{"subscriptions": {"level2": ["BTC-USD", "ETH-USD"]}, "surprise": 1}],
        "new_envelope_field": True,
    }
    out = normaliser.process(a.frame(ack))
    assert out.rejects == []
    assert [(e.symbol, body(e, FeedStatus).state) for e in out.events] == [
        ("BTC-USD", "SUBSCRIBED"),
        ("ETH-USD", "SUBSCRIBED"),
    ]
    assert normaliser.subscribed == {"BTC-USD", "ETH-USD"}
    assert sorted((n.message_type, n.code) for n in out.notices) == [
        ("subscriptions", "invalid_field"),
        ("subscriptions", "unknown_field"),
        ("subscriptions", "unknown_field"),
    ]
    assert {n.source_ref for n in out.notices} == {"a1:0"}
    assert any("'timestamp'" in n.detail for n in out.notices)
    heartbeat = {"channel": "heartbeats", "timestamp": "not a time", "events": [{"heartbeat_counter": 3}]}
    out = normaliser.process(a.frame(heartbeat))
    assert (out.events, out.rejects, out.resync) == ([], [], None)
    assert {n.code for n in out.notices} == {"invalid_field", "unusable"}
    # Data frames stay strict: the same empty timestamp on a book frame is a reject and a GAP.
    normaliser.process(a.l2("snapshot", "BTC-USD", ms=10))
    out = normaliser.process(
        a.frame({"channel": "l2_data", "timestamp": "", "events": [{"type": "update", "product_id": "BTC-USD"}]})
    )
    assert [r.error_type for r in out.rejects] == ["InvalidField"]
    assert _gaps(out.events) == [("BTC-USD", "PARSE_ERROR")]
