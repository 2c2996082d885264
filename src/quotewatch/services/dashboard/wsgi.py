"""WSGI entry point for pre-forking servers, e.g.
``gunicorn -w 2 -b 127.0.0.1:8050 'quotewatch.services.dashboard.wsgi:server'``.

Importing this module builds the settings (from the environment) and the Dash app, nothing
more: each worker process builds its own store and snapshot consumer on its first request
(:class:`~quotewatch.services.dashboard.runtime.LazyRuntime`). ``quotewatch run dashboard`` (waitress)
is the default way to run the dashboard; this module is for several worker processes.
"""

from __future__ import annotations

from quotewatch.core.config import DashboardSettings, load_settings
from quotewatch.core.logging import configure_logging
from quotewatch.services.dashboard.app import create_app
from quotewatch.services.dashboard.consumer import SERVICE

settings = load_settings(DashboardSettings)
configure_logging(SERVICE, settings.log_level, settings.log_format)
dashboard = create_app(settings)
server = dashboard.server
