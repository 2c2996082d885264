"""Decoded-record limits: a record beyond its schema's limits is refused before it is built.

A 4 MB MarketEvent of 2 M empty levels decoded in 2.4 s into +384 MiB before; now the serde
refuses it with a RecordLimitError (a DecodeError: consumers dead-letter it) in about a
millisecond, having built nothing.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import tracemalloc
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from msgspec.structs import replace

from quotewatch.core.errors import DecodeError, RecordLimitError, SerdeError
from quotewatch.core.limits import MAX_BOOK_LEVELS, ArrayScan, RecordLimits, StringCheck, limits_for
from quotewatch.core.records import BookLevel, BookSnapshot, BookUpdate, FeedStatus, LevelChange, MarketEvent, RawFrame
from quotewatch.core.serde import AvroSerde
from tests.records import body, checked
from tests.unit.core.test_schemas_and_serde import typed_sample

EVENTS = "qw.md.events"
SERDE = AvroSerde()


def market_event(**fields: Any) -> MarketEvent:
    event = checked(typed_sample("quotewatch.MarketEvent"), MarketEvent)
    bodies: dict[str, Any] = {"snapshot": None, "update": None, "trade": None, "gap": None, "status": None}
    return replace(event, **{**bodies, **fields})


def snapshot(levels: int, level: BookLevel | None = None) -> MarketEvent:
    book = (level or BookLevel(price_e8=0, size_e8=0),) * levels
    return market_event(kind="SNAPSHOT", snapshot=BookSnapshot(bids=book[: levels // 2], asks=book[levels // 2 :]))


def test_a_record_of_millions_of_empty_levels_is_refused_before_it_is_decoded() -> None:
    data = SERDE.encode(EVENTS, snapshot(2_000_000))
    assert 4_000_000 < len(data) < 4_100_000
    tracemalloc.start()
    try:
        with pytest.raises(RecordLimitError, match=f"more than {MAX_BOOK_LEVELS} array items") as caught:
            SERDE.decode(data, EVENTS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(caught.value, DecodeError)
    assert isinstance(caught.value, SerdeError), "consumers dead-letter it like undecodable bytes"
    assert peak < 64 * 1024 * 1024, f"refusing it took {peak / 2**20:.0f} MiB (decoding it: ~380 MiB)"


def test_the_limit_is_exact_and_a_real_depth_book_decodes() -> None:
    level = BookLevel(price_e8=6_000_012_345_678, size_e8=123_456_789)
    at_limit = SERDE.encode(EVENTS, snapshot(MAX_BOOK_LEVELS, level))
    decoded = body(SERDE.decode_as(at_limit, EVENTS, MarketEvent), BookSnapshot)
    assert len(decoded.bids) + len(decoded.asks) == MAX_BOOK_LEVELS
    with pytest.raises(RecordLimitError):
        SERDE.decode(SERDE.encode(EVENTS, snapshot(MAX_BOOK_LEVELS + 1, level)), EVENTS)
    changes = (LevelChange(side="BID", price_e8=1, size_e8=0),) * (MAX_BOOK_LEVELS + 1)
    with pytest.raises(RecordLimitError):
        SERDE.decode(SERDE.encode(EVENTS, market_event(kind="UPDATE", update=BookUpdate(changes=changes))), EVENTS)


def test_string_lengths_are_limited_by_field() -> None:
    limits = limits_for("quotewatch.MarketEvent")
    assert SERDE.decode(SERDE.encode(EVENTS, market_event(symbol="S" * limits.max_string)), EVENTS)
    with pytest.raises(RecordLimitError, match="'symbol' is 1025 long, more than 1024"):
        SERDE.decode(SERDE.encode(EVENTS, market_event(symbol="S" * 1025)), EVENTS)
    status = FeedStatus(state="CONNECTING", detail="d" * 8192)
    assert SERDE.decode(SERDE.encode(EVENTS, market_event(kind="STATUS", status=status)), EVENTS)
    too_long = replace(status, detail="d" * 8193)
    with pytest.raises(RecordLimitError, match="'detail'"):
        SERDE.decode(SERDE.encode(EVENTS, market_event(kind="STATUS", status=too_long)), EVENTS)
    # A raw frame's text is a whole WebSocket frame: only the message size bounds it.
    raw = checked(typed_sample("quotewatch.RawFrame"), RawFrame)
    big = SERDE.encode("qw.md.raw", replace(raw, text="x" * 5_000_000))
    assert len(SERDE.decode_as(big, "qw.md.raw", RawFrame).text) == 5_000_000
    with pytest.raises(RecordLimitError, match="'symbols'"):
        SERDE.decode(SERDE.encode("qw.md.raw", replace(raw, symbols=("BTC-USD", "Y" * 2000))), "qw.md.raw")


# -- the scan against real Avro, with blocks as any writer may cut them ------------------------------


def zigzag(value: int) -> bytes:
    number = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def level_bytes(price: int, size: int) -> bytes:
    return zigzag(price) + zigzag(size)


def array_bytes(items: list[bytes], cuts: list[int], sized: bool) -> bytes:
    """Avro array blocks: ``items`` cut at ``cuts``; ``sized`` blocks carry -count and their byte size."""
    out = bytearray()
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(items)}), len(items)]
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        body = b"".join(items[start:end])
        out += zigzag(-(end - start)) + zigzag(len(body)) if sized else zigzag(end - start)
        out += body
    return bytes(out + zigzag(0))


levels = st.lists(st.tuples(st.integers(0, 2**62), st.integers(0, 2**62)), max_size=40)


@hypothesis_settings(max_examples=150)
@given(bids=levels, asks=levels, cuts=st.lists(st.integers(0, 40), max_size=4), sized=st.booleans())
def test_the_scan_counts_the_items_fastavro_decodes(
    bids: list[tuple[int, int]], asks: list[tuple[int, int]], cuts: list[int], sized: bool
) -> None:
    schema = SERDE.store.current("quotewatch.BookSnapshot").schema
    body = array_bytes([level_bytes(*b) for b in bids], cuts, sized) + array_bytes(
        [level_bytes(*a) for a in asks], cuts, not sized
    )
    decoded: Any = fastavro.schemaless_reader(io.BytesIO(body), schema, None)
    total = len(decoded["bids"]) + len(decoded["asks"])
    assert total == len(bids) + len(asks)
    exact = ArrayScan(schema, RecordLimits(max_items=total), "BookSnapshot")
    exact.threshold = 0  # scan whatever the size
    exact.check(body, 0)
    if total:
        under = ArrayScan(schema, RecordLimits(max_items=total - 1), "BookSnapshot")
        under.threshold = 0
        with pytest.raises(RecordLimitError):
            under.check(body, 0)


@hypothesis_settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_the_scan_and_decode_of_garbage_raise_only_decode_errors(data: bytes) -> None:
    for name in ("quotewatch.MarketEvent", "quotewatch.RawFrame", "quotewatch.Snapshot", "quotewatch.FeatureVector"):
        version = SERDE.store.current(name)
        scan = ArrayScan(version.schema, RecordLimits(max_items=5), name)
        scan.threshold = 0
        with contextlib.suppress(DecodeError):
            scan.check(data, 0)
        with contextlib.suppress(SerdeError):
            SERDE.decode(b"\xc3\x01" + version.fingerprint_le + data)


def test_small_records_are_not_scanned_or_walked() -> None:
    schema = SERDE.store.current("quotewatch.MarketEvent").schema
    limits = limits_for("quotewatch.MarketEvent")
    scan = ArrayScan(schema, limits, "MarketEvent")
    # A body this small cannot hold more items (2 bytes each at least) than the limit.
    assert scan.threshold == 2 * MAX_BOOK_LEVELS
    assert StringCheck(schema, limits, "MarketEvent").threshold == limits.max_string
    labels = SERDE.store.current("quotewatch.Label").schema
    assert ArrayScan(labels, limits_for("quotewatch.Label"), "Label").threshold == -1, "no arrays: never scanned"
