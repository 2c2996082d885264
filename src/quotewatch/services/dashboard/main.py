"""``quotewatch run dashboard``: the Dash app on the snapshot topic, served by waitress.

Production (the default): waitress, a pure-Python multi-threaded WSGI server (DASH_THREADS
request threads), on DASH_HOST:DASH_PORT (127.0.0.1:8050); with DASH_PUSH, uvicorn (ASGI, for
Dash's WebSocket callbacks). The process builds its state at start-up, then watches its
consumer thread: if the thread dies the process exits non-zero instead of serving stale data
forever (``/health`` already reports 503 by then).

Debug (``--debug`` or DASH_DEBUG=true): Dash's development server with the reloader and dev
tools; the state is built lazily in the serving child only.

Several processes behind one address: ``gunicorn -w 2 'quotewatch.services.dashboard.wsgi:server'``
(each worker reads the topic on its own; see :mod:`quotewatch.services.dashboard.runtime`).

The dashboard is a reader: it never creates or alters topics (that needs admin rights on the
broker, and a mistyped TOPIC_PREFIX would create a whole catalog of empty topics). It serves at
once, with the broker down or the topic missing, and its consumer waits for the snapshot topic;
``quotewatch topics create`` (the demo, compose's ``topics-init``) creates it. Until the first
snapshot it also reads the tails of the pipeline's topics, to say why it waits
(:mod:`quotewatch.services.dashboard.probe`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import click
import waitress

from quotewatch.core.config import DashboardSettings, load_settings
from quotewatch.core.errors import FatalError
from quotewatch.core.service import ServiceContext, service_context
from quotewatch.services.dashboard.app import create_app
from quotewatch.services.dashboard.consumer import SERVICE
from quotewatch.services.dashboard.runtime import DashboardRuntime

logger = logging.getLogger(__name__)

WATCH_SECONDS = 0.5


@click.command("dashboard")
@click.option(
    "--debug/--no-debug",
    default=None,
    help="Dash's development server with the reloader (default: DASH_DEBUG, else waitress).",
)
def command(debug: bool | None) -> None:
    """The live dashboard on <TOPIC_PREFIX>.snapshot at http://DASH_HOST:DASH_PORT."""
    overrides = {} if debug is None else {"dash_debug": debug}
    settings = load_settings(DashboardSettings, **overrides)
    if settings.dash_debug:
        run_debug(settings)
    else:
        run_production(settings)


def _runtime_factory(settings: DashboardSettings, context: ServiceContext) -> DashboardRuntime:
    return DashboardRuntime.build(settings, clock=context.clock, serde=context.serde, liveness=context.liveness)


class _Server(Protocol):
    port: int

    def serve_forever(self) -> None: ...

    def stop(self) -> None: ...


class _Waitress:
    """The WSGI app (polling mode) on waitress."""

    def __init__(self, app: Any, settings: DashboardSettings) -> None:
        self._server = waitress.create_server(
            app,
            host=settings.dash_host,
            port=settings.dash_port,
            threads=settings.dash_threads,
            ident="quotewatch-dashboard",
        )
        self.port = int(self._server.effective_port)

    def serve_forever(self) -> None:
        self._server.run()

    def stop(self) -> None:
        # Finish in-flight requests, then close the listening socket.
        self._server.task_dispatcher.shutdown(timeout=5)
        self._server.close()


class _Uvicorn:
    """The ASGI app (push mode: FastAPI + WebSockets) on uvicorn."""

    def __init__(self, app: Any, settings: DashboardSettings) -> None:
        import socket

        import uvicorn

        # Bind here so DASH_PORT=0 works and the port is known before serving.
        self._socket = socket.create_server((settings.dash_host, settings.dash_port))
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_level="warning",
            server_header=False,
            headers=[("server", "quotewatch-dashboard")],
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)

    def serve_forever(self) -> None:
        self._server.run(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True


def run_production(settings: DashboardSettings) -> None:
    """Serve until SIGTERM/SIGINT; exit non-zero if the snapshot consumer dies.

    Polling mode is served by waitress (WSGI); push mode (DASH_PUSH) by uvicorn (ASGI, for the
    WebSocket). Either runs on a thread while the main thread watches the shutdown signal and
    the consumer.
    """
    # create_topics=False: a read-only UI; its consumer waits for <prefix>.snapshot to exist.
    with service_context(SERVICE, settings, create_topics=False) as context:
        dashboard = create_app(settings, runtime_factory=lambda: _runtime_factory(settings, context))
        runtime = dashboard.runtime.get()  # this process serves: build its state now
        server: _Server = (
            _Uvicorn(dashboard.server, settings) if dashboard.push else _Waitress(dashboard.server, settings)
        )
        logger.info(
            "dashboard listening",
            extra={"url": f"http://{settings.dash_host}:{server.port}", "push": dashboard.push},
        )
        thread = threading.Thread(target=server.serve_forever, name="web-server", daemon=True)
        thread.start()
        failure = None
        while not context.shutdown.wait(WATCH_SECONDS):
            if not runtime.consumer.alive:
                failure = runtime.liveness.status().reason
                break
            if not thread.is_alive():
                failure = "the web server stopped"
                break
        server.stop()
        thread.join(10)
        # The consumer holds no offsets to commit (it never commits): closing it only leaves
        # the broker promptly.
        runtime.stop()
        if failure is not None:
            raise FatalError(f"{failure}; exiting so the dashboard is restarted")


def run_debug(settings: DashboardSettings) -> None:
    """Dash's development server with the reloader (polling mode); Ctrl-C stops it.

    In push mode Dash's dev tools run on uvicorn without the reloader (the FastAPI backend's
    reloader re-imports the app from a module path, which this factory-built app has not).
    """
    # No stuck watchdog: the development server's runtime has its own liveness, and a person runs it.
    with service_context(SERVICE, settings, install_signals=False, create_topics=False, watchdog=False):
        dashboard = create_app(settings)
        if dashboard.push:
            import uvicorn

            dashboard.app.enable_dev_tools(debug=True, dev_tools_hot_reload=False)
            uvicorn.run(dashboard.server, host=settings.dash_host, port=settings.dash_port, log_level="info")
        else:
            dashboard.app.run(host=settings.dash_host, port=settings.dash_port, debug=True)
