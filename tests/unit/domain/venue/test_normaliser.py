"""The normaliser's rules: gaps, status, clock, rejects; and fuzzing with garbage."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from quotewatch.core.records import (
    BookLevel,
    BookSnapshot,
    BookUpdate,
    FeedStatus,
    Gap,
    LevelChange,
    MarketEvent,
    RawFrame,
    RawKind,
)
from quotewatch.core.serde import AvroSerde
from quotewatch.domain.market.book_pipeline import BookPipeline
from quotewatch.domain.venue.normaliser import Normaliser, control_text, parse_control_text
from tests.records import body

T0 = 1_786_309_548_000_000_000
MS = 1_000_000
SYMBOLS = ["BTC-USD", "ETH-USD"]


class Log:
    """Builds RawFrame records of one feed with increasing ts_init."""

    def __init__(self, feed: str = "coinbase-advanced", connection: str = "c1") -> None:
        self.feed = feed
        self.connection = connection
        self.ts = T0
        self.index = 0
        self.sequence = 0

    def record(self, kind: RawKind, text: str, ts_event: int | None = None, frame_index: int = -1) -> RawFrame:
        self.ts += 1_000_000
        return RawFrame(
            ts_event=self.ts if ts_event is None else ts_event,
            ts_init=self.ts,
            exchange="coinbase",
            feed=self.feed,
            symbols=tuple(SYMBOLS),
            connection_id=self.connection,
            frame_index=frame_index,
            kind=kind,
            text=text,
        )

    def connected(self, connection: str, state: str = "CONNECTING") -> RawFrame:
        self.connection = connection
        self.index = 0
        self.sequence = 0
        return self.record("CONNECTED", control_text(state, "test"))

    def frame(self, message: dict[str, Any] | str) -> RawFrame:
        text = message if isinstance(message, str) else json.dumps(message)
        record = self.record("FRAME", text, frame_index=self.index)
        self.index += 1
        return replace(record, ts_event=record.ts_init)

    def advanced(self, channel: str, events: list[Any], *, sequence: int | None = None) -> RawFrame:
        if sequence is None:
            sequence = self.sequence
        self.sequence = sequence + 1
        return self.frame(
            {"channel": channel, "timestamp": "2026-08-09T21:05:48.5Z", "sequence_num": sequence, "events": events}
        )

    def l2(self, kind: str, symbol: str, *updates: tuple[str, str, str], sequence: int | None = None) -> RawFrame:
        return self.advanced(
            "l2_data",
            [
                {
                    "type": kind,
                    "product_id": symbol,
                    "updates": [
                        {"side": s, "event_time": "2026-08-09T21:05:48.25Z", "price_level": p, "new_quantity": q}
                        for s, p, q in updates
                    ],
                }
            ],
            sequence=sequence,
        )


def _kinds(events: list[MarketEvent]) -> list[tuple[str, str]]:
    return [(e.symbol, e.kind) for e in events]


def test_connected_emits_status_and_gap_for_every_symbol() -> None:
    log = Log()
    out = Normaliser().process(log.connected("c1"))
    assert _kinds(out.events) == [
        ("BTC-USD", "STATUS"),
        ("ETH-USD", "STATUS"),
        ("BTC-USD", "GAP"),
        ("ETH-USD", "GAP"),
    ]
    assert out.events[0].status == FeedStatus(state="CONNECTING", detail="test")
    assert body(out.events[2], Gap).reason == "RECONNECT"
    assert all(e.ts_init == log.ts and e.connection_id == "c1" for e in out.events)


def test_snapshot_syncs_and_subscribes_and_updates_follow() -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    out = normaliser.process(log.l2("snapshot", "BTC-USD", ("bid", "10", "1"), ("offer", "11", "2")))
    assert _kinds(out.events) == [("BTC-USD", "STATUS"), ("BTC-USD", "SNAPSHOT")]
    assert body(out.events[0], FeedStatus).state == "SUBSCRIBED"
    assert out.events[1].source_sequence == 0
    assert normaliser.synced == {"BTC-USD"}
    out = normaliser.process(log.l2("update", "BTC-USD", ("bid", "10", "0")))
    assert _kinds(out.events) == [("BTC-USD", "UPDATE")]
    assert body(out.events[0], BookUpdate).changes == (LevelChange(side="BID", price_e8=1_000_000_000, size_e8=0),)
    assert out.resync is None


def test_sequence_jump_is_a_gap_for_synced_symbols_and_a_resync() -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.l2("snapshot", "BTC-USD", ("bid", "10", "1")))
    out = normaliser.process(log.l2("update", "BTC-USD", ("bid", "10", "2"), sequence=5))
    assert _kinds(out.events) == [("BTC-USD", "GAP"), ("BTC-USD", "UPDATE")]
    gap = body(out.events[0], Gap)
    assert (gap.reason, gap.expected_sequence, gap.received_sequence) == ("SEQUENCE_JUMP", 1, 5)
    assert "jumped from 0 to 5" in (out.resync or "")
    assert normaliser.synced == set()
    # The next consecutive frame carries on without another gap.
    assert _kinds(normaliser.process(log.l2("update", "BTC-USD", ("bid", "10", "3"))).events) == [("BTC-USD", "UPDATE")]


def _at(ms: int) -> str:
    """An RFC 3339 time ``ms`` milliseconds after 21:05:48 (T0)."""
    return f"2026-08-09T21:05:{48 + ms // 1000:02d}.{ms % 1000:03d}Z"


def _l2_at(
    log: Log, symbol: str, kind: str, event_ms: int, sent_ms: int, sequence: int | None = None, quantity: str = "1"
) -> RawFrame:
    """An Advanced l2_data frame whose update is at ``event_ms`` and whose envelope is sent at ``sent_ms``."""
    if sequence is None:
        sequence = log.sequence
    log.sequence = sequence + 1
    update = {"side": "bid", "event_time": _at(event_ms), "price_level": "10", "new_quantity": quantity}
    event = {"type": kind, "product_id": symbol, "updates": [update]}
    return log.frame({"channel": "l2_data", "timestamp": _at(sent_ms), "sequence_num": sequence, "events": [event]})


def _synced_log() -> tuple[Log, Normaliser, BookPipeline, dict[str, int]]:
    """BTC-USD and ETH-USD synced, through a book pipeline; returns each symbol's latest event time."""
    log = Log()
    normaliser = Normaliser()
    pipeline = BookPipeline(100)
    records = [
        log.connected("c1"),
        _l2_at(log, "BTC-USD", "snapshot", 100, 200),  # STATUS SUBSCRIBED at the send time, 200
        _l2_at(log, "ETH-USD", "snapshot", 300, 400),
        _l2_at(log, "BTC-USD", "update", 1_500, 1_600),
        _l2_at(log, "ETH-USD", "update", 1_250, 1_700),  # older than BTC-USD's latest update
    ]
    for record in records:
        for event in normaliser.process(record).events:
            pipeline.process(event)
    assert normaliser.synced == {"BTC-USD", "ETH-USD"}
    return log, normaliser, pipeline, {"BTC-USD": T0 + 1_500 * MS, "ETH-USD": T0 + 1_250 * MS}


