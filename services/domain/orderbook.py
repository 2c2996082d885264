"""A full-depth level-2 order book of one symbol, keyed by exact integer prices.

Prices and sizes are integers scaled by 1e8 (:mod:`quotewatch.core.units`), so the same decimal
string always hits the same level and sizes never accumulate rounding. The book takes the
records of ``quotewatch.MarketEvent`` as they come off the topic: a snapshot's
``quotewatch.BookLevel`` lists and an update's ``quotewatch.LevelChange`` list, e.g.::

    {"side": "BID", "price_e8": 804133000000, "size_e8": 2000000}   # 8041.33 x 0.02; size 0 deletes

**Structure** (chosen by ``tests/benchmarks/bench_book.py`` on the recorded captures): per side a
``dict`` price -> size plus a plain Python list of the price keys kept sorted with :mod:`bisect`,
**best level at the end** (bids by price, asks by negated price). Almost all activity is near the
top of the book, so an insert or delete moves only the few pointers behind it, and the best
levels are a slice off the end. The top ``depth`` levels are cached per side and recomputed only
when a change touches a price at or better than the current ``depth``-th level, so reading the
top after every update batch costs almost nothing. Only the standard library is used at run time;
the GPLv3 ``order-book`` C extension is a benchmark peer and never imported here.

Pure: no I/O, no clock. Not thread-safe (one book belongs to one stream task).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from quotewatch.core.errors import PoisonRecordError

Level = tuple[int, int]
"""(price_e8, size_e8)."""

BID = "BID"
ASK = "ASK"
_NO_BID_BOUND = float("-inf")  # fewer than depth+1 levels: every change may touch the top
_NO_ASK_BOUND = float("inf")
_CHANGE_FIELDS = itemgetter("side", "price_e8", "size_e8")


class BookError(PoisonRecordError, ValueError):
    """A snapshot or level change the book cannot apply (negative size or price, unknown side)."""


class OrderBook:
    """Full-depth bids and asks of one symbol with a cached top of ``depth`` levels per side.

    Args:
        depth: how many best levels :meth:`top` returns (and caches) per side.
    """

    __slots__ = ("_ask_keys", "_ask_sizes", "_ask_top", "_bid_keys", "_bid_sizes", "_bid_top", "_top", "depth")

    def __init__(self, depth: int = 3) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.depth = depth
        self._bid_sizes: dict[int, int] = {}
        self._ask_sizes: dict[int, int] = {}
        self._bid_keys: list[int] = []  # bid prices ascending: best (highest) last
        self._ask_keys: list[int] = []  # negated ask prices ascending: best (lowest price) last
        self._bid_top: tuple[Level, ...] | None = ()
        self._ask_top: tuple[Level, ...] | None = ()
        self._top: tuple[tuple[Level, ...], tuple[Level, ...]] | None = None

    # -- loading and updating ---------------------------------------------------------------

    def load(self, bids: Iterable[Mapping[str, Any]], asks: Iterable[Mapping[str, Any]]) -> None:
        """Replace the whole book with a snapshot's levels (``BookLevel`` dicts, any order).

        A level with size 0 is left out; a price listed twice keeps its last size.

        Raises:
            BookError: a negative price or size. The book is left unchanged.
        """
        bid_sizes = _levels_to_dict(bids, BID)
        ask_sizes = _levels_to_dict(asks, ASK)
        self._bid_sizes = bid_sizes
        self._ask_sizes = ask_sizes
        self._bid_keys = sorted(bid_sizes)
        self._ask_keys = sorted(-price for price in ask_sizes)
        self._bid_top = None
        self._ask_top = None
        self._top = None

    def clear(self) -> None:
        """Remove every level."""
        self.load((), ())

    def apply(self, changes: Sequence[Mapping[str, Any]]) -> None:
        """Apply a batch of ``LevelChange`` dicts in order: set the level's absolute size, 0 deletes.

        Deleting a price that is not in the book is a no-op (Coinbase sends such deletes).

        Raises:
            BookError: a change with a negative price or size, or an unknown side. The changes
                before it in the batch stay applied; the caller treats the book as unsynced.
        """
        bid_sizes = self._bid_sizes
        ask_sizes = self._ask_sizes
        bid_keys = self._bid_keys
        ask_keys = self._ask_keys
        depth = self.depth
        # The cached top of a side goes stale when a change touches a price at or better than its
        # depth-th level. A change below that level leaves the level where it is, so the bound
        # taken before the batch holds until the first change at or above it (then the side is
        # stale anyway): one comparison per change instead of a length check and an index.
        bid_bound: float = bid_keys[-depth] if len(bid_keys) > depth else _NO_BID_BOUND
        ask_bound: float = -ask_keys[-depth] if len(ask_keys) > depth else _NO_ASK_BOUND
        bid_dirty = ask_dirty = False
        for side, price, size in map(_CHANGE_FIELDS, changes):  # (C-level field access per change)
            if side == BID:
                if price >= bid_bound:
                    bid_dirty = True
                if size > 0:
                    if price not in bid_sizes:
                        if price < 0:
                            raise BookError(
                                f"negative price in level change {_change_text(changes, side, price, size)}"
                            )
                        insort(bid_keys, price)
                    bid_sizes[price] = size
                elif size == 0:
                    if bid_sizes.pop(price, None) is not None:
                        del bid_keys[bisect_left(bid_keys, price)]
                else:
                    raise BookError(f"negative size in level change {_change_text(changes, side, price, size)}")
            elif side == ASK:
                if price <= ask_bound:
                    ask_dirty = True
                if size > 0:
                    if price not in ask_sizes:
                        if price < 0:
                            raise BookError(
                                f"negative price in level change {_change_text(changes, side, price, size)}"
                            )
                        insort(ask_keys, -price)
                    ask_sizes[price] = size
                elif size == 0:
                    if ask_sizes.pop(price, None) is not None:
                        del ask_keys[bisect_left(ask_keys, -price)]
                else:
                    raise BookError(f"negative size in level change {_change_text(changes, side, price, size)}")
            else:
                raise BookError(f"unknown side {side!r} in level change {_change_text(changes, side, price, size)}")
        if bid_dirty:
            self._bid_top = None
            self._top = None
        if ask_dirty:
            self._ask_top = None
            self._top = None

    # -- reading ----------------------------------------------------------------------------

    def top(self) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        """The best ``depth`` bids and asks, best first: ``(top_bids(), top_asks())``.

        Cached: the same object is returned until a change touches the top, so ``is`` tells a
        caller cheaply whether the top may have changed.
        """
        top = self._top
        if top is None:
            top = self._top = (self.top_bids(), self.top_asks())
        return top

    def top_bids(self) -> tuple[Level, ...]:
        """The best ``depth`` bids, best (highest price) first, as (price_e8, size_e8)."""
        top = self._bid_top
        if top is None:
            keys = self._bid_keys
            sizes = self._bid_sizes
            if self.depth == 3 and len(keys) >= 3:  # the hot case, unrolled (2x faster than a comprehension)
                p0, p1, p2 = keys[-1], keys[-2], keys[-3]
                top = ((p0, sizes[p0]), (p1, sizes[p1]), (p2, sizes[p2]))
            else:
                top = tuple([(price, sizes[price]) for price in keys[: -self.depth - 1 : -1]])
            self._bid_top = top
        return top

    def top_asks(self) -> tuple[Level, ...]:
        """The best ``depth`` asks, best (lowest price) first, as (price_e8, size_e8)."""
        top = self._ask_top
        if top is None:
            keys = self._ask_keys
            sizes = self._ask_sizes
            if self.depth == 3 and len(keys) >= 3:
                p0, p1, p2 = -keys[-1], -keys[-2], -keys[-3]
                top = ((p0, sizes[p0]), (p1, sizes[p1]), (p2, sizes[p2]))
            else:
                top = tuple([(-key, sizes[-key]) for key in keys[: -self.depth - 1 : -1]])
            self._ask_top = top
        return top

    def best_bid(self) -> Level | None:
        """The best bid (price_e8, size_e8), or None when there are no bids."""
        keys = self._bid_keys
        if not keys:
            return None
        price = keys[-1]
        return price, self._bid_sizes[price]

    def best_ask(self) -> Level | None:
        """The best ask (price_e8, size_e8), or None when there are no asks."""
        keys = self._ask_keys
        if not keys:
            return None
        price = -keys[-1]
        return price, self._ask_sizes[price]

    def is_crossed(self) -> bool:
        """True when the best bid is at or above the best ask (an inconsistent book)."""
        return bool(self._bid_keys and self._ask_keys and self._bid_keys[-1] >= -self._ask_keys[-1])

    def bids(self, levels: int | None = None) -> list[Level]:
        """Bid levels best first (all, or the best ``levels``)."""
        keys = self._bid_keys if levels is None else self._bid_keys[len(self._bid_keys) - levels :]
        return [(price, self._bid_sizes[price]) for price in reversed(keys)]

    def asks(self, levels: int | None = None) -> list[Level]:
        """Ask levels best first (all, or the best ``levels``)."""
        keys = self._ask_keys if levels is None else self._ask_keys[len(self._ask_keys) - levels :]
        return [(-key, self._ask_sizes[-key]) for key in reversed(keys)]

    def size_at(self, side: str, price_e8: int) -> int:
        """The size resting at ``price_e8`` on ``side`` (``BID``/``ASK``), 0 when there is no level."""
        sizes = self._bid_sizes if side == BID else self._ask_sizes
        return sizes.get(price_e8, 0)

    @property
    def bid_count(self) -> int:
        """Number of bid levels."""
        return len(self._bid_keys)

    @property
    def ask_count(self) -> int:
        """Number of ask levels."""
        return len(self._ask_keys)

    def __len__(self) -> int:
        return len(self._bid_keys) + len(self._ask_keys)

    def __repr__(self) -> str:
        return f"OrderBook(bids={self.bid_count}, asks={self.ask_count}, top={self.top_bids()}/{self.top_asks()})"


def _change_text(changes: Sequence[Mapping[str, Any]], side: Any, price: Any, size: Any) -> str:
    """The repr of the change of ``changes`` that failed with these fields, for the error message.

    Whether a change fails depends only on its fields (a negative price never enters the book), so
    the first change with these fields is the one :meth:`OrderBook.apply` stopped at.
    """
    for change in changes:
        if _CHANGE_FIELDS(change) == (side, price, size):
            return repr(dict(change))
    return repr({"side": side, "price_e8": price, "size_e8": size})  # pragma: no cover - always found


def _levels_to_dict(levels: Iterable[Mapping[str, Any]], side: str) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for level in levels:
        price = level["price_e8"]
        size = level["size_e8"]
        if size < 0 or price < 0:
            raise BookError(f"negative price or size in {side} snapshot level {dict(level)!r}")
        if size:
            sizes[price] = size
        else:
            sizes.pop(price, None)
    return sizes
