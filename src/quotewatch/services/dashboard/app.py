"""The Dash app: layout, callbacks and the ``/health`` + ``/metrics`` routes.

:func:`create_app` builds the app and starts nothing; the live state (store + consumer thread)
is built per process on the first request (:class:`~quotewatch.services.dashboard.runtime.LazyRuntime`).
The browser polls with ``dcc.Interval`` every DASH_POLL_MS: the selector and the KPI cards /
ladder / status callbacks run in parallel requests. The sparklines have their own, slower
interval (:data:`SPARKLINE_REFRESH_MS`) and are only rebuilt when a new point arrived. The
callbacks fetch from the store and call the pure functions of :mod:`quotewatch.services.dashboard.view`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, State, ctx, dcc, html, set_props
from dash.exceptions import PreventUpdate, WebsocketDisconnected
from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from quotewatch.core.config import DashboardSettings
from quotewatch.core.topics import TopicNames
from quotewatch.services.dashboard.runtime import DashboardRuntime, LazyRuntime
from quotewatch.services.dashboard.view import (
    KPI_OUTPUTS,
    props_to_send,
    render_kpis,
    selector_update,
    sparkline_update,
)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       background: #f4f6f8; color: #1f2933; }
.header { display: flex; align-items: center; gap: 16px; padding: 12px 20px; background: #1f2933; color: #fff; }
.header h1 { font-size: 18px; margin: 0; font-weight: 600; }
.header .spacer { flex: 1; }
.header .time { font-size: 13px; color: #cbd2d9; }
.selector { width: 180px; color: #1f2933; }
.badge { display: inline-block; padding: 3px 10px; border-radius: 10px; font-size: 12px; font-weight: 700;
         letter-spacing: .04em; }
.badge.live, .badge.ok { background: #2f9e44; color: #fff; }
.badge.stale, .badge.bad { background: #c92a2a; color: #fff; }
.badge.waiting, .badge.unknown { background: #868e96; color: #fff; }
.badge.warn { background: #f08c00; color: #fff; }
.stale-indicator { background: #c92a2a; color: #fff; padding: 8px 20px; font-weight: 600; }
.empty-state { margin: 80px auto; max-width: 560px; text-align: center; color: #52606d; font-size: 18px;
               padding: 40px; border: 2px dashed #cbd2d9; border-radius: 12px; background: #fff; }
.empty-state .reasons { margin: 16px 0 0; padding: 0; list-style: none; font-size: 14px; text-align: left; }
.empty-state .reasons li { padding: 4px 0; }
.main { padding: 16px 20px; }
.main.stale .cards, .main.stale .charts, .main.stale .ladder { opacity: .45; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: #fff; border-radius: 10px; padding: 10px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .label { font-size: 11px; text-transform: uppercase; letter-spacing: .06em; color: #7b8794; }
.card .value { font-size: 22px; font-weight: 600; margin-top: 4px; font-variant-numeric: tabular-nums; }
.card .sub { font-size: 12px; color: #7b8794; margin-top: 2px; min-height: 14px; }
.card.flagged { box-shadow: 0 0 0 2px #c92a2a; }
.card.flagged .sub { color: #c92a2a; font-weight: 600; }
#card-p-change .label, #card-p-change .sub { color: inherit; opacity: .85; }
.role { font-size: 12px; font-weight: 700; }
.role.champion { color: #2f9e44; } .role.challenger { color: #1971c2; } .role.fallback { color: #f08c00; }
.lower { display: grid; grid-template-columns: 2fr 1fr; gap: 12px; margin-top: 12px; }
.charts .card { padding: 4px 8px; margin-bottom: 12px; }
.ladder table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
.ladder th { font-size: 11px; text-transform: uppercase; color: #7b8794; text-align: right; padding: 4px 8px; }
.ladder td { text-align: right; padding: 6px 8px; border-top: 1px solid #eef0f3; }
.ladder td.bid.price { color: #2f9e44; font-weight: 600; } .ladder td.ask.price { color: #c92a2a; font-weight: 600; }
.footer { padding: 8px 20px; font-size: 12px; color: #7b8794; }
"""

# Sparklines cover minutes; redrawing them at every poll costs the browser's main thread tens of
# milliseconds per Plotly render, which delays the KPI values behind them. Once a second is enough.
SPARKLINE_REFRESH_MS = 1000

INDEX_STRING = (
    """<!DOCTYPE html>
<html>
  <head>
    {%metas%}
    <title>{%title%}</title>
    {%favicon%}
    {%css%}
    <style>"""
    + STYLE
    + """</style>
  </head>
  <body>
    {%app_entry%}
    <footer>{%config%}{%scripts%}{%renderer%}</footer>
  </body>
</html>"""
)


def _card(label: str, value_id: str, sub_id: str | None = None, card_id: str | None = None) -> html.Div:
    children: list[Any] = [html.Div(label, className="label"), html.Div("—", id=value_id, className="value")]
    if sub_id is not None:
        children.append(html.Div("", id=sub_id, className="sub"))
    return html.Div(children, className="card", id=card_id or f"card-{value_id.removeprefix('kpi-')}")


