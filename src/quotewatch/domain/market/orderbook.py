"""A full-depth level-2 order book of one symbol, keyed by exact integer prices.

Prices and sizes are integers scaled by 1e8 (:mod:`quotewatch.core.units`), so the same decimal
string always hits the same level and sizes never accumulate rounding. The book takes the
records of ``quotewatch.MarketEvent`` as they come off the topic (:mod:`quotewatch.core.records`):
a snapshot's ``BookLevel`` tuples and an update's ``LevelChange`` tuple, e.g.::

    LevelChange(side="BID", price_e8=804133000000, size_e8=2000000)   # 8041.33 x 0.02; size 0 deletes

**Structure** (chosen by ``tests/benchmarks/bench_book.py`` on the recorded captures): per side a
C++ ``std::map<int64, int64>`` (a red-black tree: ordered, O(log n) insert and delete), with the
whole update loop compiled (Cython, ``_orderbook.pyx``). The top ``depth`` levels are cached per
side and rebuilt only when a change touches a price at or better than the cached ``depth``-th
level, so reading the top after every update batch costs almost nothing.

Why compiled: the services read the top after every update batch, and the Exchange captures send
one change per batch. The pure-Python book (a dict plus a bisect-sorted key list per side, the
previous version) spent about 1.4 µs per such batch on interpreter overhead, 0.56-0.79M updates/s
against the goal of 1M; the compiled loop reaches 1.5-2.1M on the same captures in the same run
(docs/benchmarks.md). Prices and sizes must fit in 64 bits (a price of 92 billion in e8 units); a
larger value is refused with :class:`BookError`, like a negative one.

The GPLv3 ``order-book`` C extension is a benchmark peer and never imported here; sortedcontainers
is the other peer. Pure: no I/O, no clock. Not thread-safe (one book belongs to one stream task).
"""

from __future__ import annotations

from quotewatch.domain.market._orderbook import BookError, OrderBook

__all__ = ["ASK", "BID", "BookError", "Level", "OrderBook"]

Level = tuple[int, int]
"""(price_e8, size_e8)."""

BID = "BID"
ASK = "ASK"
