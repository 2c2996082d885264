"""``quotewatch run dashboard``: the Dash app on the snapshot topic, served by waitress.

Production (the default): waitress, a pure-Python multi-threaded WSGI server (DASH_THREADS
request threads), on DASH_HOST:DASH_PORT (127.0.0.1:8050). The process builds its state at
start-up, then watches its consumer thread: if the thread dies the process exits non-zero
instead of serving stale data forever (``/health`` already reports 503 by then).

Debug (``--debug`` or DASH_DEBUG=true): Dash's development server with the reloader and dev
tools; the state is built lazily in the serving child only.

Several processes behind one address: ``gunicorn -w 2 'quotewatch.dashboard.wsgi:server'``
(each worker reads the topic on its own; see :mod:`quotewatch.dashboard.runtime`).
"""

from __future__ import annotations

import logging
import threading

import click
import waitress

from quotewatch.core.config import DashboardSettings, load_settings
from quotewatch.core.errors import FatalError
from quotewatch.core.service import ServiceContext, service_context
from quotewatch.dashboard.app import create_app
from quotewatch.dashboard.consumer import SERVICE
from quotewatch.dashboard.runtime import DashboardRuntime

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


def run_production(settings: DashboardSettings) -> None:
    """Serve with waitress until SIGTERM/SIGINT; exit non-zero if the snapshot consumer dies."""
    with service_context(SERVICE, settings) as context:
        dashboard = create_app(settings, runtime_factory=lambda: _runtime_factory(settings, context))
        runtime = dashboard.runtime.get()  # this process serves: build its state now
        server = waitress.create_server(
            dashboard.server,
            host=settings.dash_host,
            port=settings.dash_port,
            threads=settings.dash_threads,
            ident="quotewatch-dashboard",
        )
        port = server.effective_port
        logger.info("dashboard listening", extra={"url": f"http://{settings.dash_host}:{port}"})
        threading.Thread(target=server.run, name="waitress", daemon=True).start()
        failure = None
        while not context.shutdown.wait(WATCH_SECONDS):
            if not runtime.consumer.alive:
                failure = runtime.liveness.status().reason
                break
        # Finish in-flight requests, then close the listening socket; the consumer holds no
        # offsets to commit (it never commits), closing it only leaves the broker promptly.
        server.task_dispatcher.shutdown(timeout=5)
        server.close()
        runtime.stop()
        if failure is not None:
            raise FatalError(f"the snapshot consumer stopped ({failure}); exiting so the dashboard is restarted")


def run_debug(settings: DashboardSettings) -> None:
    """Dash's development server with the reloader; Ctrl-C stops it."""
    with service_context(SERVICE, settings, install_signals=False):
        dashboard = create_app(settings)
        dashboard.app.run(host=settings.dash_host, port=settings.dash_port, debug=True)