def layout(settings: DashboardSettings) -> html.Div:
    """The page: header with the selector and status, the empty state, KPI cards, sparklines, ladder."""
    return html.Div(
        [
            dcc.Interval(id="poll", interval=settings.dash_poll_ms, n_intervals=0),
            dcc.Interval(id="spark-poll", interval=max(settings.dash_poll_ms, SPARKLINE_REFRESH_MS), n_intervals=0),
            dcc.Store(id="spark-rendered"),
            html.Div(
                [
                    html.H1("QuoteWatch"),
                    html.Div(
                        dcc.Dropdown(id="symbol-select", options=[], clearable=False, searchable=False),
                        id="selector-wrap",
                        className="selector",
                        style={"display": "none"},
                    ),
                    html.Span("WAITING", id="status-badge", className="badge waiting"),
                    html.Div(className="spacer"),
                    html.Span("", id="snapshot-time", className="time"),
                ],
                className="header",
            ),
            html.Div("", id="stale-indicator", className="stale-indicator", style={"display": "none"}),
            html.Div(
                [
                    html.Div(
                        f"Waiting for the first snapshot on {TopicNames(settings.topic_prefix).snapshot}…",
                        id="empty-title",
                    ),
                    html.Ul([], id="empty-reasons", className="reasons"),
                ],
                id="empty-state",
                className="empty-state",
            ),
            html.Div(
                [
                    html.Div(
                        [
                            _card("Best bid", "kpi-best-bid"),
                            _card("Best ask", "kpi-best-ask"),
                            _card("Spread", "kpi-spread", "kpi-spread-bps"),
                            _card("p_change", "kpi-p-change", "kpi-challenger", card_id="card-p-change"),
                            _card("Model", "kpi-model", "kpi-model-role"),
                            _card("Live AUC", "kpi-auc", "kpi-n-labels"),
                            _card("Live lift", "kpi-lift", "kpi-lift-note"),
                            _card("Brier", "kpi-brier"),
                            _card("Balanced accuracy", "kpi-balanced-accuracy"),
                            _card("Updates", "kpi-updates"),
                            html.Div(
                                [
                                    html.Div("Feed", className="label"),
                                    html.Div(
                                        html.Span("—", id="kpi-feed-state", className="badge unknown"),
                                        className="value",
                                    ),
                                ],
                                className="card",
                                id="card-feed-state",
                            ),
                            _card("Consumer lag", "kpi-consumer-lag"),
                        ],
                        className="cards",
                    ),
                    html.Div(
                        [
                            html.Div(
                                [
                                    html.Div(
                                        dcc.Graph(
                                            id="spark-p-change", config={"displayModeBar": False, "staticPlot": True}
                                        ),
                                        className="card",
                                    ),
                                    html.Div(
                                        dcc.Graph(id="spark-mid", config={"displayModeBar": False, "staticPlot": True}),
                                        className="card",
                                    ),
                                ],
                                className="charts",
                            ),
                            html.Div(
                                html.Div(
                                    [
                                        html.Div("Top of book", className="label"),
                                        html.Table(
                                            [
                                                html.Thead(
                                                    html.Tr(
                                                        [
                                                            html.Th("bid size"),
                                                            html.Th("bid"),
                                                            html.Th("ask"),
                                                            html.Th("ask size"),
                                                        ]
                                                    )
                                                ),
                                                html.Tbody([], id="ladder-body"),
                                            ]
                                        ),
                                    ],
                                    className="card",
                                ),
                                className="ladder",
                            ),
                        ],
                        className="lower",
                    ),
                ],
                id="main-panel",
                className="main",
                style={"display": "none"},
            ),
            html.Div("", id="footer-status", className="footer"),
        ]
    )


@dataclass
class DashboardApp:
    """The Dash app and the per-process runtime its callbacks read."""

    app: Dash
    runtime: LazyRuntime
    settings: DashboardSettings
    push: bool

    @property
    def server(self) -> Any:
        """The web application: Flask (WSGI) when polling, FastAPI (ASGI) in push mode."""
        return self.app.server


