"""The order book: exact keys, snapshots, level changes, the cached top, and its invariants (hypothesis)."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotewatch.core.records import BookLevel, LevelChange, Side
from quotewatch.core.units import parse_e8
from quotewatch.domain.market.orderbook import BookError, OrderBook


def lv(price: int, size: int) -> BookLevel:
    return BookLevel(price_e8=price, size_e8=size)


def ch(side: str, price: int, size: int) -> LevelChange:
    # Built without validation (msgspec checks types when decoding, not in __init__), so the book's
    # own checks of side, price and size are what these tests exercise.
    return LevelChange(side=side, price_e8=price, size_e8=size)  # type: ignore[arg-type]  # any side: tested


ORDERBOOK_PYX = Path(__file__).resolve().parents[4] / "src" / "quotewatch" / "domain" / "market" / "_orderbook.pyx"


def test_the_compiled_book_reads_only_fields_and_sides_the_generated_records_have() -> None:
    """The .pyx reads the records by attribute at run time, where mypy does not look: renaming an
    Avro field of BookLevel or LevelChange (or a Side symbol) and regenerating must fail here."""
    source = ORDERBOOK_PYX.read_text()
    # ``for change in changes`` (OrderBook.apply: LevelChange) and ``for level in source`` (_fill: BookLevel).
    assert re.search(r"\bfor change in changes\b", source)
    assert re.search(r"\bfor level in source\b", source)
    reads = {(name, field) for name, field in re.findall(r"\b(change|level)\.(\w+)", source)}
    records = {"change": LevelChange, "level": BookLevel}
    assert {name for name, _ in reads} == set(records)
    missing = sorted(f"{name}.{field}" for name, field in reads if field not in records[name].__struct_fields__)
    assert not missing, f"_orderbook.pyx reads fields the generated records do not have: {missing}"
    sides = dict(re.findall(r'cdef str (_BID|_ASK) = "(\w+)"', source))
    assert set(sides.values()) == set(typing.get_args(Side)), "the book's side constants are the Side symbols"


def test_snapshot_then_changes_give_the_best_levels_first() -> None:
    book = OrderBook()
    book.load([lv(99, 1), lv(101, 2), lv(100, 3), lv(98, 0)], [lv(105, 1), lv(103, 2), lv(104, 3)])
    assert book.top() == (((101, 2), (100, 3), (99, 1)), ((103, 2), (104, 3), (105, 1)))
    assert (book.bid_count, book.ask_count) == (3, 3), "a snapshot level of size 0 is left out"
    book.apply([ch("BID", 102, 5), ch("ASK", 103, 0), ch("ASK", 102, 1)])
    assert book.top() == (((102, 5), (101, 2), (100, 3)), ((102, 1), (104, 3), (105, 1)))
    assert book.is_crossed()
    assert book.best_bid() == (102, 5)
    assert book.best_ask() == (102, 1)


def test_padded_and_trimmed_prices_hit_the_same_level() -> None:
    book = OrderBook()
    book.load([lv(parse_e8("8041.33"), parse_e8("0.02"))], [])
    book.apply([ch("BID", parse_e8("8041.33000000"), parse_e8("0.50000000"))])
    assert book.bids() == [(804133000000, 50000000)]
    book.apply([ch("BID", parse_e8("8041.330"), 0)])
    assert book.bid_count == 0


def test_deleting_an_unknown_level_is_a_no_op() -> None:
    book = OrderBook()
    book.load([lv(100, 1)], [lv(101, 1)])
    book.apply([ch("BID", 50, 0), ch("ASK", 500, 0)])
    assert book.top() == (((100, 1),), ((101, 1),))


def test_the_cached_top_follows_every_kind_of_change() -> None:
    book = OrderBook()
    book.load([lv(p, 1) for p in range(90, 100)], [lv(p, 1) for p in range(101, 111)])
    first_bids, first_asks = book.top()
    book.apply([ch("BID", 50, 7)])  # deep: the cached top is kept
    bids, asks = book.top()
    assert bids is first_bids
    assert asks is first_asks
    book.apply([ch("BID", 97, 7)])  # modifies the 3rd level
    assert book.top_bids() == ((99, 1), (98, 1), (97, 7))
    book.apply([ch("BID", 99, 0)])  # deletes the best: the 4th level moves up
    assert book.top_bids() == ((98, 1), (97, 7), (96, 1))
    book.apply([ch("ASK", 100, 3)])  # inserts a new best ask
    assert book.top_asks() == ((100, 3), (101, 1), (102, 1))


def test_invalid_changes_are_rejected_with_a_clear_error() -> None:
    book = OrderBook()
    with pytest.raises(BookError, match="negative size"):
        book.apply([ch("BID", 100, -1)])
    with pytest.raises(BookError, match="negative price"):
        book.apply([ch("ASK", -5, 1)])
    with pytest.raises(BookError, match="unknown side"):
        book.apply([ch("BUY", 100, 1)])
    with pytest.raises(BookError, match="negative"):
        book.load([lv(100, -1)], [])


def test_values_beyond_64_bits_or_not_integers_are_refused() -> None:
    # The compiled book keeps int64 prices and sizes: anything else is refused, never truncated.
    book = OrderBook()
    book.load([lv(100, 1)], [lv(101, 1)])
    top = book.top()
    for bad in (2**63, -(2**63) - 1, 1.5, "100", None):
        with pytest.raises(BookError, match="not a 64-bit integer"):
            book.apply([ch("BID", 99, 1), ch("BID", bad, 1)])  # type: ignore[arg-type]
        with pytest.raises(BookError, match="not a 64-bit integer"):
            book.apply([ch("ASK", 102, bad)])  # type: ignore[arg-type]
    with pytest.raises(BookError, match="not a 64-bit integer in BID snapshot level"):
        book.load([lv(100, 1), lv(2**64, 1)], [])
    # The load left the book as it was; the changes before the bad one stayed applied and the
    # cached top was dropped, so it shows them.
    assert book.bids() == [(100, 1), (99, 1)]
    assert book.top() is not top
    assert book.top() == (((100, 1), (99, 1)), ((101, 1),))
    assert book.size_at("BID", 2**70) == 0
    assert book.size_at("BID", 100.0) == 0  # type: ignore[arg-type]


def test_any_object_with_the_fields_is_read_and_a_missing_field_is_an_attribute_error() -> None:
    book = OrderBook()
    book.load([SimpleNamespace(price_e8=100, size_e8=1)], [])  # type: ignore[list-item]  # duck-typed: tested
    book.apply([SimpleNamespace(side="ASK", price_e8=101, size_e8=2)])  # type: ignore[list-item]  # as above
    assert book.top() == (((100, 1),), ((101, 2),))
    with pytest.raises(AttributeError, match="size_e8"):
        book.apply([SimpleNamespace(side="BID", price_e8=99)])  # type: ignore[list-item]  # missing field: tested


def test_reading_helpers() -> None:
    book = OrderBook()
    book.load([lv(p, p) for p in range(95, 100)], [lv(p, p) for p in range(101, 104)])
    assert book.bids(2) == [(99, 99), (98, 98)]
    assert book.bids(0) == []
    assert book.asks(10) == [(101, 101), (102, 102), (103, 103)]
    assert book.size_at("BID", 97) == 97
    assert book.size_at("ASK", 97) == 0
    assert len(book) == 8
    assert (
        repr(book)
        == "OrderBook(bids=5, asks=3, top=((99, 99), (98, 98), (97, 97))/((101, 101), (102, 102), (103, 103)))"
    )
    book.clear()
    assert (len(book), book.top(), book.best_bid(), book.best_ask(), book.is_crossed()) == (
        0,
        ((), ()),
        None,
        None,
        False,
    )


def test_other_depths() -> None:
    book = OrderBook(depth=5)
    book.load([lv(p, p) for p in range(1, 4)], [lv(p, p) for p in range(10, 20)])
    assert book.top() == (((3, 3), (2, 2), (1, 1)), tuple((p, p) for p in range(10, 15)))
    with pytest.raises(ValueError, match="depth"):
        OrderBook(depth=0)


# -- properties -------------------------------------------------------------------------------

prices = st.integers(min_value=1, max_value=60)
sizes = st.integers(min_value=0, max_value=10**12)
changes = st.lists(st.tuples(st.sampled_from(["BID", "ASK"]), prices, sizes), max_size=8)


@given(
    bids=st.lists(st.tuples(prices, sizes), max_size=20),
    asks=st.lists(st.tuples(prices, sizes), max_size=20),
    batches=st.lists(changes, max_size=40),
    depth=st.one_of(st.just(3), st.integers(min_value=1, max_value=5)),  # half at the services' depth
    read_every=st.integers(min_value=1, max_value=4),
)
@settings(max_examples=400)
def test_the_book_equals_a_plain_dict_model_after_any_sequence(
    bids: list[tuple[int, int]],
    asks: list[tuple[int, int]],
    batches: list[list[tuple[str, int, int]]],
    depth: int,
    read_every: int,
) -> None:
    """Sizes exact, every level present, deletes of unknown levels harmless, top = sorted model.

    The top is read after every ``read_every``-th batch only (and at the end): batches applied
    while the cached top is stale must leave it right too.
    """
    book = OrderBook(depth)
    book.load([lv(p, s) for p, s in bids], [lv(p, s) for p, s in asks])
    model = {"BID": {}, "ASK": {}}  # type: dict[str, dict[int, int]]
    for side, pairs in (("BID", bids), ("ASK", asks)):
        for price, size in pairs:
            if size:
                model[side][price] = size
            else:
                model[side].pop(price, None)
    for number, batch in enumerate(batches, start=1):
        book.apply([ch(side, price, size) for side, price, size in batch])
        for side, price, size in batch:
            if size:
                model[side][price] = size
            else:
                model[side].pop(price, None)
        expected_bids = sorted(model["BID"].items(), reverse=True)
        expected_asks = sorted(model["ASK"].items())
        if number % read_every == 0 or number == len(batches):
            assert book.top() == (tuple(expected_bids[:depth]), tuple(expected_asks[:depth]))
        assert book.bids() == expected_bids
        assert book.asks() == expected_asks
        assert len(book) == len(expected_bids) + len(expected_asks)


@st.composite
def valid_sequences(draw: st.DrawFn) -> tuple[int, list[list[tuple[str, int, int]]]]:
    """Batches that keep every bid below every ask (what an exchange sends)."""
    split = draw(st.integers(min_value=10, max_value=50))
    bid_prices = st.integers(min_value=1, max_value=split)
    ask_prices = st.integers(min_value=split + 1, max_value=70)
    batch = st.lists(
        st.one_of(
            st.tuples(st.just("BID"), bid_prices, sizes),
            st.tuples(st.just("ASK"), ask_prices, sizes),
        ),
        max_size=6,
    )
    return split, draw(st.lists(batch, max_size=40))


@given(valid_sequences())
def test_a_valid_sequence_never_crosses_the_book(data: tuple[int, list[list[tuple[str, int, int]]]]) -> None:
    split, batches = data
    book = OrderBook()
    book.load([lv(split, 1)], [lv(split + 1, 1)])
    for batch in batches:
        book.apply([ch(side, price, size) for side, price, size in batch])
        assert not book.is_crossed()
        bids, asks = book.top()
        assert all(price <= split for price, _ in bids)
        assert all(price > split for price, _ in asks)
        assert [p for p, _ in bids] == sorted((p for p, _ in bids), reverse=True)
        assert [p for p, _ in asks] == sorted(p for p, _ in asks)
