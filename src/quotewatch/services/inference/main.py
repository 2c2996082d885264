"""``quotewatch run inference``: the entry point wiring settings, registry, webhook and the stream task.

Start-up order: the service context (logging, /metrics + /health, topics); one synchronous alias
check so a registered champion serves from the first record (if the registry is unreachable the
fallback serves and the background checker keeps trying); the webhook receiver, registered on
the MLflow server; then the exactly-once stream loop until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os

import click

from quotewatch.core.config import InferenceSettings, load_settings
from quotewatch.core.errors import ConfigError, QuoteWatchError
from quotewatch.core.service import run_stream_service, service_context
from quotewatch.domain.ml.registry import make_client, parse_model_uri
from quotewatch.domain.ml.webhooks import ensure_webhook

logger = logging.getLogger(__name__)

SERVICE = "inference"

# The registry is polled in the background: a lookup should fail fast and be retried at the next
# poll, not hang in MLflow's default 7 retries with exponential backoff (minutes).
_MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # A service log is no terminal: no download progress bars in it.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def webhook_name(settings: InferenceSettings) -> str:
    """The webhook's name on the MLflow server: one per inference instance and namespace."""
    return f"quotewatch-inference-{settings.topic_prefix}-{settings.instance_id}"


@click.command(SERVICE)
def command() -> None:
    """Score qw.features with the MLflow champion (hot-reloaded), write qw.predictions and qw.snapshot."""
    from quotewatch.services.inference.models import FeatureSample, ModelManager
    from quotewatch.services.inference.task import InferenceTask
    from quotewatch.services.inference.webhook import WebhookReceiver

    settings = load_settings(InferenceSettings)
    champion_uri = parse_model_uri(settings.model_uri)
    challenger_uri = parse_model_uri(settings.challenger_uri) if settings.challenger_uri else None
    if settings.webhook_port and settings.mlflow_webhook_secret is None:
        raise ConfigError("WEBHOOK_PORT is set but MLFLOW_WEBHOOK_SECRET is not: webhooks must be HMAC-verified")
    for key, value in _MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    with service_context(SERVICE, settings) as context:
        sample = FeatureSample()
        manager = ModelManager(
            service=SERVICE,
            tracking_uri=settings.mlflow_tracking_uri,
            champion_uri=champion_uri,
            challenger_uri=challenger_uri,
            poll_seconds=settings.model_poll_seconds,
            clock=context.clock,
            sample=sample,
            signing_key=settings.signing_key,
        )
        serving = manager.check_now()
        logger.info(
            "initial models",
            extra={
                "champion": serving.champion.version if serving.champion else "fallback",
                "challenger": serving.challenger.version if serving.challenger else None,
            },
        )
        manager.start()
        receiver = None
        webhook_id: str | None = None
        if settings.webhook_port and settings.mlflow_webhook_secret is not None:
            receiver = WebhookReceiver(
                settings.webhook_host,
                settings.webhook_port,
                settings.mlflow_webhook_secret.get_secret_value(),
                champion_uri.name,
                context.clock,
                manager.nudge,
            ).start()
            url = settings.webhook_url or receiver.url(settings.webhook_host)
            if settings.mlflow_tracking_uri:
                try:
                    webhook_id = ensure_webhook(
                        make_client(settings.mlflow_tracking_uri),
                        webhook_name(settings),
                        url,
                        settings.mlflow_webhook_secret.get_secret_value(),
                    )
                    logger.info("registry webhook registered", extra={"webhook_id": webhook_id, "url": url})
                except QuoteWatchError as exc:
                    logger.warning("could not register the registry webhook; polling only: %s", exc)
        task = InferenceTask(
            topics=context.topics,
            manager=manager,
            sample=sample,
            clock=context.clock,
            live_metrics_window=settings.live_metrics_window,
            join_buffer_max=settings.join_buffer_max,
            snapshot_interval_ms=settings.snapshot_interval_ms,
            delta_ms=settings.delta_ms,
            tick_ms=settings.tick_ms,
            lift_every_ms=settings.lift_every_ms,
            lift_alarm_ms=settings.lift_alarm_ms,
            lift_resamples=settings.lift_resamples,
            service=SERVICE,
            consumer_lag=lambda: int(context.liveness.status().detail["lag"]),
        )
        try:
            # Exactly-once: predictions, snapshots and input offsets commit in one transaction.
            # (The processor hands over a record as soon as it arrives, so no tick waits for a batch.)
            run_stream_service(context, task, [context.topics.features, context.topics.labels])
        finally:
            if receiver is not None:
                receiver.stop()
            if webhook_id is not None and settings.mlflow_tracking_uri:
                # Nobody listens any more: stop MLflow from calling (a restart re-activates it).
                try:
                    make_client(settings.mlflow_tracking_uri).update_webhook(webhook_id, status="DISABLED")
                except Exception as exc:  # noqa: BLE001 - best effort on the way out
                    logger.warning("could not disable the registry webhook: %s", exc)
            manager.stop()
