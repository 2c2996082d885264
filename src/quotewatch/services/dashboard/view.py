"""What the dashboard shows, as pure functions of the latest Snapshot record of a symbol.

A Snapshot is a plain dict shaped like ``quotewatch.Snapshot`` (schemas/quotewatch.Snapshot.avsc):
prices and sizes are exact integers x 1e8 (``price_e8``), metrics are nullable doubles that may
also be NaN, the model fields are null before inference has loaded a model. These functions turn
it (plus how long ago it arrived, measured by the caller) into the strings, colours, components
and figures the page shows. No I/O, no clock, no Kafka: the Dash callbacks in
:mod:`quotewatch.services.dashboard.app` only fetch from the store and call these, and the unit tests cover
the edge cases (no model yet, fallback role, NaN and null metrics, empty and one-sided books).
Before the first snapshot the empty state lists why (:attr:`FeedView.waiting`, from
:mod:`quotewatch.services.dashboard.waiting`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, TypeGuard

from dash import html, no_update
from plotly.utils import PlotlyJSONEncoder

from quotewatch.core.records import BookLevel, LiveMetrics, Snapshot
from quotewatch.core.units import format_e8

Props = dict[str, Any]  # not a topic record: Dash component properties or a Plotly layout

NA = "—"
"""Shown where a value is unknown: null, NaN, infinite, or a side of the book that is empty."""
LADDER_DEPTH = 3
NEUTRAL_COLOUR = "#e3e6ea"
# p_change colour scale: calm (no change expected) -> likely change. Stops are (p, (r, g, b)).
P_CHANGE_SCALE: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (0x1A, 0x98, 0x50)),
    (0.5, (0xFE, 0xE0, 0x8B)),
    (1.0, (0xD7, 0x30, 0x27)),
)
# States of the ingest connection state machine (quotewatch.FeedStatus.state) -> badge class.
FEED_STATE_CLASSES = {
    "SUBSCRIBED": "ok",
    "INIT": "warn",
    "CONNECTING": "warn",
    "RECONNECTING": "warn",
    "BACKOFF": "warn",
    "STOPPED": "bad",
}


# -- scalars ------------------------------------------------------------------------------------


def is_finite(value: object) -> TypeGuard[float]:
    """True for a real number that is neither NaN nor infinite (null and booleans are not numbers)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _group_thousands(text: str) -> str:
    sign = "-" if text.startswith("-") else ""
    whole, dot, frac = text.lstrip("-").partition(".")
    return f"{sign}{int(whole):,}{dot}{frac}"


def format_price(price_e8: int | None) -> str:
    """An exact price x 1e8 as text with thousands separators and at least two decimals.

    ``format_price(6_723_451_000_000) == "67,234.51"``; sub-cent digits are kept, never rounded.
    """
    if price_e8 is None:
        return NA
    whole, _, frac = format_e8(price_e8).partition(".")
    return _group_thousands(f"{whole}.{frac.ljust(2, '0')}")


def format_size(size_e8: int | None) -> str:
    """An exact size x 1e8 as text, without trailing zeros: ``format_size(150_000_000) == "1.5"``."""
    if size_e8 is None:
        return NA
    return _group_thousands(format_e8(size_e8))


def format_number(value: object, digits: int = 3) -> str:
    """A metric or probability with ``digits`` decimals; NA for null, NaN and infinities."""
    return f"{value:.{digits}f}" if is_finite(value) else NA


def format_lift(metrics: LiveMetrics | None) -> tuple[str, str]:
    """The champion's live lift over the rolling-frequency baseline as ``+0.042 [-0.010, +0.090]``, and its
    alarm line (empty unless flagged). NA when not computed yet (not the champion, or too few labels)."""
    if metrics is None or not is_finite(metrics.lift):
        return NA, ""
    text = f"{metrics.lift:+.3f}"
    if is_finite(metrics.lift_low) and is_finite(metrics.lift_high):
        text += f" [{metrics.lift_low:+.3f}, {metrics.lift_high:+.3f}]"
    else:
        text += " (no interval: too few labels)"
    if metrics.lift_flagged:
        return text, "below zero for LIFT_ALARM_MS: review the champion (demote in the MLflow UI)"
    return text, f"over the rolling change frequency, {format_count(metrics.lift_rows)} labels"


