# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
# distutils: language = c++
# (wraparound=False: a negative index is not counted from the end here; index from the front.)
"""The order book's compiled core: :class:`OrderBook` and :class:`BookError`.

Import them from :mod:`quotewatch.domain.market.orderbook`, which documents the structure and why it
is compiled. Built by ``setup.py`` (Cython, C++) when the package is installed; ``make setup``
rebuilds it when this file changes.
"""

from cpython.long cimport PyLong_Check
from cython.operator cimport dereference as deref, predecrement as dec, preincrement as inc
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t
from libcpp.map cimport map as cmap

from quotewatch.core.errors import PoisonRecordError

ctypedef cmap[int64_t, int64_t] Side  # price_e8 -> size_e8, ascending prices

cdef str _BID = "BID"
cdef str _ASK = "ASK"


class BookError(PoisonRecordError, ValueError):
    """A snapshot or level change the book cannot apply (negative size or price, unknown side)."""


cdef inline bint _is_int(object value):
    # Integers only: the C conversion would truncate a float (1.5 -> 1) without a word.
    return PyLong_Check(value)


cdef class OrderBook:
    """Full-depth bids and asks of one symbol with a cached top of ``depth`` levels per side.

    Args:
        depth: how many best levels :meth:`top` returns (and caches) per side.
    """

    cdef Side _bids  # best bid last
    cdef Side _asks  # best ask first
    cdef readonly int depth
    cdef object _bid_top  # tuple of the best levels, or None when a change touched them
    cdef object _ask_top
    cdef object _top  # (bid top, ask top), or None
    # The depth-th best price of a side while its cached top is valid (INT64_MIN / INT64_MAX with
    # fewer levels: every change touches the top). Set with the top; meaningless while the top is
    # None, when every change leaves it None anyway.
    cdef int64_t _bid_bound
    cdef int64_t _ask_bound

    def __cinit__(self, int depth=3):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.depth = depth
        self._bid_top = ()
        self._ask_top = ()
        self._top = None
        self._bid_bound = INT64_MIN
        self._ask_bound = INT64_MAX

    # -- loading and updating ---------------------------------------------------------------

    def load(self, bids, asks):
        """Replace the whole book with a snapshot's levels (``BookLevel`` records, any order).

        A level with size 0 is left out; a price listed twice keeps its last size.

        Raises:
            BookError: a negative price or size, or one beyond 64 bits. The book is left unchanged.
        """
        cdef Side new_bids, new_asks
        _fill(new_bids, bids, _BID)
        _fill(new_asks, asks, _ASK)
        self._bids.swap(new_bids)
        self._asks.swap(new_asks)
        self._invalidate()

    def clear(self):
        """Remove every level."""
        self._bids.clear()
        self._asks.clear()
        self._invalidate()

    def apply(self, changes):
        """Apply a batch of ``LevelChange`` records in order: set the level's absolute size, 0 deletes.

        Deleting a price that is not in the book is a no-op (Coinbase sends such deletes).

        Raises:
            BookError: a change with a negative price or size (or one beyond 64 bits), or an
                unknown side. The changes before it in the batch stay applied; the caller treats
                the book as unsynced.
        """
        cdef int64_t price, size
        cdef int64_t bid_bound = self._bid_bound
        cdef int64_t ask_bound = self._ask_bound
        cdef bint bid_dirty = False
        cdef bint ask_dirty = False
        cdef object side, price_field, size_field
        cdef Side* levels
        # A change below a side's depth-th level leaves that level where it is, so the bound kept
        # with the cached top holds until the first change at or above it (then the side is stale
        # anyway): one comparison per change.
        for change in changes:
            # Typed records (quotewatch.core.records): plain attribute reads.
            side = change.side
            price_field = change.price_e8
            size_field = change.size_e8
            try:
                if not _is_int(price_field) or not _is_int(size_field):
                    raise TypeError
                price = price_field
                size = size_field
            except (TypeError, OverflowError):
                self._invalidate()
                raise BookError(f"price or size not a 64-bit integer in level change {change!r}") from None
            if side == _BID:
                levels = &self._bids
                if price >= bid_bound:
                    bid_dirty = True
            elif side == _ASK:
                levels = &self._asks
                if price <= ask_bound:
                    ask_dirty = True
            else:
                self._invalidate()
                raise BookError(f"unknown side {side!r} in level change {change!r}")
            if size > 0:
                if price < 0:
                    self._invalidate()
                    raise BookError(f"negative price in level change {change!r}")
                levels[0][price] = size
            elif size == 0:
                levels.erase(price)
            else:
                self._invalidate()
                raise BookError(f"negative size in level change {change!r}")
        if bid_dirty:
            self._bid_top = None
            self._top = None
        if ask_dirty:
            self._ask_top = None
            self._top = None

    cdef void _invalidate(self):
        self._bid_top = None
        self._ask_top = None
        self._top = None

    # -- reading ----------------------------------------------------------------------------

    cpdef tuple top(self):
        """The best ``depth`` bids and asks, best first: ``(top_bids(), top_asks())``.

        Cached: the same object is returned until a change touches the top, so ``is`` tells a
        caller cheaply whether the top may have changed.
        """
        cdef object top = self._top
        if top is None:
            top = self._top = (self.top_bids(), self.top_asks())
        return top

    cpdef tuple top_bids(self):
        """The best ``depth`` bids, best (highest price) first, as (price_e8, size_e8)."""
        cdef object top = self._bid_top
        cdef list levels
        if top is None:
            levels = _best_levels(&self._bids, True, self.depth)
            self._bid_bound = levels[self.depth - 1][0] if len(levels) == self.depth else INT64_MIN
            top = self._bid_top = tuple(levels)
        return top

    cpdef tuple top_asks(self):
        """The best ``depth`` asks, best (lowest price) first, as (price_e8, size_e8)."""
        cdef object top = self._ask_top
        cdef list levels
        if top is None:
            levels = _best_levels(&self._asks, False, self.depth)
            self._ask_bound = levels[self.depth - 1][0] if len(levels) == self.depth else INT64_MAX
            top = self._ask_top = tuple(levels)
        return top

    def best_bid(self):
        """The best bid (price_e8, size_e8), or None when there are no bids."""
        if self._bids.empty():
            return None
        cdef Side.reverse_iterator it = self._bids.rbegin()
        return deref(it).first, deref(it).second

    def best_ask(self):
        """The best ask (price_e8, size_e8), or None when there are no asks."""
        if self._asks.empty():
            return None
        cdef Side.iterator it = self._asks.begin()
        return deref(it).first, deref(it).second

    def is_crossed(self):
        """True when the best bid is at or above the best ask (an inconsistent book)."""
        if self._bids.empty() or self._asks.empty():
            return False
        return deref(self._bids.rbegin()).first >= deref(self._asks.begin()).first

    def bids(self, levels=None):
        """Bid levels best first (all, or the best ``levels``)."""
        return _best_levels(&self._bids, True, _wanted(levels, self._bids.size()))

    def asks(self, levels=None):
        """Ask levels best first (all, or the best ``levels``)."""
        return _best_levels(&self._asks, False, _wanted(levels, self._asks.size()))

    def size_at(self, side, price_e8):
        """The size resting at ``price_e8`` on ``side`` (``BID``/``ASK``), 0 when there is no level."""
        cdef int64_t price
        try:
            if not _is_int(price_e8):
                return 0  # not an integer: never a level
            price = price_e8
        except OverflowError:
            return 0  # beyond 64 bits: never a level
        cdef Side* levels = &self._bids if side == _BID else &self._asks
        cdef Side.iterator found = levels.find(price)
        return 0 if found == levels.end() else deref(found).second

    @property
    def bid_count(self):
        """Number of bid levels."""
        return self._bids.size()

    @property
    def ask_count(self):
        """Number of ask levels."""
        return self._asks.size()

    def __len__(self):
        return self._bids.size() + self._asks.size()

    def __repr__(self):
        return f"OrderBook(bids={self.bid_count}, asks={self.ask_count}, top={self.top_bids()}/{self.top_asks()})"


