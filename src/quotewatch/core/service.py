"""How a QuoteWatch service process starts, runs and stops.

:func:`service_context` builds what every service needs once, in the entry point: logging, the
clock, the serde, the shutdown signal, liveness and the ``/metrics`` + ``/health`` endpoint, and
the catalog's topics (created if missing; idempotent). :func:`run_stream_service` then runs a
:class:`~quotewatch.core.runtime.StreamTask` in a :class:`~quotewatch.core.runtime.StreamProcessor`.
Services with their own loop (ingest, lake sink, dashboard) use the context directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from quotewatch import __version__
from quotewatch.core.clock import Clock, SystemClock
from quotewatch.core.config import CommonSettings
from quotewatch.core.health import Liveness, ObservabilityServer, StuckWatchdog
from quotewatch.core.kafka import ShutdownSignal, ensure_topics, make_admin
from quotewatch.core.logging import configure_logging
from quotewatch.core.metrics import BUILD_INFO
from quotewatch.core.runtime import StreamProcessor, StreamTask, V
from quotewatch.core.serde import AvroSerde, serde_from_settings
from quotewatch.core.topics import TopicNames

logger = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """Everything a service's processing code is given (it builds none of it itself)."""

    service: str
    settings: CommonSettings
    clock: Clock
    serde: AvroSerde
    shutdown: ShutdownSignal
    liveness: Liveness
    topics: TopicNames
    observability: ObservabilityServer | None


@contextmanager
def service_context(
    service: str,
    settings: CommonSettings,
    *,
    clock: Clock | None = None,
    install_signals: bool = True,
    create_topics: bool = True,
    watchdog: bool = True,
) -> Iterator[ServiceContext]:
    """Set a service process up; tear the endpoint down on exit.

    Who calls this: a service's entry point (``quotewatch run <service>``), once, from the main
    thread (signal handlers can only be installed there).
    """
    configure_logging(service, settings.log_level, settings.log_format)
    clock = clock or SystemClock()
    BUILD_INFO.info({"version": __version__, "service": service})
    registry_auth = (
        settings.schema_registry_basic_auth_user_info.get_secret_value()
        if settings.schema_registry_basic_auth_user_info
        else None
    )
    serde = serde_from_settings(settings.schema_registry_url, registry_auth)
    shutdown = ShutdownSignal()
    if install_signals:
        shutdown.install()
    liveness = Liveness(service, clock, settings.health_stall_seconds)
    stuck_watchdog = (
        StuckWatchdog(liveness, settings.stuck_exit_seconds).start()
        if watchdog and settings.stuck_exit_seconds
        else None
    )
    observability = None
    if settings.metrics_port:
        observability = ObservabilityServer(settings.metrics_host, settings.metrics_port, liveness).start()
        logger.info("metrics and health endpoint up", extra={"port": observability.port})
    if create_topics:
        ensure_topics(make_admin(settings), settings.topic_prefix)
    context = ServiceContext(
        service=service,
        settings=settings,
        clock=clock,
        serde=serde,
        shutdown=shutdown,
        liveness=liveness,
        topics=TopicNames(settings.topic_prefix),
        observability=observability,
    )
    logger.info(
        "service starting",
        extra={"topic_prefix": settings.topic_prefix, "bootstrap": settings.kafka_bootstrap_servers},
    )
    try:
        yield context
    finally:
        if stuck_watchdog is not None:
            stuck_watchdog.stop()
        if observability is not None:
            observability.stop()
        logger.info("service stopped")


def run_stream_service(
    context: ServiceContext,
    task: StreamTask[V],
    input_topics: Sequence[str],
    *,
    exactly_once: bool = True,
    **processor_options: Any,
) -> None:
    """Run ``task`` over ``input_topics`` until SIGTERM/SIGINT (see :class:`StreamProcessor`)."""
    StreamProcessor(
        settings=context.settings,
        service=context.service,
        task=task,
        input_topics=input_topics,
        serde=context.serde,
        clock=context.clock,
        shutdown=context.shutdown,
        liveness=context.liveness,
        exactly_once=exactly_once,
        **processor_options,
    ).run()