def format_rate(updates_per_second: object) -> str:
    """Snapshots per second as ``12.5/s``."""
    return f"{updates_per_second:.1f}/s" if is_finite(updates_per_second) else NA


def format_count(value: object) -> str:
    """A record count with thousands separators."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return NA


def format_age(age_ns: int | None) -> str:
    """How long ago, for people: ``0.4 s``, ``12 s``, ``3 min``, ``2.5 h``."""
    if age_ns is None:
        return NA
    seconds = max(0, age_ns) / 1e9
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_event_time(ts_ns: int | None) -> str:
    """An event time in ns as ``HH:MM:SS.mmm UTC``."""
    if ts_ns is None:
        return NA
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


# -- colours ------------------------------------------------------------------------------------


def p_change_colour(p_change: object) -> tuple[str, str]:
    """(background, text) colours of the p_change card: green (calm) -> yellow -> red (change likely).

    Values outside [0, 1] are clamped; null and NaN give a neutral grey.
    """
    if not is_finite(p_change):
        return NEUTRAL_COLOUR, "#333333"
    p = min(1.0, max(0.0, float(p_change)))
    for (low, low_rgb), (high, high_rgb) in pairwise(P_CHANGE_SCALE):
        if p <= high:
            weight = (p - low) / (high - low)
            rgb = tuple(round(a + (b - a) * weight) for a, b in zip(low_rgb, high_rgb, strict=True))
            break
    else:  # pragma: no cover - p <= 1.0 always ends the loop
        rgb = P_CHANGE_SCALE[-1][1]
    # Relative luminance (sRGB approximation) decides between dark and light text.
    luminance = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255
    text = "#111111" if luminance > 0.55 else "#ffffff"
    return "#{:02x}{:02x}{:02x}".format(*rgb), text


def feed_state_class(state: str | None) -> str:
    """CSS class of the feed-state badge: ok, warn, bad, or unknown for states we do not know."""
    return FEED_STATE_CLASSES.get((state or "").upper(), "unknown")


# -- the book -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quote:
    """Top of book: best prices (x 1e8) of each side, None where the side is empty."""

    best_bid_e8: int | None
    best_ask_e8: int | None

    @property
    def spread_e8(self) -> int | None:
        if self.best_bid_e8 is None or self.best_ask_e8 is None:
            return None
        return self.best_ask_e8 - self.best_bid_e8

    @property
    def mid(self) -> float | None:
        """The mid price as a float (display and sparklines only)."""
        if self.best_bid_e8 is None or self.best_ask_e8 is None:
            return None
        return (self.best_bid_e8 + self.best_ask_e8) / 2e8


def _sorted_levels(levels: Sequence[BookLevel], best_first_descending: bool) -> list[BookLevel]:
    return sorted(levels, key=lambda level: level.price_e8, reverse=best_first_descending)


def quote_of(snapshot: Snapshot) -> Quote:
    """Best bid and ask of a snapshot, whatever order its levels come in."""
    bids = _sorted_levels(snapshot.bids, best_first_descending=True)
    asks = _sorted_levels(snapshot.asks, best_first_descending=False)
    return Quote(
        bids[0].price_e8 if bids else None,
        asks[0].price_e8 if asks else None,
    )


def format_spread(quote: Quote) -> tuple[str, str]:
    """(spread, spread in basis points of the mid); a crossed book is flagged, not hidden."""
    spread = quote.spread_e8
    mid = quote.mid
    if spread is None or mid is None:
        return NA, NA
    text = format_price(spread)
    if mid <= 0:
        return text, NA
    bps = spread / 1e8 / mid * 1e4
    suffix = " (crossed)" if spread < 0 else ""
    # A one-tick BTC-USD spread is ~0.0015 bps: show small spreads with enough digits to read.
    return text, (f"{bps:.2f}" if abs(bps) >= 0.1 else f"{bps:.4f}") + f" bps{suffix}"


def ladder_rows(snapshot: Snapshot, depth: int = LADDER_DEPTH) -> list[tuple[str, str, str, str]]:
    """``depth`` rows of (bid size, bid price, ask price, ask size), best first; NA fills a short side."""
    bids = _sorted_levels(snapshot.bids, best_first_descending=True)[:depth]
    asks = _sorted_levels(snapshot.asks, best_first_descending=False)[:depth]
    rows = []
    for i in range(depth):
        bid = bids[i] if i < len(bids) else None
        ask = asks[i] if i < len(asks) else None
        rows.append(
            (
                format_size(bid.size_e8) if bid else NA,
                format_price(bid.price_e8) if bid else NA,
                format_price(ask.price_e8) if ask else NA,
                format_size(ask.size_e8) if ask else NA,
            )
        )
    return rows


def ladder_table_rows(snapshot: Snapshot, depth: int = LADDER_DEPTH) -> list[html.Tr]:
    """The ladder as table rows (``<tr>`` of four cells)."""
    return [
        html.Tr(
            [
                html.Td(bid_size, className="size bid"),
                html.Td(bid_price, className="price bid"),
                html.Td(ask_price, className="price ask"),
                html.Td(ask_size, className="size ask"),
            ]
        )
        for bid_size, bid_price, ask_price, ask_size in ladder_rows(snapshot, depth)
    ]


# -- the model ----------------------------------------------------------------------------------


def model_text(snapshot: Snapshot) -> tuple[str, str]:
    """(model, role) for the model card.

    ``("lr-top3 v7", "CHAMPION")``; before inference loaded any model ``("no model yet", NA)``; the
    built-in fallback reads ``("fallback", "FALLBACK")`` with its name when it has one.
    """
    name, version, role = snapshot.model_name, snapshot.model_version, snapshot.model_role
    if role == "FALLBACK":
        return (f"fallback ({name})" if name else "fallback"), "FALLBACK"
    if not name:
        return "no model yet", role or NA
    return (f"{name} v{version}" if version else name), role or NA


def live_metrics_of(snapshot: Snapshot) -> LiveMetrics | None:
    """The LiveMetrics entry of the model serving this snapshot.

    Matched on (name, version, role); else on role alone (a version just reloaded has no entry of
    its own yet); else None.
    """
    entries = snapshot.live_metrics
    wanted = (snapshot.model_name, snapshot.model_version, snapshot.model_role)
    for entry in entries:
        if (entry.model_name, entry.model_version, entry.model_role) == wanted:
            return entry
    for entry in entries:
        if wanted[2] is not None and entry.model_role == wanted[2]:
            return entry
    return None


# -- the whole page -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Latest:
    """What the store knows about one symbol: its newest snapshot and how long ago it arrived."""

    symbol: str
    snapshot: Snapshot
    age_ns: int
    received: int
    """Snapshots of this symbol received by this process."""


@dataclass(frozen=True, slots=True)
class FeedView:
    """The dashboard process's own view of the snapshot topic (footer and empty state)."""

    topic: str
    records: int
    rejected: int
    lag: int
    caught_up: bool
    waiting: tuple[str, ...] = ()
    """Why there is no snapshot yet, per symbol (:func:`quotewatch.services.dashboard.waiting.waiting_reasons`)."""