def _gaps_close_no_tick(pipeline: BookPipeline, events: list[MarketEvent]) -> None:
    for event in events:
        if event.kind == "GAP":
            assert pipeline.process(event) == [], "a GAP for lost changes closes no tick with the stale book"
            assert not pipeline.pipelines[event.symbol].synced


def test_sequence_gap_is_stamped_per_symbol_at_its_last_good_event_not_at_the_revealing_frame() -> None:
    log, normaliser, pipeline, last = _synced_log()
    # Frames 4 and 5 are lost; frame 6 (sent at 2.9 s, its update at 2.0 s) reveals it.
    out = normaliser.process(_l2_at(log, "BTC-USD", "update", 2_000, 2_900, sequence=6))
    gaps = {e.symbol: e.ts_event for e in out.events if e.kind == "GAP"}
    # Not the revealing frame's time (2.9 s), nor the connection's latest (1.5 s) for ETH-USD.
    assert gaps == last
    _gaps_close_no_tick(pipeline, out.events)


def test_unreadable_book_frame_with_a_readable_timestamp_is_a_gap_at_the_last_good_event() -> None:
    log, normaliser, pipeline, last = _synced_log()
    out = normaliser.process(_l2_at(log, "ETH-USD", "update", 2_000, 2_900, quantity="one"))
    assert [(r.error_type, r.symbol) for r in out.rejects] == [("InvalidField", "ETH-USD")]
    assert {body(e, Gap).reason for e in out.events} == {"PARSE_ERROR"}
    # The event names its product: only that product's book is lost, at its last good event.
    assert {e.symbol: e.ts_event for e in out.events} == {"ETH-USD": last["ETH-USD"]}  # not 2.9 s
    assert (out.resync, out.resync_symbols) == (None, ["ETH-USD"])
    assert normaliser.synced == {"BTC-USD"}
    _gaps_close_no_tick(pipeline, out.events)


