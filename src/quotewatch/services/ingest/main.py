"""``quotewatch run ingest``: the ingest service's entry point."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from quotewatch.core.config import IngestSettings, load_settings
from quotewatch.core.service import ServiceContext, run_stream_service, service_context
from quotewatch.services.ingest.service import SERVICE, IngestService
from quotewatch.services.ingest.topic_mode import NormaliseTask

logger = logging.getLogger(__name__)


@click.command("ingest")
def command() -> None:
    """Coinbase WebSocket (FEED, COINBASE_WS_URL, SYMBOLS) -> <prefix>.md.raw + <prefix>.md.events.

    With INGEST_SOURCE=topic it re-normalises <prefix>.md.raw into <prefix>.md.events instead
    (exactly-once), reproducing the live events byte for byte.
    """
    settings = load_settings(IngestSettings)
    # Signals: the websocket mode handles them on its event loop; topic mode uses ShutdownSignal.
    with service_context(SERVICE, settings, install_signals=settings.ingest_source == "topic") as context:
        if settings.ingest_source == "topic":
            task = NormaliseTask(context.topics, context.clock)
            run_stream_service(context, task, [context.topics.md_raw])
        else:
            asyncio.run(run_websocket(context, settings))


async def run_websocket(context: ServiceContext, settings: IngestSettings) -> None:
    """Run the live ingest until SIGTERM/SIGINT; then drain, flush and return."""
    service = IngestService(settings, serde=context.serde, clock=context.clock, liveness=context.liveness)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    logger.info(
        "ingest starting", extra={"feed": settings.feed, "url": service.url, "symbols": ",".join(settings.symbols)}
    )
    await service.run()