# The (component id, property) pairs the KPI callback writes, in callback output order.
KPI_OUTPUTS: tuple[tuple[str, str], ...] = (
    ("status-badge", "children"),
    ("status-badge", "className"),
    ("stale-indicator", "children"),
    ("stale-indicator", "style"),
    ("empty-title", "children"),
    ("empty-reasons", "children"),
    ("empty-state", "style"),
    ("main-panel", "style"),
    ("main-panel", "className"),
    ("snapshot-time", "children"),
    ("kpi-best-bid", "children"),
    ("kpi-best-ask", "children"),
    ("kpi-spread", "children"),
    ("kpi-spread-bps", "children"),
    ("kpi-p-change", "children"),
    ("card-p-change", "style"),
    ("kpi-challenger", "children"),
    ("kpi-model", "children"),
    ("kpi-model-role", "children"),
    ("kpi-model-role", "className"),
    ("kpi-auc", "children"),
    ("kpi-brier", "children"),
    ("kpi-balanced-accuracy", "children"),
    ("kpi-n-labels", "children"),
    ("kpi-lift", "children"),
    ("kpi-lift-note", "children"),
    ("card-lift", "className"),
    ("kpi-updates", "children"),
    ("kpi-feed-state", "children"),
    ("kpi-feed-state", "className"),
    ("kpi-consumer-lag", "children"),
    ("ladder-body", "children"),
    ("footer-status", "children"),
)
HIDDEN: dict[str, str] = {"display": "none"}
SHOWN: dict[str, str] = {}