def test_overflow_gap_is_at_the_last_kept_event_not_at_the_overflow_record() -> None:
    log, normaliser, pipeline, last = _synced_log()
    out = normaliser.process(log.record("OVERFLOW", "queue full", ts_event=T0 + 9_000 * MS))
    assert {e.symbol: e.ts_event for e in out.events} == last
    _gaps_close_no_tick(pipeline, out.events)


def test_malformed_exchange_frame_is_a_gap_at_each_symbols_last_good_event() -> None:
    log = Log(feed="coinbase-exchange")
    normaliser = Normaliser()
    records = [log.connected("c1")]
    for symbol in ("BTC-USD", "ETH-USD"):
        records.append(log.frame({"type": "snapshot", "product_id": symbol, "bids": [["1", "1"]], "asks": []}))
    for symbol, ms in (("BTC-USD", 1_500), ("ETH-USD", 1_250)):
        change = {"type": "l2update", "product_id": symbol, "time": _at(ms), "changes": [["buy", "1", "2"]]}
        records.append(log.frame(change))
    normaliser.process_all(records)
    out = normaliser.process(log.frame('{"type":"l2update","product_id":"ETH-USD","chan'))
    assert {e.symbol: e.ts_event for e in out.events} == {"BTC-USD": T0 + 1_500 * MS, "ETH-USD": T0 + 1_250 * MS}


def test_clock_records_become_one_clock_event_per_symbol_at_the_estimate() -> None:
    log = Log()
    normaliser = Normaliser()
    out = normaliser.process(log.record("CLOCK", "tick", ts_event=T0 - 5))
    assert _kinds(out.events) == [("BTC-USD", "CLOCK"), ("ETH-USD", "CLOCK")]
    assert {e.ts_event for e in out.events} == {T0 - 5}


def test_overflow_and_disconnect_gap_only_synced_symbols_and_disconnect_reports_the_next_state() -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.l2("snapshot", "ETH-USD", ("bid", "10", "1")))
    out = normaliser.process(log.record("OVERFLOW", "queue full (50000 frames)"))
    assert _kinds(out.events) == [("ETH-USD", "GAP")]
    assert body(out.events[0], Gap).reason == "BUFFER_OVERFLOW"
    assert out.resync is not None
    out = normaliser.process(log.record("DISCONNECTED", control_text("RECONNECTING", "resync after overflow")))
    assert _kinds(out.events) == [("BTC-USD", "STATUS"), ("ETH-USD", "STATUS")]  # nothing left synced to gap
    assert out.events[0].status == FeedStatus(state="RECONNECTING", detail="resync after overflow")


def test_heartbeats_fan_out_to_the_connection_symbols() -> None:
    log = Log()
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    out = normaliser.process(log.advanced("heartbeats", [{"current_time": "x", "heartbeat_counter": 1}]))
    assert _kinds(out.events) == [("BTC-USD", "HEARTBEAT"), ("ETH-USD", "HEARTBEAT")]


def test_malformed_book_frame_is_a_reject_a_gap_and_a_resync_on_the_exchange_feed() -> None:
    log = Log(feed="coinbase-exchange")
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.frame(_exchange_snapshot("BTC-USD", bids=[["1", "1"]])))
    out = normaliser.process(log.frame('{"type":"l2update","product_id":"BTC-USD","chan'))
    assert [(r.error_type, r.source_ref) for r in out.rejects] == [("MalformedFrame", "c1:1")]
    assert _kinds(out.events) == [("BTC-USD", "GAP")]
    assert body(out.events[0], Gap).reason == "PARSE_ERROR"
    assert out.resync is not None


