"""The MLflow registry webhook receiver: an authenticated nudge to check the model aliases now.

MLflow POSTs ``model_version_alias.created`` events here (registered by inference on start, see
:func:`quotewatch.domain.ml.registry.ensure_webhook`). A request is accepted only with a valid
HMAC signature (MLFLOW_WEBHOOK_SECRET) and a timestamp within 5 minutes (replay protection);
an accepted alias event of our model wakes the :class:`~quotewatch.services.inference.models.ModelManager`.
The event's version is not trusted or used: the manager resolves the alias itself, so a nudge
can at worst cause one extra registry lookup. Polling keeps working if webhooks never arrive.

Replies: 200 accepted (nudged or ignored), 401 rejected, 400 malformed, 413 too large.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from quotewatch.core.clock import Clock
from quotewatch.domain.ml.registry import WebhookRejectedError, is_alias_change, verify_webhook

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
PATH = "/mlflow-webhook"


class WebhookReceiver:
    """HTTP server on a daemon thread; calls ``on_alias_change`` for authentic alias events."""

    def __init__(
        self, host: str, port: int, secret: str, model_name: str, clock: Clock, on_alias_change: Callable[[], None]
    ) -> None:
        self.accepted = 0
        self.rejected = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self._reply(413, {"error": "body too large"})
                    return
                body = self.rfile.read(length)
                try:
                    payload = verify_webhook(secret, self.headers, body, clock.now_ns() / 1e9)
                except WebhookRejectedError as exc:
                    outer.rejected += 1
                    logger.warning("rejected a webhook request: %s", exc, extra={"peer": self.client_address[0]})
                    self._reply(401, {"error": str(exc)})
                    return
                outer.accepted += 1
                if is_alias_change(payload, model_name):
                    data = payload.get("data") or {}
                    logger.info(
                        "alias %s of %s moved to v%s (webhook): checking now",
                        data.get("alias"),
                        data.get("name"),
                        data.get("version"),
                    )
                    on_alias_change()
                    self._reply(200, {"nudged": True})
                else:
                    self._reply(200, {"nudged": False})

            def _reply(self, code: int, body: dict[str, Any]) -> None:  # not a topic record: JSON reply
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("webhook http %s", format % args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="mlflow-webhook", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}{PATH}"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