def render_kpis(latest: Latest | None, feed: FeedView, stale_after_ns: int) -> dict[tuple[str, str], Any]:
    """Every value the KPI callback writes (keys: :data:`KPI_OUTPUTS`), for one symbol or the empty state.

    Stale means no snapshot of the symbol arrived for more than ``stale_after_ns``.
    """
    footer = (
        f"{feed.topic} · {feed.records:,} snapshots read"
        + (f" · {feed.rejected:,} rejected" if feed.rejected else "")
        + f" · dashboard lag {feed.lag:,}"
        + ("" if feed.caught_up else " · reading from the beginning…")
    )
    out: dict[tuple[str, str], Any] = dict.fromkeys(KPI_OUTPUTS, NA)
    out[("footer-status", "children")] = footer
    if latest is None:
        caught_up = feed.caught_up
        out.update(
            {
                ("status-badge", "children"): "WAITING",
                ("status-badge", "className"): "badge waiting",
                ("stale-indicator", "children"): "",
                ("stale-indicator", "style"): HIDDEN,
                ("empty-title", "children"): (
                    f"Waiting for the first snapshot on {feed.topic}…"
                    if caught_up
                    else f"Reading {feed.topic} from the beginning…"
                ),
                ("empty-reasons", "children"): [html.Li(reason) for reason in feed.waiting] if caught_up else [],
                ("empty-state", "style"): SHOWN,
                ("main-panel", "style"): HIDDEN,
                ("main-panel", "className"): "main",
                ("card-p-change", "style"): {},
                ("kpi-model-role", "className"): "role",
                ("card-lift", "className"): "card",
                ("kpi-lift-note", "children"): "",
                ("kpi-feed-state", "className"): "badge unknown",
                ("ladder-body", "children"): [],
                ("kpi-challenger", "children"): "",
            }
        )
        return out

    snapshot = latest.snapshot
    stale = latest.age_ns > stale_after_ns
    quote = quote_of(snapshot)
    spread, spread_bps = format_spread(quote)
    background, text_colour = p_change_colour(snapshot.p_change)
    model, role = model_text(snapshot)
    metrics = live_metrics_of(snapshot)
    lift, lift_note = format_lift(metrics)
    challenger = snapshot.challenger_p_change
    feed_state = snapshot.feed_state or "UNKNOWN"
    out.update(
        {
            ("status-badge", "children"): "STALE" if stale else "LIVE",
            ("status-badge", "className"): "badge stale" if stale else "badge live",
            ("stale-indicator", "children"): (
                f"STALE — no snapshot for {latest.symbol} in {format_age(latest.age_ns)}" if stale else ""
            ),
            ("stale-indicator", "style"): SHOWN if stale else HIDDEN,
            ("empty-title", "children"): "",
            ("empty-reasons", "children"): [],
            ("empty-state", "style"): HIDDEN,
            ("main-panel", "style"): SHOWN,
            ("main-panel", "className"): "main stale" if stale else "main",
            ("snapshot-time", "children"): (
                f"{latest.symbol} · event time {format_event_time(snapshot.ts_event)}"
                f" · received {format_age(latest.age_ns)} ago"
            ),
            ("kpi-best-bid", "children"): format_price(quote.best_bid_e8),
            ("kpi-best-ask", "children"): format_price(quote.best_ask_e8),
            ("kpi-spread", "children"): spread,
            ("kpi-spread-bps", "children"): spread_bps,
            ("kpi-p-change", "children"): format_number(snapshot.p_change),
            ("card-p-change", "style"): {"backgroundColor": background, "color": text_colour},
            ("kpi-challenger", "children"): (
                f"challenger {format_number(challenger)}" if challenger is not None else ""
            ),
            ("kpi-model", "children"): model,
            ("kpi-model-role", "children"): role,
            ("kpi-model-role", "className"): f"role {role.lower()}" if role != NA else "role",
            ("kpi-auc", "children"): format_number(metrics.auc if metrics else None),
            ("kpi-brier", "children"): format_number(metrics.brier if metrics else None),
            ("kpi-balanced-accuracy", "children"): format_number(metrics.balanced_accuracy if metrics else None),
            ("kpi-n-labels", "children"): (f"{format_count(metrics.n_labels)} labels" if metrics else "no labels yet"),
            ("kpi-lift", "children"): lift,
            ("kpi-lift-note", "children"): lift_note,
            ("card-lift", "className"): "card flagged" if metrics is not None and metrics.lift_flagged else "card",
            ("kpi-updates", "children"): format_rate(snapshot.updates_per_second),
            ("kpi-feed-state", "children"): feed_state,
            ("kpi-feed-state", "className"): f"badge {feed_state_class(feed_state)}",
            ("kpi-consumer-lag", "children"): format_count(snapshot.consumer_lag),
            ("ladder-body", "children"): ladder_table_rows(snapshot),
        }
    )
    return out