EXCHANGE_TIME = "2026-08-09T21:05:48.250000Z"
EXCHANGE_NS = 1_786_309_548_250_000_000


def _exchange_snapshot(symbol: str, *, bids: list[list[str]] | None = None, timed: bool = True) -> dict[str, Any]:
    """An Exchange snapshot; real ones have no ``time`` (``timed=False``), the synthetic market's do."""
    message: dict[str, Any] = {"type": "snapshot", "product_id": symbol, "bids": bids or [], "asks": []}
    if timed:
        message["time"] = EXCHANGE_TIME
    return message


def _l2update(symbol: str, time: str, price: str = "2") -> dict[str, Any]:
    return {"type": "l2update", "product_id": symbol, "time": time, "changes": [["sell", price, "1"]]}


def test_a_snapshot_without_exchange_time_is_held_until_its_symbols_next_timed_event() -> None:
    """One clock: its receive time (the local clock, months after a recording) never stamps it."""
    log = Log(feed="coinbase-exchange")
    log.ts = T0 + 120 * 24 * 3600 * 1000 * MS  # local time far ahead of the exchange's
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    out = normaliser.process(log.frame(_exchange_snapshot("BTC-USD", bids=[["1", "1"]], timed=False)))
    assert _kinds(out.events) == [("BTC-USD", "STATUS")], "confirmed at once, emitted later"
    assert normaliser.synced == frozenset()
    other = normaliser.process(log.frame(_l2update("ETH-USD", "2026-08-09T21:05:48.100Z")))
    assert _kinds(other.events) == [("ETH-USD", "UPDATE")], "another symbol's time does not release it"
    out = normaliser.process(log.frame(_l2update("BTC-USD", "2026-08-09T21:05:48.300Z")))
    assert _kinds(out.events) == [("BTC-USD", "SNAPSHOT"), ("BTC-USD", "UPDATE")]
    held, update = out.events
    assert held.ts_event == update.ts_event == 1_786_309_548_300_000_000
    assert body(held, BookSnapshot).bids == (BookLevel(price_e8=100_000_000, size_e8=100_000_000),)
    assert held.ts_init < update.ts_init, "ts_init stays the snapshot frame's own"
    assert normaliser.synced == {"BTC-USD"}


def test_a_held_snapshot_is_released_by_a_clock_record_and_replaced_by_a_later_one() -> None:
    log = Log(feed="coinbase-exchange")
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.frame(_exchange_snapshot("BTC-USD", bids=[["1", "1"]], timed=False)))
    normaliser.process(log.frame(_exchange_snapshot("BTC-USD", bids=[["3", "1"]], timed=False)))
    out = normaliser.process(log.record("CLOCK", "tick", ts_event=EXCHANGE_NS))
    assert _kinds(out.events) == [("BTC-USD", "SNAPSHOT"), ("BTC-USD", "CLOCK"), ("ETH-USD", "CLOCK")]
    assert out.events[0].ts_event == EXCHANGE_NS
    assert body(out.events[0], BookSnapshot).bids[0].price_e8 == 300_000_000


def test_a_held_snapshot_is_dropped_when_changes_are_lost_after_it_or_the_connection_ends() -> None:
    log = Log(feed="coinbase-exchange")
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.frame(_exchange_snapshot("BTC-USD", timed=False)))
    out = normaliser.process(log.frame('{"type":"l2update","product_id":"BTC-USD","chan'))
    assert out.events == [], "never emitted, so no GAP is owed"
    assert out.resync is not None, "a new snapshot is asked for"
    assert _kinds(normaliser.process(log.frame(_l2update("BTC-USD", EXCHANGE_TIME))).events) == [("BTC-USD", "UPDATE")]
    normaliser.process(log.frame(_exchange_snapshot("ETH-USD", timed=False)))
    normaliser.process(log.record("DISCONNECTED", control_text("RECONNECTING", "test")))
    normaliser.process(log.connected("c2"))
    out = normaliser.process(log.frame(_l2update("ETH-USD", EXCHANGE_TIME)))
    assert _kinds(out.events) == [("ETH-USD", "UPDATE")]
    assert normaliser.synced == frozenset()


