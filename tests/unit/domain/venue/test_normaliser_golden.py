"""Golden replays: every recorded capture through the real captures reader and normaliser.

Exact counts come from ``../shared/data/coinbase/SOURCES.md``. The book rebuilt from the
normalised events is compared, at the end, with a reference rebuilt independently from the raw
JSON (Decimal keys, no project code), and is checked never to be crossed (the captures are clean).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sortedcontainers import SortedDict

from quotewatch.core.records import BookSnapshot, BookUpdate, MarketEvent
from quotewatch.core.serde import AvroSerde
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from tests.helpers import shared_data_dir
from tests.records import body

Book = dict[str, dict[int, int]]


@dataclass
class EventBook:
    """A minimal book over MarketEvents (the test's own, not the project's order book)."""

    bids: SortedDict = field(default_factory=SortedDict)
    asks: SortedDict = field(default_factory=SortedDict)
    synced: bool = False
    unknown_deletes: int = 0
    crossed: int = 0

    def apply(self, event: MarketEvent) -> None:
        kind = event.kind
        if kind == "SNAPSHOT":
            snapshot = body(event, BookSnapshot)
            self.bids = SortedDict({lvl.price_e8: lvl.size_e8 for lvl in snapshot.bids})
            self.asks = SortedDict({lvl.price_e8: lvl.size_e8 for lvl in snapshot.asks})
            self.synced = True
        elif kind == "UPDATE":
            for change in body(event, BookUpdate).changes:
                side = self.bids if change.side == "BID" else self.asks
                if change.size_e8 == 0:
                    if side.pop(change.price_e8, None) is None:
                        self.unknown_deletes += 1
                else:
                    side[change.price_e8] = change.size_e8
        elif kind == "GAP":
            self.synced = False
        synced_book = self.synced and kind in ("SNAPSHOT", "UPDATE") and self.bids and self.asks
        if synced_book and self.bids.peekitem(-1)[0] >= self.asks.peekitem(0)[0]:
            self.crossed += 1

    def as_dict(self) -> Book:
        return {"BID": dict(self.bids), "ASK": dict(self.asks)}


def books_from_events(events: Iterable[MarketEvent]) -> dict[str, EventBook]:
    books: dict[str, EventBook] = {}
    for event in events:
        books.setdefault(event.symbol, EventBook()).apply(event)
    return books


def _e8(text: str) -> int:
    value = Decimal(text) * 100_000_000
    assert value == value.to_integral_value(), text
    return int(value)


def reference_books(lines: Iterable[str]) -> dict[str, Book]:
    """Books rebuilt straight from the raw JSON lines of either protocol (Decimal arithmetic)."""
    books: dict[str, dict[str, dict[Decimal, Decimal]]] = {}
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        if message.get("type") == "snapshot":
            books[message["product_id"]] = {
                "BID": {Decimal(p): Decimal(s) for p, s in message["bids"]},
                "ASK": {Decimal(p): Decimal(s) for p, s in message["asks"]},
            }
        elif message.get("type") == "l2update" and message["product_id"] in books:
            for side, price, size in message["changes"]:
                levels = books[message["product_id"]]["BID" if side == "buy" else "ASK"]
                if Decimal(size) == 0:
                    levels.pop(Decimal(price), None)
                else:
                    levels[Decimal(price)] = Decimal(size)
        elif message.get("channel") == "l2_data":
            for event in message["events"]:
                if event["type"] == "snapshot":
                    books[event["product_id"]] = {"BID": {}, "ASK": {}}
                for update in event["updates"]:
                    levels = books[event["product_id"]]["BID" if update["side"] == "bid" else "ASK"]
                    if Decimal(update["new_quantity"]) == 0:
                        levels.pop(Decimal(update["price_level"]), None)
                    else:
                        levels[Decimal(update["price_level"])] = Decimal(update["new_quantity"])
    return {
        symbol: {side: {_e8(str(p)): _e8(str(s)) for p, s in levels.items()} for side, levels in book.items()}
        for symbol, book in books.items()
    }


def _level_updates(events: Iterable[MarketEvent]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for event in events:
        if event.kind == "UPDATE":
            counts[event.symbol] += len(body(event, BookUpdate).changes)
    return counts


def _kinds(events: Iterable[MarketEvent]) -> Counter[tuple[str, str]]:
    return Counter((event.symbol, event.kind) for event in events)


def _capture(stem: str) -> Path:
    matches = [p for p in capture_files(shared_data_dir()) if p.name.startswith(stem)]
    assert len(matches) == 1, f"expected one capture named {stem}*, found {matches}"
    return matches[0]


@pytest.fixture(scope="module")
def normalised() -> dict[str, tuple[Any, list[MarketEvent], list[Any]]]:
    out = {}
    for path in capture_files(shared_data_dir()):
        capture = read_capture(path)
        events, rejects = Normaliser().process_all(capture.raw_frames())
        out[path.name] = (capture, events, rejects)
    return out


def test_every_capture_in_the_shared_directory_is_replayed(normalised: dict[str, Any]) -> None:
    assert len(normalised) == 3, sorted(normalised)


def test_2018_exchange_capture_counts(normalised: dict[str, Any]) -> None:
    capture, events, rejects = normalised[_capture("exchange_level2_BTC-USD_2018-04-17").name]
    assert capture.feed == "coinbase-exchange"
    assert capture.symbols == ("BTC-USD",)
    assert len(capture.lines) == 18_353
    kinds = _kinds(events)
    assert kinds[("BTC-USD", "UPDATE")] == 18_093  # one l2update message -> one UPDATE event
    assert _level_updates(events) == {"BTC-USD": 18_093}  # each 2018 l2update carries one change here
    assert kinds[("BTC-USD", "TRADE")] == 256  # match; last_match is history and dropped
    assert kinds[("BTC-USD", "SNAPSHOT")] == 1
    snapshot = next(e for e in events if e.kind == "SNAPSHOT")
    assert (len(snapshot.snapshot.bids), len(snapshot.snapshot.asks)) == (11_245, 16_997)
    # The recorder's unsubscribe error is kept as received: one reject, not a gap.
    assert [(r.error_type, r.raw.frame_index) for r in rejects] == [("ExchangeError", 3)]
    assert kinds[("BTC-USD", "GAP")] == 1  # only the connection start


def test_2021_exchange_capture_counts_per_product(normalised: dict[str, Any]) -> None:
    capture, events, rejects = normalised[_capture("exchange_level2_ticker_matches_10products_2021").name]
    expected = {
        "SKL-USD": 2_592,
        "DASH-BTC": 1_925,
        "SKL-BTC": 1_539,
        "BAND-BTC": 1_005,
        "CRV-EUR": 670,
        "NMR-EUR": 665,
        "YFI-BTC": 487,
        "BAND-GBP": 471,
        "SKL-GBP": 289,
        "NU-GBP": 76,
    }
    kinds = _kinds(events)
    assert {s: kinds[(s, "UPDATE")] for s in expected} == expected
    assert sum(kinds[(s, "TRADE")] for s in expected) == 97
    assert all(kinds[(s, "SNAPSHOT")] == 1 for s in expected)
    assert rejects == []  # ticker, last_match and subscriptions are understood and dropped
    assert set(capture.symbols) == set(expected)


def test_2026_advanced_capture_counts_per_product(normalised: dict[str, Any]) -> None:
    capture, events, rejects = normalised[_capture("advanced_trade_level2_BTC-USD_ETH-USD_2026").name]
    assert capture.feed == "coinbase-advanced"
    assert capture.symbols == ("BTC-USD", "ETH-USD")
    assert _level_updates(events) == {"BTC-USD": 1_930, "ETH-USD": 2_929}
    kinds = _kinds(events)
    assert kinds[("BTC-USD", "UPDATE")] + kinds[("ETH-USD", "UPDATE")] == 773
    snapshots = {e.symbol: e.snapshot for e in events if e.kind == "SNAPSHOT"}
    assert {s: (len(b.bids), len(b.asks)) for s, b in snapshots.items()} == {
        "BTC-USD": (18_764, 27_236),
        "ETH-USD": (6_935, 16_399),
    }
    # 25 connection-wide heartbeats -> one HEARTBEAT per subscribed symbol.
    assert kinds[("BTC-USD", "HEARTBEAT")] == kinds[("ETH-USD", "HEARTBEAT")] == 25
    # sequence_num runs 0..1029 without a jump: no gap besides the connection start.
    assert kinds[("BTC-USD", "GAP")] == kinds[("ETH-USD", "GAP")] == 1
    assert rejects == []


@pytest.mark.parametrize(
    "stem",
    [
        "exchange_level2_BTC-USD_2018-04-17",
        "exchange_level2_ticker_matches_10products_2021",
        "advanced_trade_level2_BTC-USD_ETH-USD_2026",
    ],
)
def test_book_from_events_equals_reference_from_raw_json_and_is_never_crossed(
    normalised: dict[str, Any], stem: str
) -> None:
    capture, events, _ = normalised[_capture(stem).name]
    reference = reference_books(capture.lines)
    books = books_from_events(events)
    assert set(reference) == {s for s, b in books.items() if b.bids or b.asks}
    for symbol, book in reference.items():
        rebuilt = books[symbol]
        assert rebuilt.synced
        assert rebuilt.as_dict() == book, symbol
        assert rebuilt.crossed == 0, symbol


def test_2026_harmless_deletes_of_unknown_levels(normalised: dict[str, Any]) -> None:
    _, events, _ = normalised[_capture("advanced_trade_level2_BTC-USD_ETH-USD_2026").name]
    books = books_from_events(events)
    assert {s: b.unknown_deletes for s, b in books.items()} == {"BTC-USD": 27, "ETH-USD": 25}


def test_2018_final_best_quotes(normalised: dict[str, Any]) -> None:
    _, events, _ = normalised[_capture("exchange_level2_BTC-USD_2018-04-17").name]
    book = books_from_events(events)["BTC-USD"]
    assert (book.bids.peekitem(-1)[0], book.asks.peekitem(0)[0]) == (803_999_000_000, 804_000_000_000)


def test_events_are_in_time_order_per_symbol_and_ts_init_comes_from_the_raw_record(
    normalised: dict[str, Any],
) -> None:
    for capture, events, _ in normalised.values():
        frames = {raw.frame_index: raw for raw in capture.raw_frames()}
        ts_inits = {raw.ts_init for raw in frames.values()}
        last_init: dict[str, int] = {}
        for event in events:
            assert event.ts_init in ts_inits
            assert event.ts_init >= last_init.get(event.symbol, 0)
            last_init[event.symbol] = event.ts_init
            assert event.connection_id == capture.connection_id


def test_every_normalised_event_encodes_with_the_market_event_schema(normalised: dict[str, Any]) -> None:
    serde = AvroSerde()
    for _, events, _ in normalised.values():
        # Every snapshot, trade, gap, status...; one update in ten (they all have the same shape).
        sample = [e for i, e in enumerate(events) if e.kind != "UPDATE" or i % 10 == 0]
        for event in sample:
            assert serde.decode(serde.encode("qw.md.events", event), "qw.md.events") == event


def test_normalising_twice_gives_identical_events(normalised: dict[str, Any]) -> None:
    capture, events, _ = normalised[_capture("exchange_level2_ticker_matches_10products_2021").name]
    again, _ = Normaliser().process_all(capture.raw_frames())
    assert again == events