def props_by_component(values: Mapping[tuple[str, str], Any]) -> dict[str, Props]:
    """``{(id, prop): value}`` regrouped as ``{id: {prop: value}}``, the shape ``set_props`` takes (push mode)."""
    grouped: dict[str, Props] = {}
    for (component, prop), value in values.items():
        grouped.setdefault(component, {})[prop] = value
    return grouped


def props_to_send(
    values: Mapping[tuple[str, str], Any], sent: Mapping[tuple[str, str], str]
) -> tuple[dict[str, Props], dict[tuple[str, str], str]]:
    """Push mode: the props whose JSON differs from what the page was last sent, grouped by component.

    Returns (``{id: {prop: value}}`` to send, the updated record of what was sent). Each
    ``set_props`` is a WebSocket message the page applies on its own, so sending only what
    changed (a few cards per snapshot) keeps the page's work per update small.
    """
    encoded = {key: json.dumps(value, cls=PlotlyJSONEncoder, sort_keys=True) for key, value in values.items()}
    changed = {key: values[key] for key, text in encoded.items() if sent.get(key) != text}
    return props_by_component(changed), {**sent, **encoded}


def selector_update(
    symbols: Sequence[str],
    current_value: str | None,
    current_options: Sequence[Any] | None,
    preferred: Sequence[str] = (),
) -> tuple[Any, Any, Any]:
    """(options, value, wrapper style) of the symbol selector, ``no_update`` where nothing changes.

    The selector shows only when several symbols are known. The user's choice is kept while it
    is still a known symbol; otherwise the first configured symbol that is known is chosen, else
    the first known one.
    """
    symbols = sorted(symbols)
    options = [{"label": symbol, "value": symbol} for symbol in symbols]
    known_options = [o.get("value") if isinstance(o, Mapping) else o for o in (current_options or [])]
    new_options: Any = no_update if known_options == symbols else options
    if current_value in symbols:
        value: Any = no_update
    elif symbols:
        value = next((symbol for symbol in preferred if symbol in symbols), symbols[0])
    else:
        value = no_update if current_value is None else None
    style: Any = no_update if new_options is no_update else (SHOWN if len(symbols) > 1 else HIDDEN)
    return new_options, value, style