def test_control_events_before_the_first_exchange_time_keep_the_records_time_and_take_none() -> None:
    """The CONNECTED record's time (maybe local) stamps its STATUS/GAP but is never the exchange's time."""
    log = Log()
    ahead = T0 + 600_000 * MS  # the ingest's clock 10 minutes ahead
    normaliser = Normaliser()
    connected = replace(log.connected("c1"), ts_event=ahead)
    out = normaliser.process(connected)
    assert {e.ts_event for e in out.events} == {ahead}
    out = normaliser.process(log.l2("snapshot", "BTC-USD", ("bid", "1", "1")))
    snapshot = next(e for e in out.events if e.kind == "SNAPSHOT")
    assert snapshot.ts_event == 1_786_309_548_250_000_000
    out = normaliser.process(log.frame("not json"))
    gap = next(e for e in out.events if e.kind == "GAP")
    assert gap.ts_event == snapshot.ts_event, "the last exchange time, not the CONNECTED record's"


def test_unknown_message_is_a_reject_without_a_gap() -> None:
    log = Log(feed="coinbase-exchange")
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    normaliser.process(log.frame(_exchange_snapshot("BTC-USD")))
    out = normaliser.process(log.frame({"type": "rfq_match", "product_id": "BTC-USD"}))
    assert [r.error_type for r in out.rejects] == ["UnknownMessage"]
    assert out.events == []
    assert out.resync is None
    assert normaliser.synced == {"BTC-USD"}


def test_state_is_reset_at_connected_so_a_replay_can_start_there() -> None:
    log = Log()
    records = [log.connected("c1"), log.l2("snapshot", "BTC-USD", ("bid", "1", "1")), log.l2("update", "BTC-USD")]
    records += [log.connected("c2"), log.l2("snapshot", "BTC-USD", ("bid", "1", "1")), log.l2("update", "BTC-USD")]
    full, _ = Normaliser().process_all(records)
    tail, _ = Normaliser().process_all(records[3:])
    assert full[-len(tail) :] == tail


def test_gap_times_do_not_depend_on_an_earlier_connection() -> None:
    """The per-symbol times that stamp a GAP restart at CONNECTED, so a replay from there stamps it alike."""
    log = Log()
    records = [log.connected("c1"), _l2_at(log, "BTC-USD", "snapshot", 5_000, 5_100)]
    records += [log.connected("c2"), _l2_at(log, "BTC-USD", "snapshot", 1_000, 1_100)]
    records.append(_l2_at(log, "BTC-USD", "update", 1_200, 1_300))
    records.append(_l2_at(log, "BTC-USD", "update", 1_400, 1_500, sequence=5))
    full, _ = Normaliser().process_all(records)
    tail, _ = Normaliser().process_all(records[2:])
    assert full[-len(tail) :] == tail
    assert [e.ts_event for e in tail if e.kind == "GAP" and body(e, Gap).reason == "SEQUENCE_JUMP"] == [T0 + 1_200 * MS]


def test_event_times_after_connected_do_not_depend_on_an_earlier_connection() -> None:
    """An Exchange subscriptions frame has no time: its STATUS takes the latest time known, which
    restarts at the CONNECTED record's, so a replay from that CONNECTED (or the topic-mode ingest
    restarted there) gives the events an uninterrupted run gave."""
    log = Log(feed="coinbase-exchange")
    late = "2026-08-09T21:06:40Z"  # the first connection's exchange times run past the second CONNECTED's
    first = {"type": "l2update", "product_id": "BTC-USD", "time": late, "changes": [["buy", "1", "1"]]}
    subscriptions = {"type": "subscriptions", "channels": [{"name": "level2", "product_ids": SYMBOLS}]}
    records = [log.connected("c1"), log.frame(subscriptions), log.frame(first)]
    records += [log.connected("c2"), log.frame(subscriptions)]
    full, _ = Normaliser().process_all(records)
    tail, _ = Normaliser().process_all(records[3:])
    assert full[-len(tail) :] == tail
    assert {e.ts_event for e in tail} == {records[3].ts_event}


def test_control_text_round_trip_and_foreign_text() -> None:
    assert parse_control_text(control_text("BACKOFF", "connect refused", attempt=3), "X") == (
        "BACKOFF",
        "connect refused",
    )
    assert parse_control_text("not json", "RECONNECTING") == ("RECONNECTING", "not json")
    assert parse_control_text('{"state":"WEIRD"}', "CONNECTING") == ("CONNECTING", '{"state":"WEIRD"}')


