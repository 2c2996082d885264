"""Why the dashboard has no snapshot yet, in words: one line per symbol.

A pure function of what the upstream probe (:mod:`quotewatch.services.dashboard.probe`) has read of
the pipeline's topics (:class:`~quotewatch.services.dashboard.upstream.UpstreamView`). The runtime
puts the lines in :attr:`~quotewatch.services.dashboard.view.FeedView.waiting`; the empty state and
``/health`` (``waiting_for``) show them.
"""

from __future__ import annotations

from quotewatch.services.dashboard.upstream import SUBSCRIBED, SymbolUpstream, UpstreamView
from quotewatch.services.dashboard.view import format_event_time


def waiting_reasons(upstream: UpstreamView | None) -> list[str]:
    """Why no snapshot has arrived: one line per symbol, from the records upstream of the snapshot topic.

    Each symbol is placed at the furthest stage its records reached: predictions, feature
    vectors or top-3 written (a service further down is not writing); else, going down the
    pipeline from the feed, the first thing missing: market events, a subscription, a book
    snapshot, the book's sync, a closed tick. Empty before the probe has read anything.
    """
    if upstream is None:
        return []
    symbols = sorted(set(upstream.configured) | set(upstream.symbols))
    if not upstream.symbols and upstream.raw_records == 0:
        return [f"Nothing on {upstream.md_raw} yet: no frame from the feed (is the ingest running and connected?)"]
    return [
        f"{symbol}: {_symbol_reason(upstream, upstream.symbols.get(symbol) or SymbolUpstream())}" for symbol in symbols
    ]


def _symbol_reason(upstream: UpstreamView, state: SymbolUpstream) -> str:
    if state.predictions:
        return f"{state.predictions:,} predictions on {upstream.predictions}, but no snapshot yet"
    if state.features:
        return f"feature vectors on {upstream.features}, but no prediction yet (is inference running?)"
    if state.top3:
        return f"top-3 records on {upstream.book_top3}, but no feature vector yet (a one-sided book has none)"
    if not state.events:
        return f"no market event on {upstream.md_events} yet"
    if state.feed_state is not None and state.feed_state != SUBSCRIBED:
        detail = f": {state.feed_detail}" if state.feed_detail else ""
        return f"feed not subscribed ({state.feed_state}{detail})"
    if state.gap is not None:
        return (
            f"book not synced since a gap ({state.gap}) at {format_event_time(state.gap_ns)}; "
            "waiting for the next book snapshot"
        )
    if state.snapshot_ns is None or state.synced_at_ns is None:
        subscribed = " (feed subscribed)" if state.feed_state == SUBSCRIBED else ""
        return f"no book snapshot yet{subscribed}"
    tick_ns = upstream.tick_ms * 1_000_000
    first_tick = -(-state.synced_at_ns // tick_ns) * tick_ns  # the first grid time at or after the sync
    latest = state.event_time_ns if state.event_time_ns is not None else state.synced_at_ns
    if latest > first_tick:
        return (
            f"no top-3 on {upstream.book_top3} yet, although event time ({format_event_time(latest)}) has passed "
            f"the first tick after the book snapshot ({format_event_time(first_tick)}): is the book running?"
        )
    return (
        f"no tick closed yet: book synced at {format_event_time(state.snapshot_ns)}, event time is "
        f"{format_event_time(latest)}; the tick at {format_event_time(first_tick)} closes with the first event after it"
    )