# -- sparklines ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class History:
    """Recent (event time, p_change, mid) points of one symbol; ``version`` changes with every append."""

    version: int
    ts_event_ns: Sequence[int]
    p_change: Sequence[float | None]
    mid: Sequence[float | None]


P_CHANGE_RANGE = (-0.03, 1.03)
MID_TICK_FORMAT = ",.2f"


def downsample_indices(count: int, max_points: int) -> list[int]:
    """At most ``max_points`` evenly spaced indices of ``range(count)``, always keeping the last one."""
    if count <= 0 or max_points <= 0:
        return []
    if count <= max_points:
        return list(range(count))
    if max_points == 1:
        return [count - 1]
    step = (count - 1) / (max_points - 1)
    return sorted({round(i * step) for i in range(max_points - 1)} | {count - 1})


def _finite_or_none(value: object) -> float | None:
    return float(value) if is_finite(value) else None


def sparkline_figure(
    ts_event_ns: Sequence[int],
    values: Sequence[float | None],
    title: str,
    colour: str,
    y_range: tuple[float, float] | None = None,
    max_points: int = 600,
    tick_format: str | None = None,
) -> Props:
    """A small line chart (a plain Plotly figure dict) of ``values`` over event time; NaN/null are gaps."""
    keep = downsample_indices(len(ts_event_ns), max_points)
    xs = [ts_event_ns[i] / 1e6 for i in keep]  # epoch ms: Plotly reads numbers on a date axis as ms
    ys = [_finite_or_none(values[i]) for i in keep]
    yaxis: Props = {"showgrid": True, "gridcolor": "#eef0f3", "zeroline": False, "tickfont": {"size": 10}}
    if y_range is not None:
        yaxis["range"] = list(y_range)
    if tick_format is not None:
        yaxis["tickformat"] = tick_format
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines",
                "x": xs,
                "y": ys,
                "line": {"color": colour, "width": 1.5},
                "hovertemplate": "%{x|%H:%M:%S.%L}<br>%{y}<extra></extra>",
                "connectgaps": False,
            }
        ],
        "layout": {
            "title": {"text": title, "font": {"size": 12}, "x": 0.01, "y": 0.95},
            "margin": {"l": 48, "r": 8, "t": 24, "b": 24},
            "height": 160,
            "xaxis": {"type": "date", "showgrid": False, "tickfont": {"size": 10}},
            "yaxis": yaxis,
            "showlegend": False,
            "paper_bgcolor": "rgba(0,0,0,0)",
            "plot_bgcolor": "#ffffff",
            "uirevision": title,
        },
    }


def sparkline_update(history: History | None, symbol: str | None, rendered: Any) -> tuple[Any, Any, Any]:
    """(p_change figure, mid figure, rendered key) for the sparkline callback; ``no_update`` when unchanged.

    ``rendered`` is the key of what the page shows now (``[symbol, version]``), kept in a
    ``dcc.Store``, so the figures are only rebuilt and sent when a new point arrived.
    """
    key = [symbol, history.version if history else -1]
    if rendered == key:
        return no_update, no_update, no_update
    if history is None:
        empty_ts: list[int] = []
        empty: list[float | None] = []
        return (
            sparkline_figure(empty_ts, empty, "p_change", "#c0392b", P_CHANGE_RANGE),
            sparkline_figure(empty_ts, empty, "mid", "#2c3e50", tick_format=MID_TICK_FORMAT),
            key,
        )
    return (
        sparkline_figure(history.ts_event_ns, history.p_change, "p_change", "#c0392b", P_CHANGE_RANGE),
        sparkline_figure(history.ts_event_ns, history.mid, "mid", "#2c3e50", tick_format=MID_TICK_FORMAT),
        key,
    )