# -- fuzzing -------------------------------------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
_json = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(
    [
        "type",
        "channel",
        "product_id",
        "changes",
        "bids",
        "asks",
        "time",
        "timestamp",
        "sequence_num",
        "events",
        "updates",
        "side",
        "price_level",
        "new_quantity",
        "event_time",
        "trades",
        "price",
        "size",
        "trade_id",
    ]
)
_values = (
    st.sampled_from(
        [
            "l2_data",
            "l2update",
            "snapshot",
            "update",
            "match",
            "heartbeat",
            "heartbeats",
            "market_trades",
            "bid",
            "offer",
            "buy",
            "sell",
            "BUY",
            "BTC-USD",
            "2026-08-09T21:05:48.5Z",
            "1.5",
            "-1",
            "0",
            "subscriptions",
        ]
    )
    | _json
)
_shaped = st.recursive(
    _values,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=30,
)


@given(
    feed=st.sampled_from(["coinbase-advanced", "coinbase-exchange"]),
    texts=st.lists(st.text(max_size=60) | _json.map(json.dumps) | _shaped.map(json.dumps), min_size=1, max_size=8),
)
def test_garbage_frames_never_raise_and_are_rejected_or_understood(feed: str, texts: list[str]) -> None:
    log = Log(feed=feed)
    normaliser = Normaliser()
    serde = AvroSerde()
    normaliser.process(log.connected("c1"))
    for text in texts:
        out = normaliser.process(log.frame(text))
        for event in out.events:
            serde.encode("qw.md.events", event)  # whatever comes out is a valid MarketEvent
        for reject in out.rejects:
            assert reject.reason
            assert reject.error_type
            assert reject.raw.text == text


@given(
    record=st.dictionaries(
        st.sampled_from(["kind", "text", "symbols", "ts_init", "ts_event", "connection_id", "feed"]), _json
    )
)
def test_garbage_raw_records_are_refused_at_the_boundary_or_never_raise(record: dict[str, Any]) -> None:
    """A record not shaped like a RawFrame never becomes one (the serde refuses it as this conversion
    does: a dead letter); one that is a RawFrame never makes the normaliser raise."""
    record = {"exchange": "coinbase", "frame_index": -1, **record}
    try:
        raw = msgspec.convert(record, RawFrame)
    except msgspec.ValidationError:
        assert not _is_raw_frame(record)
        return
    assert _is_raw_frame(record)
    out = Normaliser().process(raw)
    assert all(reject.reason and reject.raw is raw for reject in out.rejects)


def _is_raw_frame(record: dict[str, Any]) -> bool:
    """Independently of msgspec: every RawFrame field present with its Avro type."""

    def integer(value: Any) -> bool:
        return type(value) is int and -(2**63) <= value < 2**63

    strings = ("exchange", "feed", "connection_id", "text")
    return (
        all(integer(record.get(name)) for name in ("ts_event", "ts_init", "frame_index"))
        and all(type(record.get(name)) is str for name in strings)
        and isinstance(record.get("symbols"), list)
        and all(type(symbol) is str for symbol in record["symbols"])
        and record.get("kind") in ("FRAME", "CONNECTED", "DISCONNECTED", "OVERFLOW", "CLOCK")
    )


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@given(
    feed=st.sampled_from(["coinbase-advanced", "coinbase-exchange"]),
    text=st.text(max_size=80).filter(lambda t: not _is_json(t)),
)
def test_text_that_is_not_json_is_always_a_malformed_reject_and_a_gap(feed: str, text: str) -> None:
    log = Log(feed=feed)
    normaliser = Normaliser()
    normaliser.process(log.connected("c1"))
    snapshot = (
        log.l2("snapshot", "BTC-USD", ("bid", "1", "1"))
        if feed == "coinbase-advanced"
        else log.frame(_exchange_snapshot("BTC-USD", bids=[["1", "1"]]))
    )
    normaliser.process(snapshot)
    out = normaliser.process(log.frame(text))
    assert [r.error_type for r in out.rejects] == ["MalformedFrame"]
    assert [(e.symbol, body(e, Gap).reason) for e in out.events] == [("BTC-USD", "PARSE_ERROR")]
    assert out.resync