def create_app(
    settings: DashboardSettings,
    *,
    runtime_factory: Callable[[], DashboardRuntime] | None = None,
) -> DashboardApp:
    """Build the Dash app for ``settings``. Starts nothing: state is built on the first request.

    With DASH_PUSH the app runs on Dash's FastAPI backend with WebSocket callbacks, and the KPI
    cards are pushed by one long-lived callback per browser connection (:func:`_register_push`)
    instead of being polled.

    Args:
        runtime_factory: builds this process's runtime (default: from ``settings``); the entry
            point passes one wired to its service context's liveness.
    """
    runtime = LazyRuntime(runtime_factory or (lambda: DashboardRuntime.build(settings)))
    stale_after_ns = settings.dash_stale_ms * 1_000_000
    push = settings.dash_push
    app = Dash(
        __name__,
        title="QuoteWatch",
        update_title="",  # keep the tab title still while callbacks run
        serve_locally=True,
        include_assets_files=False,
        backend="fastapi" if push else "flask",
        websocket_callbacks=push,
    )
    app.index_string = INDEX_STRING
    app.layout = layout(settings)

    @app.callback(
        Output("symbol-select", "options"),
        Output("symbol-select", "value"),
        Output("selector-wrap", "style"),
        Input("poll", "n_intervals"),
        State("symbol-select", "value"),
        State("symbol-select", "options"),
    )
    def update_selector(_: int, value: str | None, options: list[Any] | None) -> tuple[Any, Any, Any]:
        return selector_update(runtime.get().store.symbols(), value, options, settings.symbols)

    @app.callback(
        Output("spark-p-change", "figure"),
        Output("spark-mid", "figure"),
        Output("spark-rendered", "data"),
        Input("spark-poll", "n_intervals"),
        Input("symbol-select", "value"),
        State("spark-rendered", "data"),
    )
    def update_sparklines(_: int, symbol: str | None, rendered: Any) -> tuple[Any, Any, Any]:
        return sparkline_update(runtime.get().store.history(symbol), symbol, rendered)

    if push:
        _register_push(app, runtime, settings)
        _fastapi_routes(app.server, runtime)
    else:

        @app.callback(
            [Output(component, prop) for component, prop in KPI_OUTPUTS],
            Input("poll", "n_intervals"),
            Input("symbol-select", "value"),
        )
        def update_kpis(_: int, symbol: str | None) -> list[Any]:
            state = runtime.get()
            values = render_kpis(state.store.latest(symbol), state.feed(), stale_after_ns)
            return [values[key] for key in KPI_OUTPUTS]

        _flask_routes(app.server, runtime)

    return DashboardApp(app, runtime, settings, push)


def _health_body(runtime: LazyRuntime) -> tuple[str, int]:
    status = runtime.get().health()
    body = json.dumps({"healthy": status.healthy, "reason": status.reason, **status.detail})
    return body, 200 if status.healthy else 503


def _flask_routes(server: Any, runtime: LazyRuntime) -> None:
    @server.route("/health")
    def health() -> Response:
        """Is this process's snapshot consumer advancing? 200 when healthy, 503 when not."""
        body, code = _health_body(runtime)
        return Response(body, status=code, mimetype="application/json")

    @server.route("/metrics")
    def metrics() -> Response:
        """Prometheus metrics of this process."""
        runtime.get()
        return Response(generate_latest(), status=200, mimetype=CONTENT_TYPE_LATEST)


def _fastapi_routes(server: Any, runtime: LazyRuntime) -> None:
    from starlette.responses import Response as StarletteResponse

    def health() -> StarletteResponse:
        """Is this process's snapshot consumer advancing? 200 when healthy, 503 when not."""
        body, code = _health_body(runtime)
        return StarletteResponse(body, status_code=code, media_type="application/json")

    def metrics() -> StarletteResponse:
        """Prometheus metrics of this process."""
        runtime.get()
        return StarletteResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    server.add_api_route("/health", health, methods=["GET"])
    server.add_api_route("/metrics", metrics, methods=["GET"])


# How often a push loop looks at the store for a new snapshot, and asks the page which symbol
# it shows. Reading the store is a dict lookup under a lock; the symbol is a WebSocket round trip.
PUSH_CHECK_SECONDS = 0.02
SYMBOL_CHECK_SECONDS = 0.1


def _register_push(app: Dash, runtime: LazyRuntime, settings: DashboardSettings) -> None:
    """One long-lived async callback per browser connection pushes the KPI cards as snapshots arrive.

    A persistent callback (no Input, no Output) starts when the page's WebSocket connects and
    is restarted by Dash when it reconnects. It renders the cards when the selected symbol's
    snapshot changes, and at least every DASH_POLL_MS so the age and the stale indicator move
    while nothing arrives, and sends only the props that changed. It ends when the connection
    closes.
    """
    stale_after_ns = settings.dash_stale_ms * 1_000_000
    refresh_seconds = settings.dash_poll_ms / 1000

    @app.callback(persistent=True)
    async def push_kpis() -> None:
        websocket = ctx.websocket
        sent: tuple[str | None, int] | None = None
        page: dict[tuple[str, str], str] = {}  # what the page shows, as sent (JSON)
        sent_at = symbol_checked_at = -math.inf
        symbol: str | None = None
        loop = asyncio.get_running_loop()
        try:
            while websocket is not None and not websocket.is_shutdown:
                now = loop.time()
                if now - symbol_checked_at >= SYMBOL_CHECK_SECONDS:
                    symbol = await websocket.get_prop("symbol-select", "value")
                    symbol_checked_at = now
                state = runtime.get()
                latest = state.store.latest(symbol)
                key = (symbol, latest.received if latest else -1)
                if key != sent or now - sent_at >= refresh_seconds:
                    values = render_kpis(latest, state.feed(), stale_after_ns)
                    changed, page = props_to_send(values, page)
                    for component, props in changed.items():
                        set_props(component, props)
                    sent, sent_at = key, now
                await asyncio.sleep(PUSH_CHECK_SECONDS)
        except WebsocketDisconnected:
            pass
        raise PreventUpdate
