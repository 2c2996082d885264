"""Labels y(t): did the best bid or best ask price change between grid ticks t and t + Δ?

:class:`SymbolLabeler` consumes one symbol's ``BookTop`` records in stream order and,
when the tick ``t + Δ`` arrives, returns the ``quotewatch.Label`` of tick ``t``:
``y(t) = 1`` iff the best bid price or the best ask price at ``t + Δ`` differs from ``t``.
The live labeler service and the backtest call exactly this code.

Rules:

- Δ (``DELTA_MS``) must be a positive multiple of ``TICK_MS``: labels compare two grid ticks.
- ``synced_over_horizon`` is true iff t and t + Δ share a sync ``epoch``: the book was synced
  over the whole horizon (the book service emits no tick while unsynced, and a new snapshot
  starts a new epoch, so a GAP or a resync inside [t, t + Δ] means two epochs). A label across
  epochs is still published, flagged false, so consumers can count the ticks the synced-only
  rule excludes; its ``epoch`` is the one of t. Metrics, training and the fallback use only
  synced labels (:func:`is_synced`). When t + Δ is not emitted at all (unsynced then), t gets no
  label.
- Both ticks must have been emitted and have both sides; otherwise t gets no label (the first
  ticks of a stream, ticks skipped over a long time jump, one-sided books).
- A tick not newer than the symbol's last tick is rejected (:class:`LabelInputError`) and leaves
  the state unchanged: the book service never emits one, so it is a bug or a foreign producer.
- The label's ``ts_event`` is ``t + Δ`` (when it became known) and its ``ts_init`` is the
  ``ts_init`` of the BookTop at ``t + Δ``: a pure function of the input.

The state is the ticks of the last Δ (at most Δ / TICK_MS records per symbol).
:attr:`SymbolLabeler.restart_position` is the position of the oldest tick still waiting for its
label: replaying from there rebuilds the state exactly.
"""

from __future__ import annotations

from collections import deque

from quotewatch.core.errors import PoisonRecordError
from quotewatch.core.records import BookTop, Label

_MS = 1_000_000


class LabelInputError(PoisonRecordError, ValueError):
    """A BookTop the labeler cannot use (older than the symbol's last tick, off the grid, wrong symbol)."""


def check_horizon(delta_ms: int, tick_ms: int) -> None:
    """Raise ValueError unless ``delta_ms`` is a positive multiple of ``tick_ms``."""
    if tick_ms <= 0 or delta_ms <= 0 or delta_ms % tick_ms:
        raise ValueError(
            f"DELTA_MS={delta_ms} is not a positive multiple of TICK_MS={tick_ms}: "
            "labels compare two grid ticks, so the horizon must fall on the grid"
        )


def is_synced(label: Label) -> bool:
    """Whether a label counts: its book was synced over the whole [t, t + Δ] (the synced-only rule)."""
    return label.synced_over_horizon


def label_value(bid_then: int, ask_then: int, bid_later: int, ask_later: int) -> int:
    """y = 1 iff the best bid or the best ask price changed."""
    return int(bid_then != bid_later or ask_then != ask_later)


class SymbolLabeler:
    """Labels of one symbol.

    Args:
        delta_ms: the horizon Δ.
        tick_ms: the grid step of the BookTop records.
    """

    def __init__(self, symbol: str, delta_ms: int, tick_ms: int) -> None:
        check_horizon(delta_ms, tick_ms)
        self.symbol = symbol
        self.delta_ms = delta_ms
        self.tick_ms = tick_ms
        self.delta_ns = delta_ms * _MS
        self._tick_ns = tick_ms * _MS
        # (t, epoch, best_bid or None, best_ask or None, position) of the ticks of the last Δ.
        self._window: deque[tuple[int, int, int | None, int | None, int | None]] = deque()
        self.last_tick_ns: int | None = None

    @property
    def restart_position(self) -> int | None:
        """Position of the oldest tick still waiting for its label (None: nothing pending or unknown)."""
        return self._window[0][4] if self._window else None

    def process(self, top: BookTop, position: int | None = None) -> Label | None:
        """Consume one BookTop; return the Label of tick ``ts_event - Δ`` or None.

        Raises:
            LabelInputError: wrong symbol, tick not newer than the last one, or a ``tick_ms``
                other than the labeler's. The state is unchanged.
        """
        t = top.ts_event
        if top.symbol != self.symbol:
            raise LabelInputError(f"BookTop of {top.symbol!r} sent to the labeler of {self.symbol!r}")
        if top.tick_ms != self.tick_ms:
            raise LabelInputError(f"BookTop on a {top.tick_ms} ms grid; the labeler expects TICK_MS={self.tick_ms}")
        if t % self._tick_ns:
            raise LabelInputError(f"BookTop of {self.symbol} at t={t} ns is not on the {self.tick_ms} ms grid")
        if self.last_tick_ns is not None and t <= self.last_tick_ns:
            raise LabelInputError(
                f"BookTop of {self.symbol} at t={t} is not newer than the last tick {self.last_tick_ns}"
            )
        bids, asks = top.bids, top.asks
        bid = bids[0].price_e8 if bids else None
        ask = asks[0].price_e8 if asks else None
        epoch = top.epoch
        window = self._window
        target = t - self.delta_ns
        # Ticks older than t - Δ can never be labelled any more.
        while window and window[0][0] < target:
            window.popleft()
        label = None
        if window and window[0][0] == target:
            then, then_epoch, then_bid, then_ask, _ = window.popleft()
            if then_bid is not None and then_ask is not None and bid is not None and ask is not None:
                label = Label(
                    ts_event=t,
                    ts_init=top.ts_init,
                    exchange=top.exchange,
                    symbol=self.symbol,
                    t_event=then,
                    delta_ms=self.delta_ms,
                    epoch=then_epoch,
                    label=1 if then_bid != bid or then_ask != ask else 0,  # label_value, inlined
                    best_bid_e8=then_bid,
                    best_ask_e8=then_ask,
                    future_best_bid_e8=bid,
                    future_best_ask_e8=ask,
                    synced_over_horizon=then_epoch == epoch,
                )
        window.append((t, epoch, bid, ask, position))
        self.last_tick_ns = t
        return label


class Labeler:
    """:class:`SymbolLabeler` per symbol, created on a symbol's first tick."""

    def __init__(self, delta_ms: int, tick_ms: int) -> None:
        check_horizon(delta_ms, tick_ms)
        self.delta_ms = delta_ms
        self.tick_ms = tick_ms
        self.labelers: dict[str, SymbolLabeler] = {}

    def process(self, top: BookTop, position: int | None = None) -> Label | None:
        """Route one BookTop to its symbol's labeler (see :meth:`SymbolLabeler.process`)."""
        symbol = top.symbol
        labeler = self.labelers.get(symbol)
        if labeler is None:
            labeler = self.labelers[symbol] = SymbolLabeler(symbol, self.delta_ms, self.tick_ms)
        return labeler.process(top, position)

    def restart_position(self, symbols: set[str] | None = None) -> int | None:
        """The earliest restart position over ``symbols`` (default: all)."""
        positions = [
            position
            for symbol, labeler in self.labelers.items()
            if (symbols is None or symbol in symbols) and (position := labeler.restart_position) is not None
        ]
        return min(positions) if positions else None

    def drop(self, symbols: set[str]) -> None:
        """Forget the state of ``symbols``."""
        for symbol in symbols:
            self.labelers.pop(symbol, None)