cdef list _best_levels(Side* levels, bint descending, Py_ssize_t count):
    # The best `count` levels (fewer when the side has fewer), best first: from the highest
    # price for bids (descending), from the lowest for asks.
    cdef list out = []
    cdef Side.iterator it = levels.end() if descending else levels.begin()
    count = min(count, <Py_ssize_t>levels.size())
    while len(out) < count:
        if descending:
            dec(it)
        out.append((deref(it).first, deref(it).second))
        if not descending:
            inc(it)
    return out


cdef Py_ssize_t _wanted(object levels, size_t size) except -1:
    # bids(levels) / asks(levels): all when None, never fewer than none.
    return size if levels is None else max(0, min(levels, size))


cdef void _fill(Side& levels, object source, str side) except *:
    cdef int64_t price, size
    cdef object price_field, size_field
    for level in source:
        price_field = level.price_e8
        size_field = level.size_e8
        try:
            if not _is_int(price_field) or not _is_int(size_field):
                raise TypeError
            price = price_field
            size = size_field
        except (TypeError, OverflowError):
            raise BookError(f"price or size not a 64-bit integer in {side} snapshot level {level!r}") from None
        if size < 0 or price < 0:
            raise BookError(f"negative price or size in {side} snapshot level {level!r}")
        if size:
            levels[price] = size
        else:
            levels.erase(price)
