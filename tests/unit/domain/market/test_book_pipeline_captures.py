"""Golden replays: every recorded capture through the real normaliser and the book pipeline.

At every emitted tick the top-3 must equal a reference book rebuilt independently from the raw
JSON lines (plain dicts and ``Decimal``, no QuoteWatch parsing), and the ticks must be exactly
the grid the event times define.
"""

from __future__ import annotations

import gzip
import heapq
import json
from decimal import Decimal
from pathlib import Path

import pytest

from quotewatch.core.records import BookLevel, MarketEvent
from quotewatch.domain.market.book_pipeline import BookPipeline, TickOutput
from quotewatch.domain.venue.captures import capture_files, read_capture
from quotewatch.domain.venue.normaliser import Normaliser
from tests.helpers import shared_data_dir

TICK_MS = 100
TICK_NS = TICK_MS * 1_000_000


def e8(text: str) -> int:
    value = Decimal(text).scaleb(8)
    assert value == value.to_integral_value(), text
    return int(value)


class ReferenceBooks:
    """A deliberately simple dict-of-dicts book per product, driven by the raw Coinbase JSON."""

    def __init__(self) -> None:
        self.books: dict[str, dict[str, dict[int, int]]] = {}
        self._tops: dict[str, tuple[tuple[BookLevel, ...], tuple[BookLevel, ...]]] = {}

    def apply_line(self, line: str) -> None:
        message = json.loads(line)
        self._tops.pop(message.get("product_id", ""), None)
        for event in message.get("events", ()) if message.get("channel") == "l2_data" else ():
            self._tops.pop(event["product_id"], None)
        if message.get("type") == "snapshot":  # Exchange protocol
            self.books[message["product_id"]] = {
                "bid": {e8(p): e8(s) for p, s in message["bids"] if e8(s)},
                "ask": {e8(p): e8(s) for p, s in message["asks"] if e8(s)},
            }
        elif message.get("type") == "l2update":
            book = self.books.get(message["product_id"])
            for side, price, size in message["changes"]:
                if book is not None:
                    self._set(book["bid" if side == "buy" else "ask"], e8(price), e8(size))
        elif message.get("channel") == "l2_data":  # Advanced Trade protocol
            for event in message["events"]:
                if event["type"] == "snapshot":
                    self.books[event["product_id"]] = {"bid": {}, "ask": {}}
                book = self.books.get(event["product_id"])
                for change in event["updates"]:
                    if book is not None:
                        side = "bid" if change["side"] == "bid" else "ask"
                        self._set(book[side], e8(change["price_level"]), e8(change["new_quantity"]))

    @staticmethod
    def _set(levels: dict[int, int], price: int, size: int) -> None:
        if size:
            levels[price] = size
        else:
            levels.pop(price, None)

    def top3(self, product: str) -> tuple[tuple[BookLevel, ...], tuple[BookLevel, ...]]:
        """Best 3 per side by a full scan (cached until a line touches the product)."""
        if product not in self._tops:
            book = self.books[product]
            self._tops[product] = (
                tuple(BookLevel(price_e8=p, size_e8=book["bid"][p]) for p in heapq.nlargest(3, book["bid"])),
                tuple(BookLevel(price_e8=p, size_e8=book["ask"][p]) for p in heapq.nsmallest(3, book["ask"])),
            )
        return self._tops[product]


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def expected_ticks(events: list[MarketEvent], symbol: str, max_carried: int) -> list[int]:
    """The grid ticks a synced symbol must emit, from the event times alone (test oracle)."""
    ticks: list[int] = []
    watermark: int | None = None
    next_tick: int | None = None
    synced = False
    for record in events:
        if record.symbol != symbol:
            continue
        if record.kind in ("GAP", "STATUS"):  # control events move no time (one clock)
            synced = synced and record.kind != "GAP"
            continue
        watermark = record.ts_event if watermark is None else max(watermark, record.ts_event)
        if next_tick is None:
            next_tick = -(-watermark // TICK_NS) * TICK_NS
        closed = []
        while next_tick < watermark:
            closed.append(next_tick)
            next_tick += TICK_NS
        if synced:
            ticks.extend(closed[:max_carried])
        if record.kind == "SNAPSHOT":
            synced = True
    return ticks


@pytest.mark.parametrize("path", capture_files(shared_data_dir()), ids=lambda p: p.name.split("_20")[0])
def test_top3_at_every_tick_equals_a_reference_rebuilt_from_the_raw_json(path: Path) -> None:
    capture = read_capture(path)
    events, _ = Normaliser().process_all(capture.raw_frames())
    lines = read_lines(path)
    assert len(lines) == len(capture.recv_ns)
    raw_updates = sum(1 for line in lines if '"l2update"' in line)
    if raw_updates:
        assert sum(1 for e in events if e.kind == "UPDATE") == raw_updates, "one UPDATE per l2update"

    pipeline = BookPipeline(TICK_MS)
    outputs: list[TickOutput] = []
    for position, record in enumerate(events):
        outputs.extend(pipeline.process(record, position))
    assert all(p.synced for p in pipeline.pipelines.values()), "the captures never cross or gap after the snapshot"

    # Every tick's top-3 = the reference after every raw line before the one that closed it.
    line_of = {ts: index for index, ts in enumerate(capture.recv_ns)}
    reference = ReferenceBooks()
    applied = 0
    checked = 0
    for output in sorted(outputs, key=lambda o: line_of[o.book_top.ts_init]):
        closing_line = line_of[output.book_top.ts_init]
        while applied < closing_line:
            reference.apply_line(lines[applied])
            applied += 1
        bids, asks = reference.top3(output.book_top.symbol)
        assert (output.book_top.bids, output.book_top.asks) == (bids, asks), (
            f"{output.book_top.symbol} tick {output.book_top.ts_event} (closed by line {closing_line})"
        )
        assert output.features is not None
        assert (output.features.bids, output.features.asks) == (bids, asks)
        checked += 1

    # The ticks are exactly the grid the event times define, per symbol.
    symbols = sorted({e.symbol for e in events})
    carried = pipeline.pipelines[symbols[0]].max_carried_ticks
    for symbol in symbols:
        emitted = [o.book_top.ts_event for o in outputs if o.book_top.symbol == symbol]
        assert emitted == expected_ticks(events, symbol, carried), symbol
    assert checked == len(outputs) > 100
