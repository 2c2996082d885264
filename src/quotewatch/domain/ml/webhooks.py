"""MLflow model-registry webhooks: signatures (HMAC), verification, alias changes and registration."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from quotewatch.core.bounded import parse_json_object
from quotewatch.core.errors import QuoteWatchError, UntrustedInputError

if TYPE_CHECKING:
    from mlflow import MlflowClient
from quotewatch.domain.ml.registry import (
    ALIAS_CREATED_EVENT,
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_VERSION,
    TIMESTAMP_HEADER,
    WEBHOOK_MAX_BODY_BYTES,
    WEBHOOK_MAX_DEPTH,
    RegistryError,
    RegistryUnavailableError,
)

# -- webhooks ---------------------------------------------------------------------------------------


class Headers(Protocol):
    """Request headers: a mapping or ``http.client.HTTPMessage`` (case-insensitive ``get``)."""

    def get(self, name: str, /) -> str | None: ...


class WebhookRejectedError(QuoteWatchError):
    """A webhook request is not authentic, too old, or malformed."""


def webhook_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for ``body``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_webhook(
    secret: str, headers: Headers, body: bytes, now_seconds: float, tolerance_seconds: float = 300.0
) -> dict[str, Any]:  # not a topic record: MLflow metadata
    """Check a webhook request's HMAC signature and freshness; return its JSON payload.

    Args:
        headers: the request headers (``http.client.HTTPMessage`` looks names up case-insensitively).
        now_seconds: the current Unix time (injected; the receiver passes its clock).

    Raises:
        WebhookRejectedError: missing headers, a bad signature, a timestamp outside
            ``now ± tolerance`` (a replayed request), or a body that is not a JSON object.
    """
    delivery_id = headers.get(DELIVERY_ID_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not delivery_id or not timestamp or not signature:
        raise WebhookRejectedError("missing MLflow webhook headers (delivery id, timestamp, signature)")
    expected = webhook_signature(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise WebhookRejectedError(f"bad signature for delivery {delivery_id}")
    try:
        sent = int(timestamp)
    except ValueError as exc:
        raise WebhookRejectedError(f"timestamp {timestamp!r} is not Unix seconds") from exc
    if abs(now_seconds - sent) > tolerance_seconds:
        raise WebhookRejectedError(f"delivery {delivery_id} is {now_seconds - sent:.0f}s old (replayed?)")
    try:
        return parse_json_object(
            body, what=f"delivery {delivery_id}: body", max_bytes=WEBHOOK_MAX_BODY_BYTES, max_depth=WEBHOOK_MAX_DEPTH
        )
    except UntrustedInputError as exc:
        raise WebhookRejectedError(str(exc)) from None


def is_alias_change(payload: Mapping[str, Any], model_name: str) -> bool:  # not a topic record: webhook JSON
    """True for a ``model_version_alias.created`` event of ``model_name``."""
    data = payload.get("data") or {}
    return (
        payload.get("entity") == "model_version_alias"
        and payload.get("action") == "created"
        and isinstance(data, Mapping)
        and data.get("name") == model_name
    )


def ensure_webhook(client: MlflowClient, name: str, url: str, secret: str) -> str:
    """Create (or update, matched by ``name``) a webhook on alias creation; return its id.

    Raises:
        RegistryUnavailableError: the server could not be reached.
        RegistryError: the server refused the webhook (e.g. http URLs not allowed on it).
    """
    from mlflow.exceptions import MlflowException

    try:
        existing = None
        page_token = None
        while existing is None:
            page = client.list_webhooks(max_results=100, page_token=page_token)
            existing = next((webhook for webhook in page if webhook.name == name), None)
            page_token = page.token
            if not page_token:
                break
        if existing is not None:
            webhook = client.update_webhook(
                existing.webhook_id, url=url, events=[ALIAS_CREATED_EVENT], secret=secret, status="ACTIVE"
            )
        else:
            webhook = client.create_webhook(name=name, url=url, events=[ALIAS_CREATED_EVENT], secret=secret)
    except MlflowException as exc:
        raise RegistryError(f"cannot register webhook {name} -> {url}: {exc.message}") from exc
    except OSError as exc:
        raise RegistryUnavailableError(f"cannot register webhook {name}: tracking server unreachable: {exc}") from exc
    return str(webhook.webhook_id)
