"""The feature spec: what x(t) means, in which order, and the code that computes it.

One spec, imported by the book service (which computes it), the trainer and inference (which
read ``FeatureVector.values`` by position) and the backtest (which recomputes it). Every
``FeatureVector`` names the spec it was computed with in ``feature_spec_id``; a consumer
refuses vectors of another spec. Documented for people in ``docs/features.md``.

**Changing the spec.** Add, remove, reorder or redefine a feature -> edit :data:`FEATURES` and
bump :data:`FEATURE_SPEC_VERSION` when the meaning of an existing name changes.
:data:`FEATURE_SPEC_ID` embeds a hash of the names, units and windows, so any edit of the list
changes it automatically; a unit test pins the documented table to the code.

**Computation.** :class:`FeatureState` is a small state machine over plain records, driven by
:class:`quotewatch.domain.market.book_pipeline.SymbolPipeline`: the pipeline tells it about each book
update batch (best quotes before/after), each trade, and each grid tick it closes; at a tick it
returns the values in spec order. Everything is event time: ``t`` and event times are ns from the
input records; no clock. The state resets with each sync epoch (a snapshot), so the features of
a tick are a pure function of the events since the epoch's snapshot.

Each per-event quantity has a readable pure function here (:func:`ofi_contribution`,
:func:`multilevel_ofi_contribution`, :func:`queue_depletion`, :func:`trade_flow_imbalance`,
:func:`price_tick`, :func:`spread_in_ticks`) that :class:`FeatureState` calls, so the unit tests of
the functions test the values of the live service and of the backtest alike.

Integer accumulators (counts, order-flow imbalance in size_e8, squared mid changes in price_e8²)
are exact; floats are made only when a tick's values are produced, so two runs give identical
bits. Cost: a few µs per tick (``tests/benchmarks/bench_features.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from quotewatch.core.records import Trade
from quotewatch.core.units import SCALE

Level = tuple[int, int]

FEATURE_SPEC_VERSION = 1
"""Bump when the meaning of an existing feature changes without its name or unit changing."""

COUNT_WINDOWS_MS = (100, 500, 1000)
"""Windows of the update/trade counts and of the order-flow imbalance (1, 5, 10 ticks at 100 ms)."""
QUOTE_CHANGE_WINDOWS_MS = (1000, 5000)
"""Windows of the best-quote change counts and of the realised volatility of mid."""
MAX_WINDOW_MS = max(COUNT_WINDOWS_MS + QUOTE_CHANGE_WINDOWS_MS)
OFI_LEVELS = 3
"""Levels per side of the multi-level order-flow imbalance ``ofi_l3_*``."""


@dataclass(frozen=True, slots=True)
class Feature:
    """One entry of the spec."""

    name: str
    unit: str
    meaning: str


FEATURES: tuple[Feature, ...] = (
    Feature("mid", "quote", "(best bid + best ask) / 2 at t"),
    Feature("spread", "quote", "best ask - best bid at t"),
    Feature("spread_bps", "bps", "spread / mid x 1e4"),
    Feature(
        "microprice", "quote", "size-weighted mid: (bid x ask_size + ask x bid_size) / (bid_size + ask_size), level 1"
    ),
    Feature("microprice_offset_bps", "bps", "(microprice - mid) / mid x 1e4"),
    Feature("imbalance_l1", "ratio [-1, 1]", "(bid_size_1 - ask_size_1) / (bid_size_1 + ask_size_1)"),
    Feature("imbalance_l3", "ratio [-1, 1]", "(bid depth - ask depth) / (bid depth + ask depth) over levels 1-3"),
    Feature("depth_bid_l3", "base", "sum of the sizes of the best 3 bid levels"),
    Feature("depth_ask_l3", "base", "sum of the sizes of the best 3 ask levels"),
    *(
        Feature(
            f"ofi_{window}ms",
            "base",
            f"order-flow imbalance (Cont, Kukanov & Stoikov 2014) summed over every book update batch in "
            f"(t - {window} ms, t]",
        )
        for window in COUNT_WINDOWS_MS
    ),
    *(
        Feature(f"updates_{window}ms", "count", f"price-level changes applied in (t - {window} ms, t]")
        for window in COUNT_WINDOWS_MS
    ),
    *(Feature(f"trades_{window}ms", "count", f"trades in (t - {window} ms, t]") for window in COUNT_WINDOWS_MS),
    Feature(
        "ms_since_best_change",
        "ms",
        "t - event time of the last change of the best bid or best ask price (the epoch's snapshot counts as one)",
    ),
    *(
        Feature(
            f"best_changes_{window // 1000}s",
            "count",
            f"update batches that changed the best bid or best ask price in (t - {window} ms, t]",
        )
        for window in QUOTE_CHANGE_WINDOWS_MS
    ),
    *(
        Feature(
            f"mid_rv_{window // 1000}s_bps",
            "bps",
            f"realised volatility of mid: sqrt(sum of squared tick-to-tick mid changes in (t - {window} ms, t]) "
            "/ mid x 1e4",
        )
        for window in QUOTE_CHANGE_WINDOWS_MS
    ),
    Feature("last_trade_side", "+1/-1/0", "aggressor of the epoch's last trade: +1 buy, -1 sell, 0 unknown or none"),
    Feature("last_trade_size", "base", "size of the epoch's last trade (0 when none)"),
    # Appended (issue 18): the positions above are unchanged.
    *(
        Feature(
            f"ofi_l3_{window}ms",
            "base",
            f"multi-level order-flow imbalance: the Cont-Kukanov-Stoikov e_n of each of the best {OFI_LEVELS} levels, "
            f"summed over levels and over every book update batch in (t - {window} ms, t]",
        )
        for window in COUNT_WINDOWS_MS
    ),
    Feature(
        "bid_depletion_1s",
        "base/s",
        "queue depletion rate at the best bid: size that left the best bid queue (a size decrease at the same "
        "price, or the whole queue when the best bid price fell) in (t - 1000 ms, t], per second",
    ),
    Feature(
        "ask_depletion_1s",
        "base/s",
        "queue depletion rate at the best ask: size that left the best ask queue (a size decrease at the same "
        "price, or the whole queue when the best ask price rose) in (t - 1000 ms, t], per second",
    ),
    *(
        Feature(
            f"trade_imbalance_{window // 1000}s",
            "ratio [-1, 1]",
            f"trade-flow imbalance: (buy - sell aggressor volume) / (buy + sell aggressor volume) of the trades in "
            f"(t - {window} ms, t]; 0 without trades",
        )
        for window in (1000, 5000)
    ),
    Feature("trade_rate_5s", "trades/s", "trade intensity: trades in (t - 5000 ms, t] per second"),
    Feature("trade_volume_5s", "base/s", "traded volume in (t - 5000 ms, t] per second"),
    Feature(
        "ms_since_bid_change",
        "ms",
        "t - event time of the last change of the best bid price (the epoch's snapshot counts as one)",
    ),
    Feature(
        "ms_since_ask_change",
        "ms",
        "t - event time of the last change of the best ask price (the epoch's snapshot counts as one)",
    ),
    Feature(
        "spread_ticks",
        "ticks",
        "spread / price tick, the price tick being the greatest common divisor of every price seen in the "
        "epoch (snapshot levels and best quotes since)",
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(feature.name for feature in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: index for index, name in enumerate(FEATURE_NAMES)}


def _spec_fingerprint() -> str:
    text = "|".join(f"{f.name}:{f.unit}" for f in FEATURES)
    text += f"|counts={COUNT_WINDOWS_MS}|quotes={QUOTE_CHANGE_WINDOWS_MS}|ofi_levels={OFI_LEVELS}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


FEATURE_SPEC_ID = f"qw-features-v{FEATURE_SPEC_VERSION}-{_spec_fingerprint()}"
"""Named in every FeatureVector; changes whenever the spec changes."""

_AGGRESSOR_SIGN = {"BUY": 1.0, "SELL": -1.0}
_BPS = 1e4


def window_ticks(window_ms: int, tick_ms: int) -> int:
    """How many grid ticks a window spans.

    Raises:
        ValueError: ``tick_ms`` does not divide the window (the window would not fall on the grid).
    """
    if window_ms % tick_ms:
        raise ValueError(
            f"TICK_MS={tick_ms} does not divide the {window_ms} ms feature window of spec {FEATURE_SPEC_ID}"
        )
    return window_ms // tick_ms


def ofi_contribution(before_bid: Level, before_ask: Level, after_bid: Level, after_ask: Level) -> int:
    """Order-flow imbalance e_n of one book change (Cont, Kukanov & Stoikov 2014), in size_e8.

    ``e = 1[Pb' >= Pb] qb' - 1[Pb' <= Pb] qb - 1[Pa' <= Pa] qa' + 1[Pa' >= Pa] qa`` where unprimed
    is the best level before the change and primed after it. Positive = buying pressure.
    """
    bid_price, bid_size = before_bid
    new_bid_price, new_bid_size = after_bid
    ask_price, ask_size = before_ask
    new_ask_price, new_ask_size = after_ask
    flow = 0
    if new_bid_price >= bid_price:
        flow += new_bid_size
    if new_bid_price <= bid_price:
        flow -= bid_size
    if new_ask_price <= ask_price:
        flow -= new_ask_size
    if new_ask_price >= ask_price:
        flow += ask_size
    return flow


_NO_BID: Level = (0, 0)
_NO_ASK: Level = (2**63 - 1, 0)
"""An absent level: a bid below every price, an ask above every price, both of size 0."""


def multilevel_ofi_contribution(
    before: tuple[Sequence[Level], Sequence[Level]],
    after: tuple[Sequence[Level], Sequence[Level]],
    levels: int = OFI_LEVELS,
) -> int:
    """Multi-level order-flow imbalance of one book change, in size_e8: the sum over the best
    ``levels`` levels m of :func:`ofi_contribution` of level m before and after.

    ``before``/``after``: (bids, asks), best first. A missing level counts as a bid at price 0 or an
    ask at an infinite price, both of size 0: a level that appears adds its size as a new best
    level of its side would, one that disappears takes its size away.
    """
    before_bids, before_asks = before
    bids, asks = after
    flow = 0
    for m in range(levels):
        flow += ofi_contribution(
            before_bids[m] if m < len(before_bids) else _NO_BID,
            before_asks[m] if m < len(before_asks) else _NO_ASK,
            bids[m] if m < len(bids) else _NO_BID,
            asks[m] if m < len(asks) else _NO_ASK,
        )
    return flow


def queue_depletion(before: Level | None, after: Level | None, side: Literal["BID", "ASK"]) -> int:
    """Size (size_e8) that left the best queue of ``side`` in one book change.

    The same best price: the size decrease (0 when the queue grew). The best price moved away
    from the spread (bid down, ask up) or the side emptied: the whole queue before. A better new
    best price, or no queue before: 0.
    """
    if before is None:
        return 0
    price, size = before
    if after is None:
        return size
    new_price, new_size = after
    if new_price == price:
        return size - new_size if size > new_size else 0
    worse = new_price < price if side == "BID" else new_price > price
    return size if worse else 0


def trade_flow_imbalance(buy_volume: int, sell_volume: int) -> float:
    """(buy - sell) / (buy + sell) aggressor volume, in [-1, 1]; 0 without volume."""
    total = buy_volume + sell_volume
    return (buy_volume - sell_volume) / total if total else 0.0


def price_tick(prices: Iterable[int], tick: int = 0) -> int:
    """The greatest common divisor of ``tick`` and ``prices`` (price_e8): the venue's price increment as
    far as these prices show it (0 for no non-zero price). Exact; more prices can only refine it."""
    return math.gcd(tick, *prices)


def spread_in_ticks(bid_e8: int, ask_e8: int, tick_e8: int) -> float:
    """The spread in price ticks; 0 when the tick is unknown."""
    return (ask_e8 - bid_e8) / tick_e8 if tick_e8 else 0.0


def book_features(bids: Sequence[Level], asks: Sequence[Level]) -> tuple[float, ...] | None:
    """The features of one book top alone (the first 9 of the spec), or None for a one-sided book.

    ``bids``/``asks``: the best levels, best first, as (price_e8, size_e8). The readable
    definition; :meth:`FeatureState.close_tick` computes the same values inline (a test checks
    they agree bit for bit).
    """
    if not bids or not asks:
        return None
    bid, bid_size = bids[0]
    ask, ask_size = asks[0]
    mid2 = bid + ask  # 2 x mid, exact
    if mid2 <= 0:
        return None
    mid = mid2 / (2 * SCALE)
    spread = (ask - bid) / SCALE
    level1 = bid_size + ask_size
    microprice = (bid * ask_size + ask * bid_size) / (level1 * SCALE) if level1 else mid
    depth_bid = 0
    for _, size in bids[:3]:
        depth_bid += size
    depth_ask = 0
    for _, size in asks[:3]:
        depth_ask += size
    depth = depth_bid + depth_ask
    return (
        mid,
        spread,
        spread / mid * _BPS,
        microprice,
        (microprice - mid) / mid * _BPS,
        (bid_size - ask_size) / level1 if level1 else 0.0,
        (depth_bid - depth_ask) / depth if depth else 0.0,
        depth_bid / SCALE,
        depth_ask / SCALE,
    )


class FeatureState:
    """The running state of the features of one symbol within one sync epoch.

    Who calls it: :class:`~quotewatch.domain.market.book_pipeline.SymbolPipeline`, in event order —
    :meth:`reset` at each snapshot, :meth:`on_update` after each update batch, :meth:`on_trade`
    for each trade, :meth:`close_tick` at each
    grid tick while synced and :meth:`skip_ticks` for ticks it does not emit.

    Args:
        tick_ms: the grid step; must divide every window of the spec.
    """

    __slots__ = (
        "_ask_depletion",
        "_best_changes",
        "_bid_depletion",
        "_buy_volume",
        "_count_windows",
        "_history",
        "_last_ask_change_ns",
        "_last_bid_change_ns",
        "_last_change_ns",
        "_last_trade_side",
        "_last_trade_size",
        "_mid_square_sum",
        "_ofi",
        "_ofi_levels",
        "_previous_mid2",
        "_price_tick",
        "_quote_windows",
        "_sell_volume",
        "_trade_volume",
        "_trades",
        "_updates",
        "tick_ms",
    )

    def __init__(self, tick_ms: int) -> None:
        self.tick_ms = tick_ms
        self._count_windows = tuple(window_ticks(window, tick_ms) for window in COUNT_WINDOWS_MS)
        self._quote_windows = tuple(window_ticks(window, tick_ms) for window in QUOTE_CHANGE_WINDOWS_MS)
        history = max(self._count_windows + self._quote_windows)
        # Cumulative counters (see _counters) at each of the last `history` closed ticks, newest last.
        self._history: deque[tuple[int, ...]] = deque(maxlen=history)
        self.reset(0)

    @property
    def history_ticks(self) -> int:
        """The longest window in ticks: skipping more quiet ticks than this forgets all activity."""
        return self._history.maxlen or 0

    def reset(self, epoch_start_ns: int, prices: Iterable[int] = ()) -> None:
        """Start a new epoch at event time ``epoch_start_ns`` (the snapshot counts as a quote change).

        ``prices``: the snapshot's level prices (price_e8), the first evidence of the price tick.
        """
        self._history.clear()
        self._updates = 0
        self._trades = 0
        self._ofi = 0
        self._ofi_levels = 0
        self._best_changes = 0
        self._mid_square_sum = 0
        self._bid_depletion = 0
        self._ask_depletion = 0
        self._buy_volume = 0
        self._sell_volume = 0
        self._trade_volume = 0
        self._previous_mid2: int | None = None
        self._last_change_ns = epoch_start_ns
        self._last_bid_change_ns = epoch_start_ns
        self._last_ask_change_ns = epoch_start_ns
        self._last_trade_side = 0.0
        self._last_trade_size = 0.0
        self._price_tick = price_tick(prices)

    def _counters(self) -> tuple[int, ...]:
        """The cumulative counters of the epoch; the windows are differences of two of these."""
        return (
            self._updates,
            self._trades,
            self._ofi,
            self._best_changes,
            self._mid_square_sum,
            self._ofi_levels,
            self._bid_depletion,
            self._ask_depletion,
            self._buy_volume,
            self._sell_volume,
            self._trade_volume,
        )

    def on_update(
        self,
        ts_ns: int,
        changes: int,
        before: tuple[Sequence[Level], Sequence[Level]],
        after: tuple[Sequence[Level], Sequence[Level]],
    ) -> None:
        """An update batch of ``changes`` level changes at event time ``ts_ns`` turned the book top
        ``before`` (bids, asks) into ``after``; the same object when the top did not change."""
        self._updates += changes
        if after is before:
            return
        self._ofi_levels += multilevel_ofi_contribution(before, after)
        before_bids, before_asks = before
        bids, asks = after
        before_bid = before_bids[0] if before_bids else None
        before_ask = before_asks[0] if before_asks else None
        bid = bids[0] if bids else None
        ask = asks[0] if asks else None
        if before_bid == bid and before_ask == ask:
            return  # a change below level 1
        self._bid_depletion += queue_depletion(before_bid, bid, "BID")
        self._ask_depletion += queue_depletion(before_ask, ask, "ASK")
        if before_bid is not None and before_ask is not None and bid is not None and ask is not None:
            self._ofi += ofi_contribution(before_bid, before_ask, bid, ask)
        bid_changed = (before_bid is None) != (bid is None) or (
            before_bid is not None and bid is not None and before_bid[0] != bid[0]
        )
        ask_changed = (before_ask is None) != (ask is None) or (
            before_ask is not None and ask is not None and before_ask[0] != ask[0]
        )
        if bid_changed:
            self._last_bid_change_ns = ts_ns
            if bid is not None:
                self._price_tick = math.gcd(self._price_tick, bid[0])
        if ask_changed:
            self._last_ask_change_ns = ts_ns
            if ask is not None:
                self._price_tick = math.gcd(self._price_tick, ask[0])
        if bid_changed or ask_changed:
            self._best_changes += 1
            self._last_change_ns = ts_ns

    def on_trade(self, trade: Trade) -> None:
        """A ``quotewatch.Trade`` record of the symbol."""
        self._trades += 1
        size = trade.size_e8
        side = trade.aggressor_side
        if side == "BUY":
            self._buy_volume += size
        elif side == "SELL":
            self._sell_volume += size
        self._trade_volume += size
        self._last_trade_side = _AGGRESSOR_SIGN.get(side, 0.0)
        self._last_trade_size = size / SCALE

    def skip_ticks(self, count: int) -> None:
        """``count`` quiet grid ticks pass without being emitted (no activity, book unchanged)."""
        counters = self._counters()
        history = self._history
        for _ in range(min(count, self.history_ticks)):
            history.append(counters)

    def close_tick(self, t_ns: int, bids: Sequence[Level], asks: Sequence[Level]) -> tuple[float, ...] | None:
        """Close grid tick ``t_ns`` with the book top at t; the values in spec order, or None.

        None when a side is empty (mid is undefined); the tick still enters the windows.
        """
        history = self._history
        if not bids or not asks or bids[0][0] + asks[0][0] <= 0:
            self._previous_mid2 = None
            history.append(self._counters())
            return None
        # Hot path (once per tick and symbol): everything inlined, windows unrolled (3 + 2, asserted
        # at import against the spec).
        bid, bid_size = bids[0]
        ask, ask_size = asks[0]
        mid2 = bid + ask  # 2 x mid, exact
        previous = self._previous_mid2
        if previous is not None and previous != mid2:
            self._mid_square_sum += (mid2 - previous) ** 2
        self._previous_mid2 = mid2
        counters = self._counters()
        updates, trades, ofi, best_changes, squares, ofi_levels, bid_depletion, ask_depletion, buy, sell, volume = (
            counters
        )
        length = len(history)
        c1, c2, c3 = self._count_windows
        q1, q2 = self._quote_windows
        a = history[-c1] if c1 <= length else _ZERO
        b = history[-c2] if c2 <= length else _ZERO
        c = history[-c3] if c3 <= length else _ZERO
        d = history[-q1] if q1 <= length else _ZERO
        e = history[-q2] if q2 <= length else _ZERO
        history.append(counters)

        mid = mid2 / (2 * SCALE)
        spread = (ask - bid) / SCALE
        level1 = bid_size + ask_size
        microprice = (bid * ask_size + ask * bid_size) / (level1 * SCALE) if level1 else mid
        levels = len(bids)
        depth_bid = bid_size + (bids[1][1] if levels > 1 else 0) + (bids[2][1] if levels > 2 else 0)
        levels = len(asks)
        depth_ask = ask_size + (asks[1][1] if levels > 1 else 0) + (asks[2][1] if levels > 2 else 0)
        depth = depth_bid + depth_ask
        long_seconds = QUOTE_CHANGE_WINDOWS_MS[1] / 1000
        return (
            mid,
            spread,
            spread / mid * _BPS,
            microprice,
            (microprice - mid) / mid * _BPS,
            (bid_size - ask_size) / level1 if level1 else 0.0,
            (depth_bid - depth_ask) / depth if depth else 0.0,
            depth_bid / SCALE,
            depth_ask / SCALE,
            (ofi - a[2]) / SCALE,
            (ofi - b[2]) / SCALE,
            (ofi - c[2]) / SCALE,
            float(updates - a[0]),
            float(updates - b[0]),
            float(updates - c[0]),
            float(trades - a[1]),
            float(trades - b[1]),
            float(trades - c[1]),
            (t_ns - self._last_change_ns) / 1e6,
            float(best_changes - d[3]),
            float(best_changes - e[3]),
            math.sqrt(squares - d[4]) / mid2 * _BPS,
            math.sqrt(squares - e[4]) / mid2 * _BPS,
            self._last_trade_side,
            self._last_trade_size,
            (ofi_levels - a[5]) / SCALE,
            (ofi_levels - b[5]) / SCALE,
            (ofi_levels - c[5]) / SCALE,
            (bid_depletion - d[6]) / SCALE,  # the 1 s window: per second = per window
            (ask_depletion - d[7]) / SCALE,
            trade_flow_imbalance(buy - d[8], sell - d[9]),
            trade_flow_imbalance(buy - e[8], sell - e[9]),
            (trades - e[1]) / long_seconds,
            (volume - e[10]) / SCALE / long_seconds,
            (t_ns - self._last_bid_change_ns) / 1e6,
            (t_ns - self._last_ask_change_ns) / 1e6,
            spread_in_ticks(bid, ask, self._price_tick),
        )


_ZERO = (0,) * 11
if (
    len(COUNT_WINDOWS_MS) != 3
    or len(QUOTE_CHANGE_WINDOWS_MS) != 2
    or QUOTE_CHANGE_WINDOWS_MS[0] != 1000
    or QUOTE_CHANGE_WINDOWS_MS[1] != 5000
):  # close_tick unrolls the windows and names the 1 s and 5 s ones
    raise RuntimeError("the feature windows changed: update FeatureState.close_tick to match FEATURES")
